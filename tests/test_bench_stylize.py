"""bench/bench_stylize.py's part 1 on a tiny image, written where --out says: a small run leaves
the committed table alone. Timings are not checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_stylize.py"

pytestmark = pytest.mark.slow


def test_a_small_run_writes_where_out_says(tmp_path):
    committed = {path: path.read_bytes() for path in (ROOT / "bench" / "results").glob("*")}
    argv = [sys.executable, str(BENCH), "--size", "32", "--repeats", "1", "--no-peer",
            "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(argv, check=False, timeout=300, capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (table,) = tmp_path.glob("*-stylize.md")
    rows = [line for line in table.read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 5, rows  # header, rule, the network and four objectives
    assert {p: p.read_bytes() for p in (ROOT / "bench" / "results").glob("*")} == committed
