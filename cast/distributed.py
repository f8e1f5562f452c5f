"""One image, several processes: tiles dealt to ranks, sums all-reduced (SPEC §5).

``torchrun`` starts one process per GPU (NCCL) or per CPU share (gloo); every rank holds the
whole image, computes the statistics and gradients of its own tiles, and takes part in one
all-reduce per pass, so every rank steps its optimiser identically.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import CastError, RankError

# What torchrun sets for every process; all of them or none.
ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Seconds a collective (or joining the group) may wait for the other ranks before this one stops.
TIMEOUT_VARIABLE = "CAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300
BLOCKING_WAIT = "TORCH_NCCL_BLOCKING_WAIT"
# How many groups this process has made, the same count on every rank: their keys' prefix.
_GROUPS_MADE = itertools.count()


class LostContact(RankError):
    """Another rank died or stopped answering."""


@dataclass(frozen=True)
class Shard:
    """This process's share of the work: rank ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1
    callers_group: bool = False  # the caller's process group: its timeout is theirs, not ours

    @property
    def main(self) -> bool:
        """Rank 0 shows progress and writes files."""
        return self.rank == 0

    def mine(self, tiles: Sequence) -> Sequence:
        """The tiles this rank computes: every ``world``-th, starting at ``rank``."""
        return tiles[self.rank :: self.world]

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over all ranks, in place."""
        if self.world > 1:
            try:
                dist.all_reduce(tensor)
            except RuntimeError as err:  # gloo and NCCL errors, timeouts included
                reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else "no reason"
                waited = (
                    "your process group's timeout (init_process_group's timeout=)"
                    if self.callers_group
                    else f"{_timeout()} s (${TIMEOUT_VARIABLE})"
                )
                raise LostContact(
                    f"rank {self.rank} of {self.world} lost contact with the other processes "
                    f"({reason}); a rank died or hung longer than {waited}; rerun"
                ) from None
        return tensor

    def gather(self, values: Tensor) -> Tensor:
        """Every rank's ``values`` (on the run's device), stacked in rank order."""
        every = values.new_zeros(self.world, *values.shape)
        every[self.rank] = values
        return self.all_reduce(every)

    def least(self, device: torch.device, value: float | None) -> float | None:
        """The smallest of every rank's ``value`` (``None``: unknown, no bound)."""
        mine = torch.tensor(math.inf if value is None else value, dtype=torch.float64,
                            device=device)  # fmt: skip
        least = float(self.gather(mine).min())
        return None if least == math.inf else least

    def check_same(self, device: torch.device, given: dict[str, object]) -> None:
        """Every rank was given the same of each of ``given`` (named as the error says it,
        "another content image"): the ranks add up their sums, so a rank with another photo
        would mix two problems into one image, and one with another size or step count would
        send collectives the others do not expect."""
        mine = [fingerprint(value) for value in given.values()]
        every = self.gather(torch.tensor(mine, dtype=torch.int64, device=device)).tolist()
        for rank in range(1, self.world):
            differ = [name for name, a, b in zip(given, every[0], every[rank], strict=True)
                      if a != b]  # fmt: skip
            if differ:
                raise CastError(
                    f"rank {rank} was given {' and '.join(differ)} than rank 0; every rank must "
                    "run the same command on the same files"
                )

    def all_reduce_store(self, store):
        """A store (``cast.ondisk``) summed over all ranks, a chunk of rows at a time, so a
        store on disk stays there; each rank wrote or added its own tiles' part."""
        if self.world > 1:
            for rows in store.chunks():
                store.write(rows, self.all_reduce(store.read(rows).contiguous()))
        return store


ALONE = Shard()


def fingerprint(value) -> int:
    """A 63-bit hash of ``value``: tensors by their dtype, shape and bytes, ``bytes`` as they
    are, lists and tuples item by item, anything else by its ``repr``."""
    digest = hashlib.blake2b(digest_size=8)

    def add(item) -> None:
        if isinstance(item, Tensor):
            item = item.detach().cpu().contiguous()
            digest.update(repr((item.dtype, tuple(item.shape))).encode())
            digest.update(item.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(item, bytes):  # a file's: its repr would be four times its size
            digest.update(b"bytes %d\0" % len(item) + item)
        elif isinstance(item, (list, tuple)):
            digest.update(b"(")
            for part in item:
                add(part)
            digest.update(b")")
        else:
            digest.update(repr(item).encode() + b"\0")

    add(value)
    return int.from_bytes(digest.digest(), "little") >> 1


@contextmanager
def join(device: torch.device) -> Iterator[tuple[Shard, torch.device]]:
    """This process's shard and its device (``cuda:LOCAL_RANK`` for CUDA) for the length of a
    run. Inside a process group the caller initialised, the run uses it (every rank must call
    ``stylize`` with the same arguments: its all-reduces take their turn among the caller's)
    and leaves it as it was; when torchrun started the process without one, the run makes its
    own, NCCL on GPUs and gloo on CPUs, and destroys it at the end."""
    callers = dist.is_available() and dist.is_initialized()
    rank, world, local = _callers_group(device) if callers else _torchrun()
    if world == 1:
        yield ALONE, device
        return
    with _local_gpu(device, local) as device:
        if not callers:
            _make_group(device, rank, world)
        try:
            yield Shard(rank, world, callers_group=callers), device
        finally:
            if not callers:
                dist.destroy_process_group()


def _torchrun() -> tuple[int, int, int]:
    """RANK, WORLD_SIZE and LOCAL_RANK as torchrun sets them; one process without them. What is
    wrong with them is this process's own (``RankError``): a rank out of range is alone in it."""
    present = [name for name in ENVIRONMENT if name in os.environ]
    if not present:
        return 0, 1, 0
    if len(present) < len(ENVIRONMENT):
        missing = [name for name in ENVIRONMENT if name not in os.environ]
        raise RankError(
            f"{', '.join(present)} set but not {', '.join(missing)}: launch with torchrun "
            "(it sets them all) or unset them to run one process"
        )
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise RankError("RANK and WORLD_SIZE must be whole numbers") from None
    if not 0 <= rank < world:  # else the rendezvous waits for ranks that never come
        raise RankError(
            f"RANK={rank} with WORLD_SIZE={world}: a rank runs from 0 to WORLD_SIZE - 1; launch "
            "with torchrun (it sets them all) or unset them to run one process"
        )
    return rank, world, _local_rank() or 0


def _callers_group(device: torch.device) -> tuple[int, int, int | None]:
    """Rank and world of the process group the caller initialised, which must agree with
    torchrun's RANK and WORLD_SIZE where they are set and carry ``device``'s tensors; and
    LOCAL_RANK, where set."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for name, value in (("RANK", rank), ("WORLD_SIZE", world)):
        if os.environ.get(name, str(value)) != str(value):
            raise CastError(
                f"the process group has {name.lower().replace('_', ' ')} {value} but "
                f"{name}={os.environ[name]}: initialise it from torchrun's environment"
            )
    config = dist.get_backend_config()  # "cpu:gloo,cuda:gloo", "cuda:nccl", ...
    devices = [pair.split(":")[0] for pair in config.split(",")]
    if world > 1 and device.type not in devices:
        raise CastError(
            f"the process group's backend ({config}) cannot all-reduce {device.type} tensors: "
            "initialise it with init_process_group('cpu:gloo,cuda:nccl'), which carries both, "
            f"or run stylize on {' or '.join(devices)}"
        )
    return rank, world, _local_rank()


def _local_rank() -> int | None:
    """torchrun's LOCAL_RANK, where set: which of the machine's GPUs is this process's."""
    try:
        return int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
    except ValueError:
        raise RankError("LOCAL_RANK must be a whole number") from None


@contextmanager
def _local_gpu(device: torch.device, local: int | None) -> Iterator[torch.device]:
    """``cuda:LOCAL_RANK`` as the current device during the run, as a torchrun process wants
    it; the caller's current device back after."""
    if device.type != "cuda" or local is None:
        yield device
        return
    before = torch.cuda.current_device()
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    try:
        yield device
    finally:
        torch.cuda.set_device(before)


def _make_group(device: torch.device, rank: int, world: int) -> None:
    """The default process group, NCCL for a GPU and gloo for the CPU."""
    # NCCL reads it when the group is made (ProcessGroupNCCL's constructor), so that timeouts
    # raise, not hang; the caller's environment is theirs again after
    blocking = device.type == "cuda" and BLOCKING_WAIT not in os.environ
    if blocking:
        os.environ[BLOCKING_WAIT] = "1"
    timeout = datetime.timedelta(seconds=_timeout())
    try:
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        # each group its own keys: torchrun's store outlives a group, and a default group made
        # again finds the last one's addresses under the same keys (the ranks hang or fail)
        store = dist.PrefixStore(f"cast/{next(_GROUPS_MADE)}/", store)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=store, rank=rank, world_size=world, timeout=timeout,
        )  # fmt: skip
    except (RuntimeError, ValueError) as err:
        raise LostContact(f"rank {rank} could not join the other {world - 1}: {err}") from None
    finally:
        if blocking:
            del os.environ[BLOCKING_WAIT]


def _timeout() -> float:
    value = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise CastError(f"{TIMEOUT_VARIABLE} must be a positive number of seconds, got {value!r}")
    return seconds
