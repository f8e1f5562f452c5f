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
    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip("| ").split("|")]

    header = cells(next(line for line in table.splitlines() if line.startswith("| image |")))
    shown = [dict(zip(header, cells(line), strict=True))
            for line in table.splitlines() if line.startswith("| 32² |")]  # fmt: skip
    # the plain rows use every thread, the shard rows one each
    assert [(row["tiling"], row["processes"].split(" × ")[0]) for row in shown] == [
        ("untiled", "1"), ("tiles of 16 px", "1"), ("tiles of 16 px, state on disk", "1"),
        ("tiles of 16 px", "1"), ("tiles of 16 px", "2")]  # fmt: skip
    for row, plain in zip(shown, [True] * 3 + [False] * 2, strict=True):
        assert float(row["s / step"].split()[0]) > 0, row
        assert float(row["CPU s / step"]) > 0 and float(row["targets s"]) > 0, row
        peaks = [value for name, value in row.items() if name.startswith("peak")]
        assert peaks and all(0.1 <= float(peak.removesuffix(" GiB")) <= 6 for peak in peaks), row
        # the ratio to the untiled row of the run
        assert bool(row["tiled / untiled time"]) == (plain and row["tiling"] != "untiled"), row
    assert re.search(r"^Tiled peak memory 32² → 32² → 32²: [\d.]+ → ", table, re.M)
    assert re.search(r"^Tiled with the state on disk, peak memory", table, re.M)
    assert re.search(r"^Scaling efficiency, 1 → 2 gloo processes .* at 32²: \d+%", table, re.M)
