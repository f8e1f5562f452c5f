"""Start-up of the ``cast`` command: a Ctrl-C while the package (and torch) loads."""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def _is_the_command() -> bool:
    """Whether this process is ``cast ...`` or ``python -m cast ...`` (not a library user)."""
    argv = getattr(sys, "orig_argv", sys.argv)
    as_module = any(a == "-m" and b == "cast" for a, b in zip(argv, argv[1:], strict=False))
    return as_module or os.path.basename(sys.argv[0]) == "cast"


def _interrupted(signum, frame) -> None:
    print("cast: interrupted while starting", file=sys.stderr)
    os._exit(130)  # nothing was written yet; no atexit handler has anything to do


@contextlib.contextmanager
def quiet_interrupts_while_starting():
    """For the command only: SIGINT exits 130 with one line until the block ends."""
    if not _is_the_command() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, _interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
