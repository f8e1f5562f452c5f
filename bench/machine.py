"""What every benchmark table records about where it ran: device, versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {os.cpu_count()} cores"


def require_device(device: str) -> None:
    """Exit with one line where ``device`` is a CUDA one and this machine has none."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        script = Path(sys.argv[0]).name
        sys.exit(f"{script}: {device}: no CUDA device here (run it on a GPU machine)")


def slug(text: str) -> str:
    words = "".join(ch.lower() if ch.isalnum() else " " for ch in text).split()
    return "-".join(words)


def git_sha() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "csrc", "cast", "kernels")
    return sha + ("-dirty" if dirty else "")


def versions() -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return f"torch {torch.__version__}, triton {triton_version}, Python {platform.python_version()}"
