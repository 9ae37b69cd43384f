"""Argument types of every ``hlss`` subcommand: each parses and checks one kind of value.

Used as argparse ``type=``, so a bad value is refused before any work, with exit status 2 and a
message naming the option, the value and what is allowed (``argparse.ArgumentTypeError``). Nothing
here imports torch unless a CUDA or MPS device is asked for.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from hlss_model.checks import check_device_name, check_readable_file, check_weights_file
from pipeline.escape import terminal
from pipeline.run_folder import is_run_folder

if TYPE_CHECKING:
    from hlss_model.settings import EncoderSpec

__all__ = ["positive_int", "int_in", "positive_float", "float_in", "device", "devices", "weights_file",
           "encoder_spec", "flow_encoder_spec", "checkpoints_file", "tile_filter", "compression", "count_range", "readable_file", "cron",
           "as_text"]

_Bad = argparse.ArgumentTypeError


def _int(text: str, allowed: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise _Bad(f"{text!r} is not an integer; expected {allowed}") from None


def as_text(parse: Callable[[str], object]) -> Callable[[str], str]:
    """A type that checks its value with ``parse`` and keeps the text (for values handed on as strings)."""
    def check(text: str) -> str:
        parse(text)
        return text
    check.__name__ = parse.__name__
    return check


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, workers, threads, k, steps)."""
    value = _int(text, "a positive integer")
    if value < 1:
        raise _Bad(f"{value} is not a positive integer (1, 2, ...)")
    return value


def int_in(lo: int, hi: int, unit: str = "") -> Callable[[str], int]:
    """An integer in ``[lo, hi]``."""
    return _in_range(_int, "an integer", lo, hi, unit, f"int_in_{lo}_{hi}")


def _in_range(convert: Callable[[str, str], float], kind: str, lo: float, hi: float, unit: str,
              name: str) -> Callable[[str], float]:
    """A type converting with ``convert(text, allowed)``, then refusing values outside ``[lo, hi]``."""
    span = f"{lo:g}-{hi:g}{unit}"

    def parse(text: str):
        value = convert(text, f"{kind} in {span}")
        if not lo <= value <= hi:
            raise _Bad(f"{value:g} is outside {span}")
        return value
    parse.__name__ = name
    return parse


def _float(text: str, allowed: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise _Bad(f"{text!r} is not a number; expected {allowed}") from None
    if not math.isfinite(value):
        raise _Bad(f"{text!r} is not a finite number; expected {allowed}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (temperatures, µm per px)."""
    value = _float(text, "a number > 0")
    if value <= 0:
        raise _Bad(f"{value:g} must be > 0")
    return value


def float_in(lo: float, hi: float, unit: str = "") -> Callable[[str], float]:
    """A finite number in ``[lo, hi]``."""
    return _in_range(_float, "a number", lo, hi, unit, f"float_in_{lo:g}_{hi:g}")


def device(text: str) -> str:
    """A device that exists here: ``cuda`` or ``cuda:N`` without that CUDA device, or ``mps`` without
    MPS, is refused now rather than after the store is opened and the model built."""
    name = _checked(check_device_name, text)
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise _Bad(f"{name!r}: CUDA is not available on this machine; use auto or cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise _Bad(f"{name!r}: this machine has {torch.cuda.device_count()} CUDA devices (cuda:0 to "
                       f"cuda:{torch.cuda.device_count() - 1})")
    elif name == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise _Bad("'mps': Apple MPS is not available on this machine; use auto or cpu")
    return name


def devices(text: str) -> list[str]:
    """A comma-separated list of :func:`device` names, one extraction worker each (a name may
    repeat), or ``all``: every CUDA device of this machine."""
    if text.strip() == "all":
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            raise _Bad("'all': no CUDA device is visible on this machine; list devices, e.g. cpu,cpu")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    names = [name.strip() for name in text.split(",")]
    if "" in names:
        raise _Bad(f"{text!r}: expected DEVICE[,DEVICE...] (e.g. cuda:0,cuda:1) or all")
    return [device(name) for name in names]


def _checked(check: Callable[[str], object], text: str):
    """``check(text)``, its ValueError as a refused option value."""
    try:
        return check(text)
    except ValueError as e:
        raise _Bad(str(e)) from None


def readable_file(text: str) -> Path:
    """An existing, readable file."""
    return _checked(check_readable_file, text)


def weights_file(text: str) -> Path:
    """A local weights file we load: safetensors (``.safetensors``) or a torch checkpoint (.pt, .pth, .bin)."""
    return _checked(check_weights_file, text)


def encoder_spec(text: str) -> "EncoderSpec":
    """A registered name, ``timm:NAME[?OPTS][:WEIGHTS_FILE]``, ``hf-hub:ORG/NAME`` or an encoder YAML
    file as an :class:`hlss_model.settings.EncoderSpec` (the one encoder parser), its files checked."""
    from hlss_model.settings import EncoderSpec, read_encoder_file

    spec = _checked(EncoderSpec.parse, text)
    if spec.kind == "run":
        raise _Bad(f"{terminal(text)}: give a training run with --checkpoint RUN")
    if spec.weights:
        weights_file(spec.weights)
    if spec.kind == "yaml":
        _checked(read_encoder_file, spec.ref)
    return spec


def checkpoints_file(text: str) -> Path:
    """A checkpoints map: a YAML of registered encoder names to weights files (see
    :func:`hlss_model.encoder_zoo.read_checkpoints`)."""
    from hlss_model.encoder_zoo import read_checkpoints

    _checked(read_checkpoints, readable_file(text))
    return Path(text)


def flow_encoder_spec(text: str) -> str:
    """A flow's extra encoder, kept as text: ``timm:NAME[:WEIGHTS_FILE]`` (checked as
    :func:`encoder_spec`) or ``run:FOLDER`` (a training run folder, with its run.json)."""
    prefix, _, folder = text.partition(":")
    if prefix != "run":
        encoder_spec(text)
    elif not is_run_folder(folder):
        raise _Bad(f"{terminal(text)}: {terminal(folder)} is not a training run folder (no run.json)")
    return text


def tile_filter(text: str):
    """``min_focus=20,max_pen=0.05`` -> :class:`pipeline.qc.TileFilter` (finite numbers, known keys)."""
    from pipeline.qc import TileFilter

    limits = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        try:
            if not eq:
                raise ValueError
            limits[key.strip()] = float(value)
        except ValueError:
            raise _Bad(f"{part!r} is not KEY=NUMBER") from None
    try:
        return TileFilter.from_dict(limits)
    except ValueError as e:
        raise _Bad(str(e)) from None


def compression(text: str):
    """A tile compression name -> :class:`pipeline.codecs.TileCompression`."""
    from pipeline.codecs import TileCompression

    try:
        return TileCompression.from_name(text)
    except ValueError as e:
        raise _Bad(str(e)) from None


def count_range(text: str) -> tuple[int, int]:
    """``N`` or ``MIN-MAX`` (inclusive, 1 <= MIN <= MAX)."""
    lo, _, hi = text.partition("-")
    try:
        out = (int(lo), int(hi or lo))
    except ValueError:
        raise _Bad(f"{text!r}: expected a count N or a range MIN-MAX") from None
    if not 1 <= out[0] <= out[1]:
        raise _Bad(f"{text!r}: expected 1 <= MIN <= MAX")
    return out


def cron(text: str) -> str:
    """A cron schedule Prefect accepts (five fields, e.g. ``0 2 * * *``)."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=text)
    except ValueError:
        raise _Bad(f"{text!r} is not a cron schedule (five fields: minute hour day month weekday, "
                   "e.g. '0 2 * * *')") from None
    return text
