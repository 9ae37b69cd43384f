"""Per-view augmentations for H&E tiles in HiDisc/HLSS self-supervised training, and the plain
transform used for kNN evaluation and feature extraction.

Tiles arrive from the cohort store as uint8 ``(H, W, 3)`` RGB arrays. The training sampler calls
:class:`HEAugment` once per view inside DataLoader workers; every random number comes from the
``torch.Generator`` it passes, so views are reproducible per worker and item. Unlike the reference
HLSS code, every transform's probability is honoured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

__all__ = ["AugmentParams", "HEAugment", "ViewDraw", "EvalTransform", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Ruifrok & Johnston stain OD vectors (rows: haematoxylin, eosin, DAB), as skimage.color.rgb_from_hed,
# in column-vector form: od = _OD_FROM_HED @ hed.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_OD_FROM_HED = torch.tensor(_RGB_FROM_HED.T, dtype=torch.float32)
_HED_FROM_OD = torch.tensor(np.linalg.inv(_RGB_FROM_HED).T, dtype=torch.float32)
_RGB_FLOOR = 1e-6  # as skimage: keeps log() finite on black pixels

# Hue rotation about the grey axis k = (1, 1, 1)/sqrt(3) (Rodrigues: cos I + sin [k]x + (1 - cos) k k^T)
_GREY_AXIS_OUTER = torch.full((3, 3), 1.0 / 3.0)
_GREY_AXIS_CROSS = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / math.sqrt(3.0)

# torchvision's RandomErasing aspect-ratio range
_ERASE_LOG_RATIO = (math.log(0.3), math.log(3.3))
_CROP_ATTEMPTS = 10


def _probability(name: str, value: Any) -> float:
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}") from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return p


def _bounded(name: str, value: Any, low: float, high: float = math.inf) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}") from None
    if not low <= v <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")
    return v


def _interval(
    name: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False
) -> tuple[float, float]:
    """Validate a ``(min, max)`` pair with ``low <(=) min <= max <= high``."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (min, max) pair of numbers, got {value!r}") from None
    if not ((lo > low if open_low else lo >= low) and lo <= hi <= high):
        op = "<" if open_low else "<="
        raise ValueError(f"{name} must satisfy {low} {op} min <= max <= {high}, got {value!r}")
    return lo, hi


def _channel_triple(name: str, value: Any, *, positive: bool) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 numbers (R, G, B), got {value!r}") from None
    if len(triple) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in triple):
        kind = "positive " if positive else ""
        raise ValueError(f"{name} must be 3 finite {kind}numbers (R, G, B), got {value!r}")
    return triple  # type: ignore[return-value]


@dataclass(frozen=True)
class AugmentParams:
    """How one training view is made from a tile. Every ``p_*`` is the probability, in [0, 1], that
    its transform is applied to a view; intensities act on RGB scaled to [0, 1].

    out_size:       output side in px.
    crop_scale:     random resized crop area as a fraction of the tile, (min, max) in (0, 1].
    crop_ratio:     crop aspect ratio w/h, (min, max); log-uniform.
    p_crop:         random resized crop; otherwise the whole tile is resized to ``out_size``.
    p_flip:         horizontal flip, and independently vertical flip, each with this probability.
    p_rot90:        rotation by k * 90° with k uniform in {1, 2, 3}.
    p_color_jitter: brightness/contrast/saturation factors uniform in [1 - x, 1 + x] (x in [0, 1]) and
                    a hue rotation uniform in [-hue, hue] turns (hue in [0, 0.5]), in random order.
    p_hed_jitter:   stain jitter in Ruifrok-Johnston HED space: each stain's optical density is
                    scaled by 1 + N(0, hed_sigma) and shifted by N(0, hed_bias) OD.
    p_blur:         Gaussian blur, sigma uniform in ``blur_sigma`` px, kernel 2 * ceil(3 sigma) + 1.
    p_noise:        additive Gaussian noise, std uniform in ``noise_std`` (on [0, 1] images).
    p_erase:        random erasing of a rectangle of area fraction uniform in ``erase_scale``, filled
                    with 0 after normalisation (the mean colour).
    mean, std:      per-channel normalisation of the [0, 1] image (ImageNet by default).
    """

    out_size: int = 224
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    p_crop: float = 1.0
    p_flip: float = 0.5
    p_rot90: float = 0.5
    p_color_jitter: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    p_hed_jitter: float = 0.5
    hed_sigma: float = 0.05
    hed_bias: float = 0.02
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    p_noise: float = 0.2
    noise_std: tuple[float, float] = (0.0, 0.03)
    p_erase: float = 0.2
    erase_scale: tuple[float, float] = (0.02, 0.1)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if isinstance(self.out_size, bool) or not isinstance(self.out_size, int) or self.out_size < 1:
            raise ValueError(f"out_size must be a positive int (px), got {self.out_size!r}")
        # normalise lists (YAML/JSON) to tuples and ints to floats so instances compare and hash
        checked: dict[str, Any] = {
            "crop_scale": _interval("crop_scale", self.crop_scale, 0.0, 1.0, open_low=True),
            "crop_ratio": _interval("crop_ratio", self.crop_ratio, 0.0, open_low=True),
            "brightness": _bounded("brightness", self.brightness, 0.0, 1.0),
            "contrast": _bounded("contrast", self.contrast, 0.0, 1.0),
            "saturation": _bounded("saturation", self.saturation, 0.0, 1.0),
            "hue": _bounded("hue", self.hue, 0.0, 0.5),
            "hed_sigma": _bounded("hed_sigma", self.hed_sigma, 0.0, 1.0),
            "hed_bias": _bounded("hed_bias", self.hed_bias, 0.0, 1.0),
            # reflect padding of ceil(3 sigma) px must stay inside the image
            "blur_sigma": _interval(
                "blur_sigma", self.blur_sigma, 0.0, (self.out_size - 1) / 3, open_low=True
            ),
            "noise_std": _interval("noise_std", self.noise_std, 0.0, 1.0),
            "erase_scale": _interval("erase_scale", self.erase_scale, 0.0, 1.0, open_low=True),
            "mean": _channel_triple("mean", self.mean, positive=False),
            "std": _channel_triple("std", self.std, positive=True),
        }
        for f in fields(self):
            if f.name.startswith("p_"):
                checked[f.name] = _probability(f.name, getattr(self, f.name))
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AugmentParams:
        """Build from a config mapping; missing keys take defaults, unknown keys are an error."""
        if not isinstance(d, Mapping):
            raise ValueError(f"augment parameters must be a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown AugmentParams keys: {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (tuples stay tuples); ``from_dict(to_dict())`` round-trips."""
        return asdict(self)


# -- random draws, all from the caller's generator (None: torch's default, seeded per worker) -----


def _uniform(g: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * torch.rand(1, generator=g).item()


def _randint(g: torch.Generator | None, low: int, high: int) -> int:
    """Uniform int in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=g).item())


def _coin(g: torch.Generator | None, p: float) -> bool:
    # rand is in [0, 1): p=0 never fires, p=1 always does
    return torch.rand(1, generator=g).item() < p


# -- tensor plumbing shared by HEAugment and EvalTransform -----------------------------------------


def _as_uint8_tensor(x: np.ndarray | torch.Tensor, ndims: tuple[int, ...]) -> torch.Tensor:
    """uint8 ``(..., H, W, 3)`` array or tensor -> tensor, without copying when possible."""
    if isinstance(x, np.ndarray):
        # torch.from_numpy rejects negative strides and warns on read-only arrays (e.g. memory maps)
        x = torch.from_numpy(np.require(x, requirements=("C", "W")))
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim not in ndims or x.shape[-1] != 3:
        shape = "(H, W, 3)" if ndims == (3,) else "(H, W, 3) or (N, H, W, 3)"
        got = f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
        raise ValueError(f"expected a uint8 RGB tile of shape {shape}, got {got}")
    return x


def _to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> contiguous float32 in [0, 1]; a new tensor, so later in-place ops are safe."""
    return x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def _affine_normalizer(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x - mean) / std`` as ``(scale, offset)`` of shape ``(3, 1, 1)``, for one fused addcmul."""
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return 1.0 / std_t, -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 ``(3, H, W)`` or ``(N, 3, H, W)`` to ``size x size``
    (returns ``x`` itself when it already has that size). Done in uint8, as PIL does: torch's
    uint8 kernel is ~3x faster than float32 and costs at most 0.5/255 of rounding."""
    if x.shape[-2:] == (size, size):
        return x
    batch = x if x.ndim == 4 else x[None]
    if batch.device.type == "cpu":
        out = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    else:  # CUDA has no uint8 kernel for this: float, rounded back to uint8 as the CPU's does
        out = F.interpolate(batch.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out if x.ndim == 4 else out[0]


# -- the transforms: (3, H, W) float32 in [0, 1] unless stated -------------------------------------


def _crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    g: torch.Generator | None,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, h, w)`` in px, as torchvision draws it."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(_CROP_ATTEMPTS):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(g, 0, height - h + 1), _randint(g, 0, width - w + 1), h, w
    # no fit (extreme tile shape vs ratio): centre crop with the aspect ratio clamped into range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _rotate_hue(x: torch.Tensor, turns: float) -> torch.Tensor:
    """Shift hue by ``turns`` (1 = 360°, positive R -> G -> B like HSV) by rotating RGB about the
    grey axis, clamped to [0, 1]. One 3x3 matmul: ~20x cheaper than torchvision's HSV round trip
    (which dominated the per-view cost); unlike it, this keeps the mean of R, G, B rather than max/min."""
    angle = 2.0 * math.pi * turns
    rot = (
        math.cos(angle) * torch.eye(3)
        + math.sin(angle) * _GREY_AXIS_CROSS
        + (1.0 - math.cos(angle)) * _GREY_AXIS_OUTER
    )
    return (rot @ x.reshape(3, -1)).reshape(x.shape).clamp_(0.0, 1.0)


def _color_jitter(x: torch.Tensor, factors: Sequence[float], order: Sequence[int]) -> torch.Tensor:
    """torchvision's ColorJitter (but hue via :func:`_rotate_hue`): brightness, contrast, saturation
    factors and hue turns ``factors``, applied in ``order`` (indices into them)."""
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, _rotate_hue)
    for i in order:
        x = ops[i](x, factors[i])
    return x


def _rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """RGB ``(3, H, W)`` in [0, 1] -> stain amounts ``(3, H, W)`` (H, E, DAB) in optical density.

    ``skimage.color.rgb2hed`` (since 0.19) is this divided by ``-log(1e-6)`` and clipped at 0; the
    clip is left out so that :func:`_hed_to_rgb` inverts this exactly."""
    od = rgb.clamp(min=_RGB_FLOOR).log_().neg_()
    return (_HED_FROM_OD @ od.reshape(3, -1)).reshape(rgb.shape)


def _hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Stain amounts ``(3, H, W)`` in OD -> RGB in [0, 1] (``skimage.color.hed2rgb`` up to its
    ``-log(1e-6)`` scaling of the stain axis)."""
    od = (_OD_FROM_HED @ hed.reshape(3, -1)).reshape(hed.shape)
    return od.neg_().exp_().clamp_(0.0, 1.0)


def _hed_jitter(x: torch.Tensor, scale: Sequence[float], shift: Sequence[float]) -> torch.Tensor:
    """Per-stain OD scale and shift (Tellez et al. 2018, whose skimage still returned plain OD);
    :meth:`HEAugment.draw` draws ``scale`` as 1 + N(0, hed_sigma) and ``shift`` as N(0, hed_bias)."""
    scale_t = torch.tensor(scale, dtype=torch.float32, device=x.device).view(3, 1, 1)
    shift_t = torch.tensor(shift, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return _hed_to_rgb(torch.addcmul(shift_t, _rgb_to_hed(x), scale_t))


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """torchvision's gaussian_blur (reflect padding, odd kernel 2 * ceil(3 sigma) + 1) done as two
    1-D passes of shifted multiply-adds: about twice as fast as its depthwise conv2d on CPU."""
    half = math.ceil(3 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=torch.float64) / sigma) ** 2)
    taps = (taps / taps.sum()).tolist()
    height, width = x.shape[-2:]
    padded = F.pad(x[None], (half, half, half, half), mode="reflect")[0]
    rows = padded[..., :width] * taps[0]
    for i, tap in enumerate(taps[1:], start=1):
        rows.add_(padded[..., i : i + width], alpha=tap)
    out = rows[..., :height, :] * taps[0]
    for i, tap in enumerate(taps[1:], start=1):
        out.add_(rows[..., i : i + height, :], alpha=tap)
    return out


def _noise_field(shape: torch.Size, seed: int, device: torch.device) -> torch.Tensor:
    """N(0, 1) of ``shape`` from a generator of ``device`` seeded with ``seed`` (CPU and CUDA draw
    different fields from one seed: the same distribution)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device)


def _gaussian_noise(x: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    return x.add(_noise_field(x.shape, seed, x.device), alpha=std).clamp_(0.0, 1.0)


def _erase_box(height: int, width: int, scale: tuple[float, float],
               g: torch.Generator | None) -> tuple[int, int, int, int]:
    """The rectangle ``(top, left, h, w)`` random erasing fills. Clamped to the image rather than
    redrawn, so ``p_erase`` is exactly the erase rate."""
    area = height * width * _uniform(g, *scale)
    aspect = math.exp(_uniform(g, *_ERASE_LOG_RATIO))
    h = min(max(round(math.sqrt(area * aspect)), 1), height)
    w = min(max(round(math.sqrt(area / aspect)), 1), width)
    return _randint(g, 0, height - h + 1), _randint(g, 0, width - w + 1), h, w


def _erase(x: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Zero the rectangle ``box`` of ``x`` in place (``x`` is normalised, so 0 is the mean colour)."""
    top, left, h, w = box
    x[..., top : top + h, left : left + w] = 0.0
    return x


@dataclass(frozen=True)
class ViewDraw:
    """Every random choice behind one training view, as :meth:`HEAugment.draw` makes them; applying
    a draw (:meth:`HEAugment.apply`, :meth:`HEAugment.apply_batch`) is deterministic.

    crop:   ``(top, left, h, w)`` in tile px, or None (the whole tile is resized).
    hflip, vflip, rot90: flips, then ``rot90`` quarter turns (0-3).
    jitter: brightness, contrast, saturation factors and hue turns, applied in ``jitter_order``
            (indices into those four); None: no colour jitter.
    hed:    per-stain OD scale and shift, ``((H, E, DAB), (H, E, DAB))``; None: no stain jitter.
    blur:   Gaussian sigma in px, or None.
    noise:  ``(std, seed)`` of the additive N(0, std) field, or None.
    erase:  ``(top, left, h, w)`` in output px, or None.
    """

    crop: tuple[int, int, int, int] | None
    hflip: bool
    vflip: bool
    rot90: int
    jitter: tuple[float, float, float, float] | None
    jitter_order: tuple[int, ...]
    hed: tuple[tuple[float, ...], tuple[float, ...]] | None
    blur: float | None
    noise: tuple[float, int] | None
    erase: tuple[int, int, int, int] | None


_JITTER_CENTRES = (1.0, 1.0, 1.0, 0.0)


class HEAugment:
    """One random training view of an H&E tile.

    ``HEAugment(params)(tile, generator)`` maps a uint8 ``(H, W, 3)`` RGB tile (NumPy or torch, any
    size) to a normalised float32 ``(3, out_size, out_size)`` tensor. Steps, each with its
    probability: random resized crop (else resize), h/v flips, rot90, colour jitter, HED jitter,
    blur, noise, normalisation, random erasing. With every probability 0 the result equals
    :class:`EvalTransform` of the tile. Picklable, so it can be handed to DataLoader workers.

    A view is :meth:`draw` (all random choices, from the generator alone; no pixel is read) then
    :meth:`apply`. :meth:`apply_batch` applies many draws at once on the tiles' device (a GPU
    decoding the stored JPEG bytes itself): the same operations, so on one device it gives
    :meth:`apply`'s views (to float rounding), and on another the same views except for the
    noise field, which each device's generator draws from the view's noise seed.
    """

    def __init__(self, params: AugmentParams) -> None:
        self.params = params
        self._scale, self._offset = _affine_normalizer(params.mean, params.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"

    def __call__(
        self, tile: np.ndarray | torch.Tensor, generator: torch.Generator | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The view; ``out``: a float32 ``(3, out_size, out_size)`` tensor to write it into."""
        x = _as_uint8_tensor(tile, (3,)).permute(2, 0, 1)  # (3, H, W) view
        return self.apply(x, self.draw(x.shape[1], x.shape[2], generator), out)

    def draw(self, height: int, width: int, generator: torch.Generator | None = None) -> ViewDraw:
        """The random choices for one view of a ``height x width`` px tile."""
        p, g = self.params, generator
        crop = _crop_box(height, width, p.crop_scale, p.crop_ratio, g) if _coin(g, p.p_crop) else None
        hflip, vflip = _coin(g, p.p_flip), _coin(g, p.p_flip)
        rot90 = _randint(g, 1, 4) if _coin(g, p.p_rot90) else 0
        jitter, order = None, ()
        if _coin(g, p.p_color_jitter):
            strengths = (p.brightness, p.contrast, p.saturation, p.hue)
            jitter = tuple(_uniform(g, c - s, c + s) for c, s in zip(_JITTER_CENTRES, strengths))
            order = tuple(i for i in torch.randperm(4, generator=g).tolist() if strengths[i] > 0)
        hed = None
        if _coin(g, p.p_hed_jitter):
            scale = (1.0 + p.hed_sigma * torch.randn(3, generator=g)).tolist()
            hed = (tuple(scale), tuple((p.hed_bias * torch.randn(3, generator=g)).tolist()))
        blur = _uniform(g, *p.blur_sigma) if _coin(g, p.p_blur) else None
        noise = None
        if _coin(g, p.p_noise):
            noise = (_uniform(g, *p.noise_std), int(torch.randint(2**62, (1,), generator=g).item()))
        erase = _erase_box(p.out_size, p.out_size, p.erase_scale, g) if _coin(g, p.p_erase) else None
        return ViewDraw(crop, hflip, vflip, rot90, jitter, order, hed, blur, noise, erase)  # type: ignore[arg-type]

    def apply(self, x: torch.Tensor, d: ViewDraw, out: torch.Tensor | None = None) -> torch.Tensor:
        """The view ``d`` of the uint8 ``(3, H, W)`` tile ``x``: float32 ``(3, out_size, out_size)``
        (written into ``out`` when given)."""
        x = self._geometry(x, d)
        x = _to_unit_float(x)
        if d.jitter is not None:
            x = _color_jitter(x, d.jitter, d.jitter_order)
        if d.hed is not None:
            x = _hed_jitter(x, *d.hed)
        if d.blur is not None:
            x = _gaussian_blur(x, d.blur)
        if d.noise is not None:
            x = _gaussian_noise(x, *d.noise)
        x = torch.addcmul(self._offset.to(x.device), x, self._scale.to(x.device), out=out)
        if d.erase is not None:
            x = _erase(x, d.erase)
        return x

    def _geometry(self, x: torch.Tensor, d: ViewDraw) -> torch.Tensor:
        # on uint8 (a quarter of the bytes); it commutes with the conversion to float
        if d.crop is not None:
            top, left, h, w = d.crop
            x = x[:, top : top + h, left : left + w]
        x = _resize(x, self.params.out_size)
        if d.hflip:
            x = x.flip(-1)
        if d.vflip:
            x = x.flip(-2)
        if d.rot90:
            x = torch.rot90(x, d.rot90, dims=(-2, -1))
        return x

    def apply_batch(self, tiles: torch.Tensor | Sequence[torch.Tensor], draws: Sequence[ViewDraw],
                    tile_of_view: Sequence[int] | None = None) -> torch.Tensor:
        """The views ``draws`` of uint8 tiles ``(M, 3, H, W)`` (or a list of ``(3, H, W)``), all on one
        device, as float32 ``(N, 3, out_size, out_size)`` there; view ``i`` is of tile
        ``tile_of_view[i]`` (default ``i``).

        Crops and resizes go view by view (each crop has its own size); everything after is done
        for all views that take a step at once, with per-view factors."""
        n = len(draws)
        which = range(n) if tile_of_view is None else tile_of_view
        size = self.params.out_size
        if n == 0:
            device = tiles[0].device if len(tiles) else torch.device("cpu")
            return torch.empty((0, 3, size, size), device=device)
        views = [self._geometry(tiles[t], d) for t, d in zip(which, draws)]
        x = torch.stack(views).to(torch.float32).div_(255.0)
        dev = x.device

        def rows(pick) -> torch.Tensor:
            return torch.tensor([i for i, d in enumerate(draws) if pick(d)], dtype=torch.long, device=dev)

        factors = torch.tensor([d.jitter or _JITTER_CENTRES for d in draws], device=dev)  # (n, 4)
        # the k-th op of each jittered view, in that view's order: views sharing it at step k go together
        for step in range(4):
            for op in range(4):
                idx = rows(lambda d: len(d.jitter_order) > step and d.jitter_order[step] == op)
                if len(idx):
                    x[idx] = _BATCH_JITTER[op](x[idx], factors[idx, op])
        idx = rows(lambda d: d.hed is not None)
        if len(idx):
            hed = torch.tensor([d.hed for d in draws if d.hed is not None], device=dev)  # (k, 2, 3)
            x[idx] = _hed_jitter_batch(x[idx], hed[:, 0], hed[:, 1])
        idx = rows(lambda d: d.blur is not None)
        if len(idx):
            x[idx] = _gaussian_blur_batch(x[idx], [d.blur for d in draws if d.blur is not None])
        for i, d in enumerate(draws):
            if d.noise is not None:
                x[i] = _gaussian_noise(x[i], *d.noise)
        x = torch.addcmul(self._offset.to(dev), x, self._scale.to(dev))
        idx = rows(lambda d: d.erase is not None)
        if len(idx):
            boxes = torch.tensor([d.erase for d in draws if d.erase is not None], device=dev)
            x[idx] = x[idx].masked_fill_(_box_masks(boxes, size)[:, None], 0.0)
        return x


# -- batched forms of the photometric steps: (k, 3, H, W) float32, per-view factors (k,) ----------


def _per_view(f: torch.Tensor) -> torch.Tensor:
    return f.to(torch.float32).view(-1, 1, 1, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)  # torchvision's weights
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend_batch(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    r = _per_view(ratio)
    return (x * r).add_(other * (1.0 - r)).clamp_(0.0, 1.0)


def _brightness_batch(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _per_view(f)).clamp_(0.0, 1.0)


def _contrast_batch(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend_batch(x, _grey(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def _saturation_batch(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend_batch(x, _grey(x), f)


def _hue_batch(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    angle = (2.0 * math.pi) * turns.to(torch.float32).view(-1, 1, 1)
    cross, outer = _GREY_AXIS_CROSS.to(x.device), _GREY_AXIS_OUTER.to(x.device)
    rot = torch.cos(angle) * torch.eye(3, device=x.device) + torch.sin(angle) * cross + (1.0 - torch.cos(angle)) * outer
    return torch.bmm(rot, x.reshape(len(x), 3, -1)).reshape(x.shape).clamp_(0.0, 1.0)


_BATCH_JITTER = (_brightness_batch, _contrast_batch, _saturation_batch, _hue_batch)


def _hed_jitter_batch(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """:func:`_hed_jitter` of each view with its own ``scale``, ``shift`` ``(k, 3)``."""
    od = x.clamp(min=_RGB_FLOOR).log_().neg_().reshape(len(x), 3, -1)
    hed = torch.matmul(_HED_FROM_OD.to(x.device), od)
    hed = torch.addcmul(shift[..., None], hed, scale[..., None])
    return torch.matmul(_OD_FROM_HED.to(x.device), hed).reshape(x.shape).neg_().exp_().clamp_(0.0, 1.0)


def _gaussian_blur_batch(x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """:func:`_gaussian_blur` of each view with its own sigma: one depthwise convolution per axis,
    every view's kernel zero-padded to the widest (reflect padding by the widest half gives each
    narrower kernel the same neighbours as its own padding would)."""
    halves = [math.ceil(3 * s) for s in sigmas]
    half = max(halves)
    taps = torch.zeros(len(sigmas), 2 * half + 1, dtype=torch.float64)
    for i, (s, h) in enumerate(zip(sigmas, halves)):
        t = torch.exp(-0.5 * (torch.arange(-h, h + 1, dtype=torch.float64) / s) ** 2)
        taps[i, half - h : half + h + 1] = t / t.sum()
    k, c, height, width = x.shape
    weight = taps.to(torch.float32).repeat_interleave(c, dim=0).to(x.device)  # (k*c, K)
    padded = F.pad(x, (half, half, half, half), mode="reflect").reshape(1, k * c, height + 2 * half, width + 2 * half)
    rows = F.conv2d(padded, weight[:, None, None, :], groups=k * c)
    out = F.conv2d(rows, weight[:, None, :, None], groups=k * c)
    return out.reshape(k, c, height, width)


def _box_masks(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``(k, size, size)`` bool: inside each ``(top, left, h, w)`` box."""
    r = torch.arange(size, device=boxes.device)
    top, left, h, w = (boxes[:, i, None] for i in range(4))
    inside_rows = (r >= top) & (r < top + h)
    inside_cols = (r >= left) & (r < left + w)
    return inside_rows[:, :, None] & inside_cols[:, None, :]


class EvalTransform:
    """Deterministic tile -> model input for kNN evaluation and feature extraction.

    Maps a uint8 ``(H, W, 3)`` tile or ``(N, H, W, 3)`` batch (NumPy or torch) to a normalised
    float32 ``(3, S, S)`` or ``(N, 3, S, S)`` tensor, ``S = out_size``. Resizes (antialiased
    bilinear) only when the tiles are not already ``S x S``; batches go through in one call.
    """

    def __init__(
        self,
        out_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if isinstance(out_size, bool) or not isinstance(out_size, int) or out_size < 1:
            raise ValueError(f"out_size must be a positive int (px), got {out_size!r}")
        self.out_size = out_size
        self.mean = _channel_triple("mean", mean, positive=False)
        self.std = _channel_triple("std", std, positive=True)
        self._scale, self._offset = _affine_normalizer(self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(out_size={self.out_size}, mean={self.mean}, std={self.std})"

    def __call__(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = _as_uint8_tensor(tiles, (3, 4)).movedim(-1, -3)  # (..., 3, H, W) view
        return torch.addcmul(self._offset, _to_unit_float(_resize(x, self.out_size)), self._scale)
