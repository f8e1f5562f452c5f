"""The CUDA kernels for Nsight Compute (`make gpu-check`'s ncu step): relu1_1 of a 1024^2 image
(C = 64, 1024 x 1024), J = K = 3, r = 3, soft masks, float32 then bfloat16. Each call is made
once for a warm-up, then once inside a profiler window (cudaProfilerStart / Stop), so that
``ncu --profile-from-start off`` sees exactly those launches; its ``--kernel-name`` leaves out
the forward's finishing kernel and the op's fills. In the window, for each dtype in turn: the
forward (``_masked_gram_fwd_kernel``) and the backward (``_masked_gram_bwd_mma_kernel``)
whole, then both as bench/gpu_probe.py's "no MMA" variant (template argument kProbe = 2), so
that each stall reason's cycles, whole minus "no MMA", are the MMA phase's. Without a GPU it
runs the same calls on the CPU backend (float32 only; the variant means nothing there), so that
CI catches a broken script.

    ncu --clock-control none --profile-from-start off python3 bench/gpu_ncu.py
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import torch
from gpu_probe import VARIANTS, J, op_inputs

from cast import backends

PROFILED = ("whole", "no MMA")  # bench/gpu_probe.py's variants, in launch order


def calls(channels: int, side: int, device: str) -> list[tuple[str, int, object]]:
    """(label, probe variant, call) in launch order."""
    backend = backends.load(device)
    dtypes = (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)
    made = []
    for dtype in dtypes:
        features, masks, kernels, inv, grad = op_inputs(channels, side, J, dtype, device, 0)
        label = f"{device} {str(dtype).removeprefix('torch.')} C={channels} {side}^2"
        forward = partial(backend.forward, features, masks, kernels, inv, True)
        backward = partial(backend.backward, grad, features, masks, kernels, inv, True)
        for variant in PROFILED:
            made.append((f"{label} forward, {variant}", VARIANTS[variant], forward))
            made.append((f"{label} backward, {variant}", VARIANTS[variant], backward))
    return made


def launch(variant: int, call):
    os.environ["CAST_CUDA_PROBE"] = str(variant)  # read at every launch
    try:
        return call()
    finally:
        del os.environ["CAST_CUDA_PROBE"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=64, help="C (relu1_1: 64)")
    parser.add_argument("--side", type=int, default=1024, help="H = W (relu1_1: 1024)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    made = calls(args.channels, args.side, device)
    for _, variant, call in made:  # warm-up: the extension's first launches, the allocator's
        launch(variant, call)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for label, variant, call in made:
        out = launch(variant, call)
        if device == "cuda":
            torch.cuda.synchronize()  # one kernel at a time on the card, as ncu replays them
        if variant == VARIANTS["whole"]:  # the variants' results are wrong by design
            assert bool(torch.isfinite(out).all()), label
        print(f"{label}: launched", flush=True)
    if device == "cuda":
        torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
