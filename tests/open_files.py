"""What the spill tests ask of the process: which files it still holds open."""

from __future__ import annotations

import os
from pathlib import Path


def open_files(directory: Path) -> list[str]:
    """This process's open files in ``directory`` (unnamed ones show as deleted)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the listing's own descriptor, closed by now
            pass
    return [link for link in links if link.startswith(str(directory))]
