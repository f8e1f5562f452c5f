"""The op's test cases, shared by every backend's tests: fresh random float64 inputs (never
zeros) cast to the dtype under test, odd shapes, batched and unbatched masks, an empty mask."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Case:
    label: str
    B: int
    C: int
    H: int
    W: int
    J: int
    K: int
    r: int
    masks: str = "soft"  # soft | binary | ones | empty | none
    batched_masks: bool = False

    def inputs(self, dtype, device, seed=0):
        gen = torch.Generator().manual_seed(seed)
        features = torch.randn(self.B, self.C, self.H, self.W, generator=gen, dtype=torch.float64)
        kernels = torch.randn(self.J, self.r, self.r, generator=gen, dtype=torch.float64)
        mask_shape = (self.B, self.K) if self.batched_masks else (self.K,)
        masks = torch.rand(*mask_shape, self.H, self.W, generator=gen, dtype=torch.float64)
        if self.masks == "binary":
            masks = (masks > 0.5).double()
        elif self.masks == "ones":
            masks = torch.ones_like(masks)
        elif self.masks == "empty":
            masks[..., -1, :, :] = 0  # the last region is empty (for every batch item)
        elif self.masks == "none":
            masks = None
        to = dict(dtype=dtype, device=device)
        return (
            features.to(**to),
            None if masks is None else masks.to(**to),
            kernels.to(**to),
        )


CASES = [
    Case("minimal", 1, 1, 1, 1, 1, 1, 1, "ones"),
    Case("C=1", 1, 1, 6, 5, 2, 2, 3),
    Case("odd C", 1, 5, 7, 6, 1, 2, 3, "binary"),
    Case("H*W not a tile multiple", 1, 3, 13, 11, 2, 1, 3),
    Case("B>1 shared masks", 3, 4, 6, 7, 2, 2, 3),
    Case("B>1 own masks", 2, 4, 6, 7, 2, 3, 3, "soft", True),
    Case("empty mask", 2, 3, 5, 6, 2, 3, 3, "empty"),
    Case("empty mask batched", 2, 3, 5, 6, 1, 2, 3, "empty", True),
    Case("all-ones mask", 1, 4, 6, 6, 1, 1, 1, "ones"),
    Case("no masks given", 2, 3, 5, 4, 2, 1, 3, "none"),
    Case("overlapping soft masks", 1, 6, 8, 8, 3, 4, 3),
    Case("r=5", 1, 3, 9, 8, 2, 2, 5),
    Case("kernel wider than image", 1, 2, 2, 3, 1, 1, 5),
    Case("J=K=4", 2, 8, 5, 9, 4, 4, 3, "soft", True),
    Case("C=20 one channel tile", 1, 20, 9, 10, 2, 2, 3),
    Case("C=40 several channel tiles", 1, 40, 6, 7, 1, 2, 3, "binary"),
    Case("1x1 kernels J=K=3", 2, 20, 7, 9, 3, 3, 1, "soft", True),
]


def relative_error(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()
