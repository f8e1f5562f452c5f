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

    ncu --clock-control none --profile-from-start off python3 bench/gpu_ncu.py
"""

from __future__ import annotations

import argparse
import os
import re
from functools import partial

import torch
from gpu_probe import VARIANTS, J, op_inputs

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
            whole, bare = runs[dtype, kernel, "whole"], runs[dtype, kernel, "no MMA"]
            cycles = {
                name.removeprefix(STALL).removesuffix("_per_issue_active.ratio"): (
                    whole[name] * whole.get(ISSUED, 0.0),
                    bare.get(name, 0.0) * bare.get(ISSUED, 0.0),
                )
                for name in whole
                if name.startswith(STALL)
            }
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
    parser.add_argument("--read", metavar="LOG",
                        help="launch nothing: the MMA-phase table of ncu's output")  # fmt: skip
    args = parser.parse_args(argv)
    if args.read:
        with open(args.read, encoding="utf-8", errors="replace") as log:
            print("\n".join(mma_phase_table(log.read())))
        return
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
