"""The CUDA backward under compute-sanitizer (`make gpu-check`'s sanitizer step): both places
of dG's mirrors (a region of their own, U_j's), S whole from a scratch (no mirrors) and both
input types, on small shapes.

Each case runs the op's backward once, so memcheck (shared and global accesses in bounds: the
shared-memory plan on the card), racecheck (shared-memory hazards) and synccheck (barriers)
see every code path the 2026-11-27 review named (gpu-notes). Without a GPU it runs the same
calls on the CPU backend, so that CI catches a broken script.

    compute-sanitizer --tool racecheck python3 bench/gpu_sanitize.py
"""

from __future__ import annotations

import argparse

import torch

import cast

# (dtype, K, B, H) at C = 72 (three input blocks, two output blocks), J = 3, r = 3, W = 128,
# one set of masks, on an H100/H200's plan: at B = 5, 16 rows (160 items: some blocks walk two)
# S is more than a tenth of the op's inputs + outputs, so it is formed a block at a time, f32
# K = 3 with dG's mirrors in a region of their own, f32 K = 4 in U_j's, bf16 K = 5 the 16-bit
# path (review, "Shared-memory sizing"); at B = 1, 72 rows (144 items) S comes whole from a
# scratch (plan.symmetric_scratch: no mirrors, no float32 form pass nor its barrier).
# tests/test_cuda_sources.py checks each case's way.
CASES = (
    (torch.float32, 3, 5, 16),
    (torch.float32, 4, 5, 16),
    (torch.bfloat16, 5, 5, 16),
    (torch.float32, 3, 1, 72),
)


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)  # no options
    device, backend = ("cuda", "cuda") if torch.cuda.is_available() else ("cpu", "cpu")
    gen = torch.Generator().manual_seed(0)
    for dtype, K, B, H in CASES:
        if backend == "cpu":
            dtype = torch.float32  # the CPU backend's dtypes
        features = torch.randn(B, 72, H, 128, generator=gen).to(device, dtype)
        masks = torch.rand(1, K, H, 128, generator=gen).to(device, dtype)
        kernels = torch.randn(3, 3, 3, generator=gen).to(device, dtype)
        grad = torch.randn(B, 3, K, 72, 72, generator=gen).to(device)
        d_features = cast.ops.masked_gram_grad(features, grad, masks, kernels, backend=backend)
        assert bool(torch.isfinite(d_features).all()), (dtype, K)
        print(f"{backend} {str(dtype).removeprefix('torch.')} K={K} B={B}: dF finite", flush=True)


if __name__ == "__main__":
    main()
