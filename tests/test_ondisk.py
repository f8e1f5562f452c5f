"""Stores of image-sized state (``cast.ondisk``): on disk they read, write and add exactly as in
RAM, on any region, and leave no file behind."""

from __future__ import annotations

import gc
import os
import tempfile
import warnings

import pytest
import torch
from open_files import open_files

from cast import ondisk
from cast.errors import CastError


@pytest.mark.parametrize("shape", [(3, 17, 23), (1, 2, 3, 5, 1), (4, 1, 9)])
def test_on_disk_reads_writes_and_adds_like_a_tensor(tmp_path, shape, monkeypatch):
    monkeypatch.setattr(ondisk, "CHUNK_BYTES", 100)  # several chunks, some of one row
    g = torch.Generator().manual_seed(0)
    values = torch.rand(shape, generator=g, dtype=torch.float64)
    ram, disk = ondisk.keep(values.clone()), ondisk.keep(values, tmp_path)
    assert isinstance(disk, ondisk.OnDisk) and torch.equal(disk.read(), values)
    H, W = shape[-2:]
    for rect in [(0, H, 0, W), (1, H, 0, W - 1), (H - 1, H, W - 1, W), (0, 1, 1, W)]:
        top, left = min(rect[0], H - 1), min(rect[2], W - 1)  # one row or column at least
        rect = top, max(rect[1], top + 1), left, max(rect[3], left + 1)
        top, bottom, left, right = rect
        patch = torch.rand(*shape[:-2], bottom - top, right - left, generator=g,
                           dtype=torch.float64)  # fmt: skip
        for store in (ram, disk):
            store.add(rect, patch)
            store.write((top, bottom, left, left + 1), patch[..., :1] * 3)
        assert torch.equal(disk.read(), ram.read())
        assert torch.equal(disk.read(rect), ram.read(rect))
    chunks = list(disk.chunks())
    assert chunks[0][0] == 0 and chunks[-1][1] == H
    assert all(a[1] == b[0] and a[2:] == (0, W) for a, b in zip(chunks, chunks[1:], strict=False))
    assert torch.equal(disk.zeros_like().read(), torch.zeros(shape, dtype=torch.float64))


def test_a_store_leaves_no_file_behind(tmp_path):
    """Nor a file for the collector to close: that warns, once per store of a spilled run."""
    store = ondisk.zeros((3, 8, 8), torch.float32, "cpu", tmp_path)
    store.write((0, 8, 0, 8), torch.ones(3, 8, 8))
    assert os.listdir(tmp_path) == [] and len(open_files(tmp_path)) == 1  # unnamed from birth
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always", ResourceWarning)
        del store
        gc.collect()
    assert open_files(tmp_path) == [] and [str(w.message) for w in warned] == []


@pytest.mark.parametrize("folder", ["missing", "a file"])
def test_a_tmpdir_that_cannot_take_the_state_is_one_line(folder, tmp_path, monkeypatch):
    """tempfile falls back to /tmp (often RAM) or the current folder when $TMPDIR is missing or
    takes no file: the state went there silently, not to the disk that was set for it."""
    (tmp_path / "a file").touch()
    monkeypatch.setenv("TMPDIR", str(tmp_path / folder))
    monkeypatch.setattr(tempfile, "tempdir", None)  # found afresh from $TMPDIR
    with pytest.raises(CastError, match=f"TMPDIR '{tmp_path / folder}' .* create it or"):
        ondisk.zeros((3, 8, 8), torch.float32, "cpu", True)
