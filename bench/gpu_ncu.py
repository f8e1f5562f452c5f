"""The CUDA kernels for Nsight Compute (`make gpu-check`'s ncu step): relu1_1 of a 1024^2 image
(C = 64, 1024 x 1024), J = K = 3, r = 3, soft masks, float32 then bfloat16. Each call is made
once for a warm-up, then once inside a profiler window (cudaProfilerStart / Stop), so that
``ncu --profile-from-start off`` sees exactly those launches; its ``--kernel-name`` leaves out
the forward's finishing kernel, the backward's kernel that forms S whole first (relu1_1 takes
plan.symmetric_scratch) and the op's fills. In the window, for each dtype in turn: the
forward (``_masked_gram_fwd_kernel``) and the backward (``_masked_gram_bwd_mma_kernel``)
whole, then both as bench/gpu_probe.py's "no MMA" variant (template argument kProbe = 2), so
that each stall reason's cycles, whole minus "no MMA", are the MMA phase's. Without a GPU it
runs the same calls on the CPU backend (float32 only; the variant means nothing there), so that
CI catches a broken script.

With ``--triton`` it launches the Triton kernels instead (their own ncu step, later in the
run): the forward at relu1_1's call above, float32 and bf16, and at relu5_1 of a 1024^2 image,
J = K = 1 (C = 512, 64 x 64), with 64- and with 32-channel blocks; the backward at relu4_1,
J = K = 3, float32 (the slowest Triton cell of the bench, 4.5 ms at 68ef306); each in the
shipped config named, not tuned. Their counters say what binds the tiles (gpu-notes, "Triton
forward: G holds split 0"): L1 hits and sectors a request of the shifted loads, and the stall
reasons.

    ncu --clock-control none --profile-from-start off python3 bench/gpu_ncu.py [--triton]
"""

from __future__ import annotations

import argparse
import os
import re
from functools import partial

import torch
from gpu_probe import VARIANTS, J, config_name, op_inputs

from cast import backends

PROFILED = ("whole", "no MMA")  # bench/gpu_probe.py's variants, in launch order
STALL = "smsp__average_warps_issue_stalled_"  # + reason + "_per_issue_active.ratio"
ISSUED = "smsp__inst_issued.sum"


def launch_order(dtypes) -> list[tuple[torch.dtype, str, str]]:
    """(dtype, kernel, variant) of each launch in the profiler window, in order."""
    return [(dtype, kernel, variant) for dtype in dtypes for variant in PROFILED
            for kernel in ("forward", "backward")]  # fmt: skip


def calls(channels: int, side: int, device: str) -> list[tuple[str, int, object]]:
    """(label, probe variant, call) in launch order."""
    backend = backends.load(device)
    dtypes = (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)
    made, ops = [], {}
    for dtype in dtypes:
        features, masks, kernels, inv, grad = op_inputs(channels, side, J, dtype, device, 0)
        ops[dtype] = {
            "forward": partial(backend.forward, features, masks, kernels, inv, True),
            "backward": partial(backend.backward, grad, features, masks, kernels, inv, True),
        }
    for dtype, kernel, variant in launch_order(dtypes):
        label = f"{device} {str(dtype).removeprefix('torch.')} C={channels} {side}^2"
        made.append((f"{label} {kernel}, {variant}", VARIANTS[variant], ops[dtype][kernel]))
    return made


# The Triton kernels' launches: (kernel, label, C, side, J = K, dtype, config). relu5_1 takes
# two splits (72 programs of 64-channel blocks, 272 of 32): the second kernel a forward call
# launches, which adds the splits, is not one of the ncu step's names.
FORWARD_CONFIG = dict(TILE_H=2, TILE_W=32, BLOCK_C=64, num_warps=8, num_stages=1)
NARROW_CONFIG = FORWARD_CONFIG | dict(BLOCK_C=32, num_warps=4)
BACKWARD_CONFIG = dict(TILE_H=16, TILE_W=16, BLOCK_C=64, BLOCK_D=16, num_warps=8, num_stages=1)


def triton_launches(channels: int, side: int) -> list[tuple]:
    deep_channels = 8 * channels  # relu4_1 and relu5_1 beside relu1_1
    return [
        ("forward", "relu1_1 J=K=3", channels, side, J, torch.float32, FORWARD_CONFIG),
        ("forward", "relu1_1 J=K=3", channels, side, J, torch.bfloat16, FORWARD_CONFIG),
        ("forward", "relu5_1 J=K=1", deep_channels, side // 16, 1, torch.float32, FORWARD_CONFIG),
        ("forward", "relu5_1 J=K=1", deep_channels, side // 16, 1, torch.float32, NARROW_CONFIG),
        ("backward", "relu4_1 J=K=3", deep_channels, side // 8, J, torch.float32, BACKWARD_CONFIG),
    ]


def triton_label(kernel, layer, C, size, jk, dtype, config) -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    return f"triton {dtype_name} {layer} C={C} {size}^2 {config_name(config)} {kernel}"


def triton_calls(channels: int, side: int, device: str) -> list[tuple[str, int, object]]:
    """(label, probe variant, call) of the Triton kernels, in launch order."""
    from cast.kernels import masked_gram as triton_gram

    made = []
    for launch in triton_launches(channels, side):
        kernel, _, C, size, jk, dtype, config = launch
        features, masks, kernels, inv, grad = op_inputs(C, size, jk, dtype, device, 0)
        if kernel == "forward":
            call = partial(triton_gram.forward, features, masks, kernels, inv, True, config=config)
        else:
            call = partial(triton_gram.backward, grad, features, masks, kernels, inv, True,
                           config=config)  # fmt: skip
        made.append((f"{triton_label(*launch)}, whole", VARIANTS["whole"], call))
    return made


def stall_table(text: str, labels: list[str], top: int = 6) -> list[str]:
    """Each profiled kernel's warp-cycles (millions) by stall reason, its largest first."""
    pages = read_counters(text)
    if len(pages) != len(labels):
        return [f"ncu pages: {len(pages)}, not the {len(labels)} launches: no stall table"]
    lines = []
    for label, page in zip(labels, pages, strict=True):
        cycles = warp_cycles(page)
        total = sum(cycles.values()) or 1.0
        lines.append(f"{label}: warp-cycles (millions) by stall reason")
        for reason in sorted(cycles, key=cycles.get, reverse=True)[:top]:
            share = cycles[reason] / total
            lines.append(f"  {reason:24} {cycles[reason] / 1e6:9.2f} ({share:.0%})")
    return lines


def warp_cycles(page: dict[str, float]) -> dict[str, float]:
    """A kernel's warp-cycles by stall reason: each reason's stalls an issued instruction times
    the instructions issued."""
    issued = page.get(ISSUED, 0.0)
    return {
        name.removeprefix(STALL).removesuffix("_per_issue_active.ratio"): value * issued
        for name, value in page.items()
        if name.startswith(STALL)
    }


def read_counters(text: str) -> list[dict[str, float]]:
    """Each profiled kernel's stall ratios and instructions issued from ncu's details page, in
    the order printed: a kernel's page starts at its header (`name<...>(...) (grid)x(block),
    Context N, Stream N, ...`); a metric line is its name, its unit (a prefix scales it: Minst),
    its value (thousands by commas)."""
    scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    pages: list[dict[str, float]] = []
    for line in text.splitlines():
        if re.search(r"_masked_gram_\w+_kernel.*, Context \d+, Stream", line):
            pages.append({})
            continue
        words = line.split()
        if not pages or not words or not words[0].startswith((STALL, ISSUED)):
            continue
        try:
            value = float(words[-1].replace(",", ""))
        except ValueError:
            continue
        unit = words[1] if len(words) == 3 else ""
        pages[-1][words[0]] = value * scale.get(unit[:1], 1.0) if len(unit) > 1 else value
    return pages


def mma_phase_table(text: str, top: int = 6) -> list[str]:
    """Per dtype and kernel, each stall reason's warp-cycles (ratio x instructions issued),
    whole and "no MMA", and their difference, the MMA phase's: its largest reasons first."""
    pages = read_counters(text)
    order = launch_order((torch.float32, torch.bfloat16))
    if len(pages) != len(order):
        return [f"ncu pages: {len(pages)}, not the {len(order)} launches: no MMA-phase table"]
    runs = dict(zip(order, pages, strict=True))
    lines = []
    for dtype in (torch.float32, torch.bfloat16):
        for kernel in ("forward", "backward"):
            whole = warp_cycles(runs[dtype, kernel, "whole"])
            bare = warp_cycles(runs[dtype, kernel, "no MMA"])
            cycles = {reason: (w, bare.get(reason, 0.0)) for reason, w in whole.items()}
            phase = {reason: w - b for reason, (w, b) in cycles.items()}
            total = sum(max(c, 0.0) for c in phase.values()) or 1.0
            name = f"{str(dtype).removeprefix('torch.')} {kernel}"
            lines.append(f"{name}: warp-cycles (millions) by stall reason, MMA phase = whole - "
                         "no MMA")  # fmt: skip
            if not phase:
                lines.append("  no stall metrics on its pages")
            for reason in sorted(phase, key=phase.get, reverse=True)[:top]:
                w, b = (c / 1e6 for c in cycles[reason])
                lines.append(f"  {reason:24} whole {w:9.2f}  no MMA {b:9.2f}  MMA phase "
                             f"{w - b:9.2f} ({phase[reason] / total:.0%})")  # fmt: skip
    return lines


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
    parser.add_argument("--triton", action="store_true",
                        help="the Triton kernels' launches instead of the CUDA kernels'")
    parser.add_argument("--read", metavar="LOG",
                        help="launch nothing: the MMA-phase table of ncu's output (with "
                        "--triton: each kernel's stall reasons)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.read:
        with open(args.read, encoding="utf-8", errors="replace") as log:
            text = log.read()
        if args.triton:
            labels = [triton_label(*launch) for launch in triton_launches(args.channels, args.side)]
            print("\n".join(stall_table(text, labels)))
        else:
            print("\n".join(mma_phase_table(text)))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    made = (triton_calls if args.triton else calls)(args.channels, args.side, device)
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
