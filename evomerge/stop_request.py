"""Ctrl-C and SIGTERM as one stop request that no library can swallow.

Python raises KeyboardInterrupt wherever the main thread happens to be. Inside some library code
(pydantic serialising Prefect's context, for one) it comes out as a different exception, so the
CLI cannot rely on the exception type alone: the handler also records that a stop was asked for,
and whatever the run ends with after that is reported as an interruption.
"""

from __future__ import annotations

import signal

_requested = False


def install() -> None:
    """Route SIGINT and SIGTERM to a recorded KeyboardInterrupt (main thread only)."""

    def handler(signum, frame):
        global _requested
        _requested = True
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def requested() -> bool:
    """Whether Ctrl-C or SIGTERM arrived since ``install``."""
    return _requested
