"""Training views made on the training device: the CPU only reads bytes.

With ``sampler.views_on: device`` (the default on CUDA) the DataLoader workers read each drawn tile's
stored JPEG stream and draw its views' random choices (:meth:`~hlss_model.augment.HEAugment.draw`);
:class:`DeviceViews` then decodes the whole batch's streams in one call on the device (nvJPEG,
through ``torchvision.io.decode_jpeg(device="cuda")``) and makes every view there with
:meth:`~hlss_model.augment.HEAugment.apply_batch`. The views are those the workers would have made
on the CPU (same draws, same operations), except that the noise field comes from the device's
generator, and nvJPEG's IDCT may differ from libjpeg-turbo's by a level in places.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import imagecodecs
import numpy as np
import torch

from .augment import AugmentParams, HEAugment

__all__ = ["DeviceViews", "decode_tiles", "views_on"]


def views_on(setting: str, device: torch.device) -> str:
    """Where training views are made: ``"device"`` or ``"workers"``, from ``sampler.views_on``
    (``auto``: on the device when it is a CUDA GPU, in the DataLoader workers otherwise)."""
    if setting == "auto":
        return "device" if device.type == "cuda" else "workers"
    return setting


def decode_tiles(encoded: Sequence[bytes | np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Tiles as uint8 ``(3, H, W)`` tensors on ``device``, in order: JPEG streams decoded there (on
    CUDA all in one nvJPEG call; on the CPU with libjpeg-turbo, as the store's codec decodes), and
    pixel arrays ``(H, W, 3) uint8`` (slides not stored as JPEG) copied there."""
    out: list[torch.Tensor | None] = [None] * len(encoded)
    jpeg = [i for i, e in enumerate(encoded) if isinstance(e, (bytes, bytearray, memoryview))]
    if jpeg and device.type == "cuda":
        for i, t in zip(jpeg, _nvjpeg([encoded[i] for i in jpeg], device)):
            out[i] = t
    for i in jpeg:
        if out[i] is None:
            out[i] = torch.from_numpy(imagecodecs.jpeg8_decode(encoded[i])).permute(2, 0, 1).to(device)
    for i, e in enumerate(encoded):
        if out[i] is None:
            out[i] = torch.from_numpy(np.ascontiguousarray(e)).permute(2, 0, 1).to(device, non_blocking=True)
    return out  # type: ignore[return-value]


def _nvjpeg(streams: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """``streams`` decoded on the GPU in one call; Nones (the caller decodes on the CPU) where this
    torchvision has no GPU decoder or nvJPEG refuses the batch, with a warning the first time."""
    global _NVJPEG_FAILED
    if _NVJPEG_FAILED:
        return [None] * len(streams)
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs in favour of TorchCodec
            warnings.simplefilter("ignore", UserWarning)
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ImportError) as e:
        _NVJPEG_FAILED = True
        warnings.warn(f"decoding tiles on {device} failed ({type(e).__name__}: {e}); decoding them on the CPU "
                      "from now on (the views are still made on the device)", RuntimeWarning, stacklevel=3)
        return [None] * len(streams)


_NVJPEG_FAILED = False


class DeviceViews:
    """``views(batch)``: the ``images [B, S, T, V, 3, H, W] float32`` on ``device`` of a batch that
    :func:`~hlss_model.data.make_loader` made with ``encoded=True``."""

    def __init__(self, augment: AugmentParams, device: torch.device, slides: int, tiles: int, views: int) -> None:
        self.augment = HEAugment(augment)
        self.device, self.shape = device, (slides, tiles, views)

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        slides, tiles, views = self.shape
        encoded, draws = batch["encoded"], batch["draws"]
        if len(draws) != len(encoded) * views:
            raise ValueError(f"{len(draws)} view draws for {len(encoded)} tiles x {views} views")
        pixels = decode_tiles(encoded, self.device)
        images = self.augment.apply_batch(pixels, draws, [i // views for i in range(len(draws))])
        return images.reshape(-1, slides, tiles, views, *images.shape[1:])
