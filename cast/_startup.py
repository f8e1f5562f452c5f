"""Start-up of the ``cast`` command: Ctrl-C or SIGTERM while the package (and torch) loads; and
which of torchrun's processes speaks for the run."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

# What each signal's handler is until someone changes it: the command leaves a changed one be.
_UNCHANGED = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


def _is_the_command() -> bool:
    """Whether this process is ``cast ...`` or ``python -m cast ...`` (not a library user)."""
    argv = getattr(sys, "orig_argv", sys.argv)
    as_module = any(a == "-m" and b == "cast" for a, b in zip(argv, argv[1:], strict=False))
    return as_module or os.path.basename(sys.argv[0]) == "cast"


def rank() -> int:
    """torchrun's RANK of this process; 0 when it runs alone (or RANK is no number, which is
    cast.distributed's error)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_rank_zero() -> bool:
    """Whether this process reports for the run: it runs alone or as torchrun's rank 0, which
    writes the files. torchrun hands Ctrl-C and SIGTERM to every rank, and every rank plans
    alike: one line says it for all."""
    return rank() == 0


def is_first_on_machine() -> bool:
    """Whether this process reports errors in the command or the files for its machine: it runs
    alone or as torchrun's LOCAL_RANK 0 (rank 0 where LOCAL_RANK is not set). Every rank of a
    machine was given the same command and reads the same files, so meets those errors alike;
    another machine's files may differ, so its first rank says what it met there."""
    if "RANK" not in os.environ:  # alone, whatever LOCAL_RANK another launcher left
        return True
    try:
        return int(os.environ["LOCAL_RANK"]) == 0
    except KeyError:
        return is_rank_zero()
    except ValueError:  # cast.distributed's error: said by every rank
        return True


def _stopped(signum, frame) -> None:
    if is_rank_zero():
        stopped = "interrupted" if signum == signal.SIGINT else "terminated"
        print(f"cast: {stopped} while starting", file=sys.stderr)
    os._exit(128 + signum)  # nothing was written yet; no atexit handler has anything to do


@contextlib.contextmanager
def quiet_signals_while_starting():
    """For the command only: SIGINT and SIGTERM exit 130 and 143 with one line until the block
    ends (SIGTERM would end it silently, as if it had crashed)."""
    ours = [signum for signum, handler in _UNCHANGED.items()
            if _is_the_command() and signal.getsignal(signum) is handler]  # fmt: skip
    for signum in ours:
        signal.signal(signum, _stopped)
    try:
        yield
    finally:
        for signum in ours:
            signal.signal(signum, _UNCHANGED[signum])
