"""One image, several processes: tiles dealt to ranks, sums all-reduced (SPEC §5).

``torchrun`` starts one process per GPU (NCCL) or per CPU share (gloo); every rank holds the
whole image, computes the statistics and gradients of its own tiles, and takes part in one
all-reduce per pass, so every rank steps its optimiser identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor


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
            dist.all_reduce(tensor)
        return tensor


ALONE = Shard()
