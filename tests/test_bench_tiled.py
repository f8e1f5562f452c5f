"""bench/bench_tiled.py end to end on tiny images, so that it cannot break unseen (its untiled
rows failed from f86739a to 7aea124): every row group runs and the table has every row, with
numbers, not errors. Timings are not checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_tiled.py"

pytestmark = pytest.mark.slow


def test_every_row_group_gives_its_rows(tmp_path):
    # one size for all four: five rows, each in a fresh process; tiles of 16 px make 4 tiles
    argv = [sys.executable, str(BENCH), "--sizes", "32", "32", "32", "32", "--tile", "16",
            "--steps", "1", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(argv, check=False, timeout=600, capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    (kept,) = tmp_path.glob("*-tiled.json")
    rows = json.loads(kept.read_text())
    assert sorted(rows) == ["32 spilled 0", "32 tiled 0", "32 tiled 1", "32 tiled 2",
                            "32 untiled 0"]  # fmt: skip
    assert not [name for name, row in rows.items() if "error" in row]
    table = kept.with_suffix(".md").read_text()
    lines = [line.split(" | ") for line in table.splitlines() if line.startswith("| 32² |")]
    # the plain rows use every thread, the shard rows one each
    shown = [(tiling, processes) for _, tiling, processes, *_ in lines]
    assert [(tiling, processes.split(" × ")[0]) for tiling, processes in shown] == [
        ("untiled", "1"), ("tiles of 16 px", "1"), ("tiles of 16 px, state on disk", "1"),
        ("tiles of 16 px", "1"), ("tiles of 16 px", "2")]  # fmt: skip
    for row, plain in zip(lines, [True] * 3 + [False] * 2, strict=True):
        _, tiling, _, seconds, cpu, targets, peak, ratio, _ = row
        assert float(seconds.split()[0]) > 0 and float(cpu) > 0 and float(targets) > 0
        assert 0.1 <= float(peak.removesuffix(" GiB")) <= 6  # VGG-19 alone is ~0.5 GiB
        assert bool(ratio) == (plain and tiling != "untiled"), row  # against the untiled row
    assert re.search(r"^Tiled peak memory 32² → 32² → 32²: [\d.]+ → ", table, re.M)
    assert re.search(r"^Tiled with the state on disk, peak memory", table, re.M)
    assert re.search(r"^Scaling efficiency, 1 → 2 gloo processes .* at 32²: \d+%", table, re.M)
