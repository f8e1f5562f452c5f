"""One image, several processes: tiles dealt to ranks, sums all-reduced (SPEC §5).

``torchrun`` starts one process per GPU (NCCL) or per CPU share (gloo); every rank holds the
whole image, computes the statistics and gradients of its own tiles, and takes part in one
all-reduce per pass, so every rank steps its optimiser identically.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import CastError

# What torchrun sets for every process; all of them or none.
ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Seconds a collective (or joining the group) may wait for the other ranks before this one stops.
TIMEOUT_VARIABLE = "CAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300


class LostContact(CastError):
    """Another rank died or stopped answering."""


@dataclass(frozen=True)
class Shard:
    """This process's share of the work: rank ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

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
                raise LostContact(
                    f"rank {self.rank} of {self.world} lost contact with the other processes "
                    f"({reason}); a rank died or hung longer than {_timeout()} s "
                    f"(${TIMEOUT_VARIABLE}); rerun"
                ) from None
        return tensor

    def all_reduce_store(self, store):
        """A store (``cast.ondisk``) summed over all ranks, a chunk of rows at a time, so a
        store on disk stays there; each rank wrote or added its own tiles' part."""
        if self.world > 1:
            for rows in store.chunks():
                store.write(rows, self.all_reduce(store.read(rows).contiguous()))
        return store

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


ALONE = Shard()


def join(device: torch.device) -> tuple[Shard, torch.device]:
    """This process's shard, and its device (``cuda:LOCAL_RANK`` for CUDA), joining the process
    group when torchrun started it: NCCL on GPUs, gloo on CPUs."""
    present = [name for name in ENVIRONMENT if name in os.environ]
    if not present:
        return ALONE, device
    if len(present) < len(ENVIRONMENT):
        missing = [name for name in ENVIRONMENT if name not in os.environ]
        raise CastError(
            f"{', '.join(present)} set but not {', '.join(missing)}: launch with torchrun "
            "(it sets them all) or unset them to run one process"
        )
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise CastError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers") from None
    if world == 1:
        return ALONE, device
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")  # so timeouts raise, not hang
    try:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=_timeout()),
        )  # fmt: skip
    except (RuntimeError, ValueError) as err:
        raise LostContact(f"rank {rank} could not join the other {world - 1}: {err}") from None
    return Shard(rank, world), device


def _timeout() -> float:
    value = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise CastError(f"{TIMEOUT_VARIABLE} must be a positive number of seconds, got {value!r}")
    return seconds
