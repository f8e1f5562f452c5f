"""bench/gpu_probe.py's Triton section, so that it cannot break unseen before a lease: its rows
on tiny shapes under the Triton interpreter, and the two program counts its part (a) compares;
bench/gpu_sanitize.py, the sanitizer step's program, bench/gpu_ncu.py, the ncu step's, and
bench/host_path.py, on the CPU backend; and the ncu step's arguments in bench/gpu_check.sh."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from cast.kernels import masked_gram as triton_gram

BENCH = Path(__file__).resolve().parent.parent / "bench"
PROBE = BENCH / "gpu_probe.py"


def test_triton_probe_gives_every_row_on_the_interpreter():
    env = os.environ | {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(PROBE), "--tiny"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.strip("| ").split(" | ") for line in done.stdout.splitlines()]
    rows = [row for row in rows if row[0] in ("a", "b", "c")]
    # (b): every shipped config + autotuned, forward (4) and backward (3); (a): 2 dtypes x
    # 2 J = K x the 3 backward configs under the budget, the first uncapped, autotuned;
    # (c): 2 dtypes, r = 1
    assert [row[0] for row in rows] == ["b"] * 9 + ["a"] * 20 + ["c"] * 2, done.stdout
    assert all(float(cell) > 0 for row in rows for cell in row[-3:]), done.stdout
    budget = [row[5] for row in rows if row[4].startswith("backward, budget")]
    assert budget == ["16x16x64x16 w8", "16x16x32x16 w4", "8x8x64x16 w4"] * 4, done.stdout
    assert {row[4] for row in rows if row[0] == "a"} == {
        "backward, budget",
        "backward, budget, untuned default",
        "backward, uncapped",
        "backward, autotuned",
    }


def test_uncapped_programs_are_the_resident_ones():
    """Where the budget binds (relu5_1 of a 1024^2 image, float32, J = K = 1: 25 programs where
    100 would be resident and balanced, gpu-notes), ``capped=False`` gives the count without it;
    elsewhere the two agree."""
    config = triton_gram.fitting_configs(True, 512, R=3)[0]
    relu5_1 = triton_gram.Problem((1, 512, 64, 64), 1, torch.float32, 1, 1, 3)
    assert triton_gram.backward_programs(relu5_1, config, 132) == 25
    assert triton_gram.backward_programs(relu5_1, config, 132, capped=False) == 100
    relu2_1 = triton_gram.Problem((1, 128, 512, 512), 1, torch.float32, 1, 1, 3)
    assert triton_gram.backward_programs(relu2_1, config, 132, capped=False) == 131
    assert triton_gram.backward_programs(relu2_1, config, 132) == 131


def test_sanitizer_program_runs_every_case():
    """What `make gpu-check` runs under compute-sanitizer: here on the CPU backend, its four
    cases (the mirrors' two places, bf16, S from a scratch) each finishing with a finite dF."""
    argv = [sys.executable, str(BENCH / "gpu_sanitize.py")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == [
        "cpu float32 K=3 B=5",
        "cpu float32 K=4 B=5",
        "cpu float32 K=5 B=5",
        "cpu float32 K=3 B=1",
    ], done.stdout


def test_host_path_gives_its_rows_on_the_cpu():
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(BENCH / "host_path.py"), "--device", "cpu", "--calls", "3"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("requires_grad=")]
    assert len(rows) == 4 and all("us a call" in row for row in rows), done.stdout


def test_ncu_program_runs_forward_and_backward():
    """What `make gpu-check`'s ncu step profiles: here on the CPU backend, small, each call
    once after the warm-up, whole and as the probe's "no MMA" (the CPU ignores the variant)."""
    argv = [sys.executable, str(BENCH / "gpu_ncu.py"), "--channels", "8", "--side", "12"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "cpu float32 C=8 12^2 forward, whole: launched",
        "cpu float32 C=8 12^2 backward, whole: launched",
        "cpu float32 C=8 12^2 forward, no MMA: launched",
        "cpu float32 C=8 12^2 backward, no MMA: launched",
    ], done.stdout


def test_ncu_program_runs_the_triton_kernels():
    """What `make gpu-check`'s ncu-triton step profiles: here under the interpreter, small."""
    env = os.environ | {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(BENCH / "gpu_ncu.py"), "--triton", "--channels", "8"]
    argv += ["--side", "32"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "triton float32 relu1_1 J=K=3 C=8 32^2 2x32x64 w8 forward, whole: launched",
        "triton bfloat16 relu1_1 J=K=3 C=8 32^2 2x32x64 w8 forward, whole: launched",
        "triton float32 relu5_1 J=K=1 C=64 2^2 2x32x64 w8 forward, whole: launched",
        "triton float32 relu5_1 J=K=1 C=64 2^2 2x32x32 w4 forward, whole: launched",
        "triton float32 relu4_1 J=K=3 C=64 4^2 16x16x64x16 w8 backward, whole: launched",
    ], done.stdout


def import_gpu_ncu():
    """bench/gpu_ncu.py as a module (it imports its sibling gpu_probe)."""
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_ncu
    finally:
        sys.path.remove(str(BENCH))
    return gpu_ncu


def ncu_arguments() -> list[str]:
    """The ncu step's arguments, as bench/gpu_check.sh's bash builds them."""
    script = (BENCH / "gpu_check.sh").read_text()
    start = script.index("stalls=")
    end = script.index("\ndone\n", start) + len("\ndone\n")
    shown = subprocess.run(["bash", "-c", script[start:end] + 'printf "%s\\n" "${ncu_args[@]}"'],
                           capture_output=True, text=True, check=True)  # fmt: skip
    return shown.stdout.splitlines()


def test_ncu_step_leaves_the_clocks_alone_and_names_the_kernels():
    """--clock-control none: ncu's default locks the card's clocks, which the lent machines must
    keep (the device's METHOD.md); and the kernel filter must match the CUDA kernels' real names
    (a renamed kernel would leave the step with nothing to read) but not the forward's
    finishing one nor the one that forms the backward's S whole (plan.symmetric_scratch, which
    relu1_1 takes): neither is one of bench/gpu_ncu.py's 8 launches."""
    args = ncu_arguments()
    pairs = list(zip(args, args[1:], strict=False))
    assert ("--clock-control", "none") in pairs, args
    assert ("--profile-from-start", "off") in pairs, args
    script = (BENCH / "gpu_check.sh").read_text()
    gpu_ncu = import_gpu_ncu()
    # each step profiles as many launches as bench/gpu_ncu.py makes in its window
    cuda_launches = len(gpu_ncu.launch_order((torch.float32, torch.bfloat16)))
    triton_launches = len(gpu_ncu.triton_launches(64, 1024))
    assert (cuda_launches, triton_launches) == (8, 5)
    assert f'--launch-count {cuda_launches} "${{ncu_args[@]}}"' in script
    assert f'--launch-count {triton_launches} "${{ncu_args[@]}}"' in script
    assert "--launch-count" not in args, args
    assert "smsp__inst_issued.sum" in dict(pairs)["--metrics"], args  # --read needs it
    assert '"${ncu_args[@]}"' in script
    kernels = dict(pairs)["--kernel-name"].removeprefix("regex:")
    source = (BENCH.parent / "csrc" / "masked_gram_cuda_kernels.cuh").read_text()
    names = set(re.findall(r"__global__ void __launch_bounds__\([^)]*\)\s+(\w+)\(", source))
    assert {"_masked_gram_fwd_kernel", "_masked_gram_bwd_mma_kernel"} <= names, names
    assert {name for name in names if re.search(kernels, name)} == names - {
        "_masked_gram_finish_kernel",
        "_masked_gram_symmetric_kernel",
    }
    # Triton names a kernel after its function: the forward and the backward, but not the
    # forward's addition of its splits
    assert re.search(kernels, triton_gram._masked_gram_fwd_kernel.__name__)
    assert re.search(kernels, triton_gram._masked_gram_bwd_kernel.__name__)
    assert not re.search(kernels, triton_gram._add_partials_kernel.__name__)


def test_ncu_reader_gives_the_mma_phase_by_stall_reason():
    """bench/gpu_ncu.py --read on a details page shaped like ncu's: 8 kernel headers in launch
    order, metric lines with units (Minst scaled) and thousands' commas; the MMA phase's
    warp-cycles of a reason are ratio x issued, whole minus "no MMA"."""
    gpu_ncu = import_gpu_ncu()

    def page(kernel, variant, scale):
        return [
            f"  {kernel}<float, 8, {variant}>(const float *, int) (132, 1, 1)x(256, 1, 1), "
            "Context 1, Stream 7, Device 0, CC 9.0",
            "    Section: Command line profiler metrics",
            f"    smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio  inst  {scale}",
            "    smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio  "
            f"inst  {4 * scale}",
            "    smsp__inst_issued.sum  Minst  1.5" if variant else
            "    smsp__inst_issued.sum  inst  2,000,000",
        ]  # fmt: skip

    lines = ['==PROF== Profiling "_masked_gram_fwd_kernel" - 0: 0%....50%....100% - 38 passes']
    for _ in range(2):  # float32, bfloat16
        for variant, scale in ((0, 2.0), (2, 1.0)):
            for kernel in ("_masked_gram_fwd_kernel", "_masked_gram_bwd_mma_kernel"):
                lines += page(kernel, variant, scale)
    table = gpu_ncu.mma_phase_table("\n".join(lines))
    assert table[0].startswith("float32 forward:") and len(table) == 4 * 3, table
    # short scoreboard: 8 x 2e6 - 4 x 1.5e6 = 10e6; barrier: 2 x 2e6 - 1.5e6 = 2.5e6
    assert table[1].split() == ["short_scoreboard", "whole", "16.00", "no", "MMA", "6.00",
                                "MMA", "phase", "10.00", "(80%)"], table  # fmt: skip
    assert table[2].split()[-2:] == ["2.50", "(20%)"], table
    assert gpu_ncu.mma_phase_table("\n".join(lines[:-5])) == [
        "ncu pages: 7, not the 8 launches: no MMA-phase table"
    ]

    # --triton --read: each of the Triton forward's pages by stall reason, in launch order
    labels = [gpu_ncu.triton_label(*launch) for launch in gpu_ncu.triton_launches(64, 1024)]
    pages = [line for _ in labels for line in page("_masked_gram_fwd_kernel", 0, 2.0)]
    stalls = gpu_ncu.stall_table("\n".join(pages), labels)
    assert len(stalls) == 5 * 3, stalls
    assert stalls[0] == f"{labels[0]}: warp-cycles (millions) by stall reason"
    assert stalls[1].split() == ["short_scoreboard", "16.00", "(80%)"], stalls  # 8 x 2e6
    assert stalls[2].split() == ["barrier", "4.00", "(20%)"], stalls
    assert gpu_ncu.stall_table("\n".join(pages[:-5]), labels) == [
        "ncu pages: 4, not the 5 launches: no stall table"
    ]
