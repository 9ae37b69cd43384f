"""Options shared by several ``hlss`` commands: the store, given the same way everywhere.

Every command that takes a store accepts it as a positional argument (the preferred form) and as
``--store`` (accepted for this release); giving both, different, is a usage error. ``hlss tile``'s
first positional is the source, so there the store is its second positional or ``--store``.
"""

from __future__ import annotations

import argparse

from .exit import UsageError

__all__ = ["STORE_HELP", "add_store", "resolve_store", "open_store"]

STORE_HELP = "store folder or URL (s3://bucket/path)"


def add_store(p: argparse.ArgumentParser, usage: str | None, help: str = STORE_HELP) -> None:
    """Add the store to ``p`` as an optional positional ``STORE`` and as ``--store STORE``.

    ``usage``: how the command is called with its store, for the error when none is given; None
    when the store may be left out (the command has a default). :func:`resolve_store` merges the two
    forms into ``args.store`` after parsing.
    """
    p.add_argument("store", nargs="?", metavar="STORE", help=help)
    p.add_argument("--store", dest="store_option", metavar="STORE", help="the store, as an option instead of the "
                                                                         "positional (both accepted)")
    p.set_defaults(store_usage=usage)


def resolve_store(args: argparse.Namespace) -> None:
    """Set ``args.store`` from the positional or ``--store``; UsageError when both are given and differ,
    or when a command that needs a store got neither. Commands without a store are left alone."""
    if not hasattr(args, "store_option"):
        return
    positional, option = args.store, args.store_option
    if positional and option and positional != option:
        raise UsageError(f"two stores given ({positional} and --store {option}); give one")
    args.store = positional or option
    if not args.store and args.store_usage:
        raise UsageError(f"give the store: {args.store_usage} (or --store STORE)")


def open_store(path: str):
    """The :class:`~pipeline.store.SlideStore` at ``path``; a store that cannot be opened is a usage error."""
    from pipeline.location import StoreError
    from pipeline.store import SlideStore

    try:
        return SlideStore(path)
    except (StoreError, OSError, KeyError, ValueError) as e:
        raise UsageError(str(e)) from e
