"""The CUDA backward under compute-sanitizer (`make gpu-check`'s sanitizer step): both places
of dG's mirrors (a region of their own, U_j's) and both input types, on small shapes.

Each case runs the op's backward once, so memcheck (shared and global accesses in bounds: the
shared-memory plan on the card), racecheck (shared-memory hazards) and synccheck (barriers)
see every code path the 2026-11-27 review named (gpu-notes). Without a GPU it runs the same
calls on the CPU backend, so that CI catches a broken script.

    compute-sanitizer --tool racecheck python3 bench/gpu_sanitize.py
"""

from __future__ import annotations

import torch

import cast

# (dtype, K): f32 K = 3 takes the own-region mirrors on an H100/H200, f32 K = 4 borrows U_j's
# region, bf16 K = 5 the 16-bit path (review, "Shared-memory sizing"); C = 72 gives two input
# blocks, 72 x 128 several items a block.
CASES = ((torch.float32, 3), (torch.float32, 4), (torch.bfloat16, 5))


def main() -> None:
    device, backend = ("cuda", "cuda") if torch.cuda.is_available() else ("cpu", "cpu")
    gen = torch.Generator().manual_seed(0)
    for dtype, K in CASES:
        if backend == "cpu":
            dtype = torch.float32  # the CPU backend's dtypes
        features = torch.randn(1, 72, 72, 128, generator=gen).to(device, dtype)
        masks = torch.rand(1, K, 72, 128, generator=gen).to(device, dtype)
        kernels = torch.randn(3, 3, 3, generator=gen).to(device, dtype)
        grad = torch.randn(1, 3, K, 72, 72, generator=gen).to(device)
        d_features = cast.ops.masked_gram_grad(features, grad, masks, kernels, backend=backend)
        assert bool(torch.isfinite(d_features).all()), (dtype, K)
        print(f"{backend} {str(dtype).removeprefix('torch.')} K={K}: dF finite", flush=True)


if __name__ == "__main__":
    main()
