"""The exit statuses of every ``hlss`` command (the one place they are defined).

Library code returns reports; the commands turn them into one of these.
"""

from __future__ import annotations

import sys

__all__ = ["OK", "SOME_FAILED", "USAGE", "OUTPUT_CLOSED", "UsageError", "status_of", "damaged_exit"]

OK = 0  # everything asked for was done
SOME_FAILED = 1  # some slides failed or are damaged; the rest is done (and written)
USAGE = 2  # unusable arguments, source, store or settings: refused before any work
OUTPUT_CLOSED = 128 + 13  # the reader of stdout went away (SIGPIPE), e.g. `hlss info S | head -1`


class UsageError(Exception):
    """A request the command refuses (exit :data:`USAGE`); the message says what is wrong."""


def status_of(some_failed: bool) -> int:
    """:data:`SOME_FAILED` when something failed (the rest done), else :data:`OK`."""
    return SOME_FAILED if some_failed else OK


def damaged_exit(n_damaged: int, store) -> int:
    """Exit 1 (with the hint to verify) when ``n_damaged`` slides were listed as damaged, else 0."""
    if not n_damaged:
        return OK
    print(f"hlss: {n_damaged} damaged slides (listed above); `hlss verify {store}` checks every chunk, "
          "--repair retiles them", file=sys.stderr)
    return SOME_FAILED
