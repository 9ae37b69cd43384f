"""``hlss encoders``: the registered patch encoders (:data:`hlss_model.encoder_zoo.ZOO`) as a table or JSON."""

from __future__ import annotations

import argparse
import json

from ..exit import OK

__all__ = ["add_parsers", "encoders"]

_COLUMNS = (("name", "name"), ("architecture", "architecture"), ("dim", "dim"), ("params", "params_m"),
            ("input px", "input_px"), ("µm/px", "mpp"), ("licence", "licence"), ("gated", "gated"),
            ("weights file looked for", "weights"))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``hlss encoders`` to ``hlss``'s subparsers."""
    p = sub.add_parser("encoders", help="the registered patch encoders: dimension, parameters, input size, "
                                        "training resolution, licence, gating and the weights file looked for")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=encoders)


def _cell(row: dict, key: str) -> str:
    if key == "params_m":
        return f"{row[key] / 1000:.2f}B" if row[key] >= 1000 else f"{row[key]:g}M"
    if key == "weights":
        return f"{row['hub']}/{row['weights_file']}"
    if key == "gated":
        return "yes" if row[key] else "no"
    if key == "mpp":
        return "-" if row[key] is None else f"{row[key]:g}"
    return str(row[key])


def encoders(args: argparse.Namespace) -> int:
    from hlss_model.encoder_zoo import encoder_table

    rows = encoder_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return OK
    cells = [[head for head, _ in _COLUMNS]] + [[_cell(r, key) for _, key in _COLUMNS] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    for line in cells:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    print("weights: --weights FILE, a --checkpoints YAML (name: file), else the hub (HF_HUB_OFFLINE=1: its "
          "cache only); --random-init for none")
    return OK
