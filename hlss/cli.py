"""The ``hlss`` command: the top parser, the dispatch to the subcommands (:mod:`hlss.commands`) and
the errors every command shares.

Exit status (:mod:`hlss.exit`): 0 success, 1 some slides failed (the rest are written), 2 unusable
arguments, source or store (bad option values are refused before any work), 141 output closed early
(e.g. piped into ``head``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.escape import terminal

from .commands import GROUPS
from .exit import OUTPUT_CLOSED, USAGE, UsageError
from .options import resolve_store

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The ``hlss`` parser; each subcommand's namespace carries its ``func``."""
    from pipeline import __version__

    p = argparse.ArgumentParser(prog="hlss", description="Whole-slide images to a Zarr cohort store, and HLSS on it.")
    p.add_argument("--version", action="version", version=f"hlss-pipeline {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``hlss`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:  # bad values are refused here, before any work (hlss/argtypes.py)
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed the usage and the error (or the --help)
        return e.code if isinstance(e.code, int) else USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        resolve_store(args)
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not in the interpreter's exit
        return code
    except UsageError as e:
        print(f"hlss {args.command}: error: {terminal(e, newlines=True)}", file=sys.stderr)
        return USAGE
    except BrokenPipeError:
        return _output_closed()


def _output_closed() -> int:
    """The reader of stdout went away (``hlss info S | head -1``): stop quietly. Python's recipe:
    point stdout at devnull so the flush at exit does not raise a second time."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return OUTPUT_CLOSED


if __name__ == "__main__":
    sys.exit(main())
