"""The CUDA kernels for Nsight Compute (`make gpu-check`'s ncu step): relu1_1 of a 1024^2 image
(C = 64, 1024 x 1024), J = K = 3, r = 3, soft masks, float32 then bfloat16, each forward and
backward launched once inside a profiler window (cudaProfilerStart / Stop) after a warm-up of
each, so that ``ncu --profile-from-start off`` sees exactly those launches; its
``--kernel-name`` leaves out the forward's finishing kernel and the op's fills. In the window,
in this order: the forward (``_masked_gram_fwd_kernel``) and the backward
(``_masked_gram_bwd_mma_kernel``) in float32, then in bfloat16. Without a GPU it runs the
same calls on the CPU backend (float32 only), so that CI catches a broken script.

    ncu --clock-control none --profile-from-start off python3 bench/gpu_ncu.py
"""

from __future__ import annotations

import argparse

import torch
from gpu_probe import J, op_inputs

from cast import backends


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=64, help="C (relu1_1: 64)")
    parser.add_argument("--side", type=int, default=1024, help="H = W (relu1_1: 1024)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)
    backend = backends.load(device)
    calls = []  # (label, call) in launch order
    for dtype in dtypes:
        features, masks, kernels, inv, grad = op_inputs(
            args.channels, args.side, J, dtype, device, 0
        )
        label = f"{device} {str(dtype).removeprefix('torch.')} C={args.channels} {args.side}^2"
        calls.append((f"{label} forward", lambda f=features, m=masks, p=kernels, i=inv:
                      backend.forward(f, m, p, i, True)))  # fmt: skip
        calls.append((f"{label} backward", lambda g=grad, f=features, m=masks, p=kernels, i=inv:
                      backend.backward(g, f, m, p, i, True)))  # fmt: skip
    for _, call in calls:  # warm-up: the extension's first launches, the allocator's blocks
        call()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for label, call in calls:
        out = call()
        if device == "cuda":
            torch.cuda.synchronize()  # one kernel at a time on the card, as ncu replays them
        assert bool(torch.isfinite(out).all()), label
        print(f"{label}: launched, finite", flush=True)
    if device == "cuda":
        torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
