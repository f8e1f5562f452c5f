"""The bench scripts asked for a GPU on a machine without one: one line saying so, no traceback;
and gpu_sanitize.py's --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.parametrize(
    "argv",
    [
        ["bench_masked_gram.py", "--device", "cuda"],
        ["bench_stylize.py", "--device", "cuda"],
        ["bench_tiled.py", "--device", "cuda"],
        ["bench_quality.py", "--device", "cuda:0"],
        ["host_path.py", "--device", "cuda"],
        ["gpu_probe.py"],
        ["gpu_probe.py", "--triton"],
    ],
)
def test_one_line_without_a_gpu(argv, tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / argv[0]), *argv[1:]], cwd=tmp_path,
                          check=False, timeout=120, capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and "no CUDA device here" in lines[-1], done.stderr
    assert done.stdout == ""
    assert not list(tmp_path.iterdir())  # nothing written


def test_gpu_sanitize_help_runs_nothing():
    # it takes no options; --help ran its cases (on the CPU backend here) instead of saying so
    done = subprocess.run([sys.executable, str(BENCH / "gpu_sanitize.py"), "--help"], check=False,
                          timeout=120, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: gpu_sanitize.py") and "dF finite" not in done.stdout
