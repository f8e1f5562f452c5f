"""bench/bench_masked_gram.py on the CPU, smallest run: its torch.compile baseline is compiled at
every row, not the eager code under another name. Timings are not checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_masked_gram.py"


def bench(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # this checkout's cast, not whichever the environment installed
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(BENCH), *argv], check=False, timeout=timeout,
                          capture_output=True, text=True, env=env)  # fmt: skip


@pytest.mark.slow
def test_compile_baseline_compiles_every_row():
    # dynamic=False makes a graph per shape and grad mode: 10 for the five layers and two J,K
    # pairs (20 when compile's forward alone was timed too). Past dynamo's default limit of 8 it
    # ran the eager code silently from there on, and those "compile" rows were eager ones.
    done = bench("--quick", "--backends", "compile")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    rows = [line for line in lines if line.startswith("relu") and "compile:" in line]
    assert len(rows) == 10, done.stdout
    assert all("forward -)" in row for row in rows), rows  # not timed: as many compiles again
    assert "recompile_limit" not in done.stderr, done.stderr[-2000:]


def test_compile_baseline_needs_a_warm_up_run():
    # the first call of the compiled code compiles it: timed, it would count the compile
    done = bench("--warmup", "0", timeout=60)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.endswith("--warmup 0: at least 1 (the first call compiles)"), done.stderr


def test_eager_baseline_convolves_every_channel_at_once():
    # The eager baseline convolved a batch of C one-channel images: oneDNN pads one channel to
    # 16 on the CPU, and relu1_1's eager row took 32x its J*K*N*C intermediate in memory (and,
    # at 512^2, 1.5 s of its 2 s in that convolution, 9x a grouped one's).
    done = bench("--quick", "--backends", "eager", "--jk", "1x1", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("relu1_1"))
    extra = float(re.search(r"extra +([\d.]+) MiB", row).group(1))
    intermediate = 64 * 64 * 64 * 4 / 2**20  # J*K*N*C float32 at relu1_1 of a 64^2 image
    assert extra < 4 * intermediate, row
