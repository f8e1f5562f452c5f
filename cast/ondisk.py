"""Image-sized state that a tiled objective reads and writes one crop at a time.

A store holds a tensor ``(*lead, H, W)`` and offers ``read(rect)``, ``write(rect, values)`` and
``add(rect, values)`` on regions ``rect = (top, bottom, left, right)`` of its last two axes. The
same code runs on either kind:

- ``InRam`` wraps a tensor;
- ``OnDisk`` keeps it in an unnamed temporary file (``O_TMPFILE``: it has no name, so nothing is
  left behind when the process ends, however it ends), written and read with ``pwrite`` and
  ``preadv`` row by row. Nothing is mapped: file pages sit in the page cache, which the kernel
  writes out under pressure and which is not the process's RSS, so state larger than RAM works.
  On disk the layout is ``(H, W, *lead)``: a region's rows are contiguous runs.
"""

from __future__ import annotations

import math
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import CastError, RankError

Rect = tuple[int, int, int, int]  # (top, bottom, left, right), ends exclusive
CHUNK_BYTES = 32 * 2**20  # what ``chunks`` hands out at a time from disk


class InRam:
    """A tensor ``(*lead, H, W)`` as a store."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor

    shape = property(lambda self: tuple(self.tensor.shape))
    dtype = property(lambda self: self.tensor.dtype)
    device = property(lambda self: self.tensor.device)

    def read(self, rect: Rect | None = None) -> Tensor:
        """The region, or everything, contiguous like a read from disk (the network then
        computes the same numbers); a view where it can be: do not change it."""
        if rect is None:
            return self.tensor
        top, bottom, left, right = rect
        return self.tensor[..., top:bottom, left:right].contiguous()

    def write(self, rect: Rect, values: Tensor) -> None:
        top, bottom, left, right = rect
        self.tensor[..., top:bottom, left:right] = values

    def add(self, rect: Rect, values: Tensor) -> None:
        top, bottom, left, right = rect
        self.tensor[..., top:bottom, left:right] += values

    def chunks(self):
        """Regions of whole rows that cover the store, each small enough to hold (the same on
        disk and in RAM, so sums over chunks come out the same)."""
        return _chunks(self.shape, self.tensor.element_size())

    def zeros_like(self) -> InRam:
        return InRam(torch.zeros_like(self.tensor))


class OnDisk:
    """A tensor ``(*lead, H, W)`` in an unnamed file of ``directory`` (default: tempfile's).
    Reads return new tensors on ``device``; the file goes when the store is dropped."""

    def __init__(self, shape, dtype: torch.dtype, device: torch.device | str = "cpu",
                 directory: str | Path | None = None):  # fmt: skip
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        self.directory = directory
        self._numpy = torch.empty((), dtype=dtype).numpy().dtype
        self._cell = math.prod(self.shape[:-2]) * self._numpy.itemsize  # bytes per (y, x)
        if directory is None:
            _check_tmpdir()
        try:
            self._file = tempfile.TemporaryFile(dir=directory)
            # closed when the store goes: a file left for the collector to close warns (a
            # ResourceWarning each, an error in a caller's test suite under filterwarnings=error)
            weakref.finalize(self, self._file.close)
            self._file.truncate(self._cell * self.shape[-2] * self.shape[-1])  # zeros, sparse
        except OSError as err:
            raise SpillFailed(err, directory) from None

    def _rows(self, rect: Rect):
        """``(file offset, bytes)`` of each row of ``rect``."""
        top, bottom, left, right = rect
        width, run = self.shape[-1], (right - left) * self._cell
        return [((y * width + left) * self._cell, run) for y in range(top, bottom)]

    def read(self, rect: Rect | None = None) -> Tensor:
        """A copy of the region, or of everything."""
        rect = rect or (0, self.shape[-2], 0, self.shape[-1])
        top, bottom, left, right = rect
        lead = self.shape[:-2]
        buffer = np.empty((bottom - top, right - left, math.prod(lead)), self._numpy)
        view = memoryview(buffer.reshape(-1).view(np.uint8))
        done = 0
        for offset, size in self._rows(rect):
            _pread_exact(self._file.fileno(), view[done : done + size], offset)
            done += size
        values = torch.from_numpy(buffer).permute(2, 0, 1).reshape(*lead, *buffer.shape[:2])
        return values.contiguous().to(self.device)

    def write(self, rect: Rect, values: Tensor) -> None:
        top, bottom, left, right = rect
        lead = self.shape[:-2]
        rows = values.detach().to("cpu", self.dtype).reshape(math.prod(lead), bottom - top,
                                                             right - left)  # fmt: skip
        data = memoryview(rows.permute(1, 2, 0).contiguous().numpy().reshape(-1).view(np.uint8))
        done = 0
        try:
            for offset, size in self._rows(rect):
                _pwrite_exact(self._file.fileno(), data[done : done + size], offset)
                done += size
        except OSError as err:  # a full disk: the sparse file gets its blocks only now
            raise SpillFailed(err, self.directory) from None

    def add(self, rect: Rect, values: Tensor) -> None:
        self.write(rect, self.read(rect) + values.to(self.device, self.dtype))

    def chunks(self):
        return _chunks(self.shape, self._numpy.itemsize)

    def zeros_like(self) -> OnDisk:
        return OnDisk(self.shape, self.dtype, self.device, self.directory)


Store = InRam | OnDisk


class SpillFailed(RankError):
    """A spill file could not be written: its disk is full, or refuses the file."""

    def __init__(self, err: OSError, directory: str | Path | None):
        where = directory or tempfile.gettempdir()
        super().__init__(
            f"cannot write the image-sized state to '{where}' ({err.strerror or err}); free "
            "space there or set TMPDIR to a folder on a larger disk (or run with --no-spill)"
        )


def keep(tensor: Tensor, spill: bool | str | Path = False) -> Store:
    """``tensor`` as a store: in RAM, or (``spill``: True, or the directory) copied to disk a
    chunk at a time; the caller then drops the tensor."""
    if spill is False or spill is None:
        return InRam(tensor)
    store = zeros(tensor.shape, tensor.dtype, tensor.device, spill)
    for top, bottom, left, right in store.chunks():
        store.write((top, bottom, left, right), tensor[..., top:bottom, left:right])
    return store


def zeros(shape, dtype: torch.dtype, device, spill: bool | str | Path = False) -> Store:
    """A store of zeros, in RAM or (``spill``) on disk."""
    if spill is False or spill is None:
        return InRam(torch.zeros(shape, dtype=dtype, device=device))
    return OnDisk(shape, dtype, device, None if spill is True else spill)


def chunk_rows(shape, itemsize: int) -> int:
    """How many whole rows of a tensor ``(*lead, H, W)`` make a chunk (``chunks``)."""
    return max(1, CHUNK_BYTES // max(1, math.prod(shape[:-2]) * shape[-1] * itemsize))


def _chunks(shape, itemsize: int) -> list[Rect]:
    height, width, rows = *shape[-2:], chunk_rows(shape, itemsize)
    return [(top, min(top + rows, height), 0, width) for top in range(0, height, rows)]


def _check_tmpdir() -> None:
    """$TMPDIR, where set, is where the state goes: tempfile would quietly fall back to /tmp
    (often RAM) or the current folder when it is missing or takes no file."""
    wanted = os.environ.get("TMPDIR")
    if not wanted or os.path.realpath(tempfile.gettempdir()) == os.path.realpath(wanted):
        return
    if not (os.path.isdir(wanted) and os.access(wanted, os.W_OK | os.X_OK)):
        raise CastError(
            f"TMPDIR '{wanted}' is missing or takes no file, so the state on disk would go to "
            f"'{tempfile.gettempdir()}' instead; create it or set TMPDIR to a folder on a "
            "local disk"
        )


def _pread_exact(fd: int, into: memoryview, offset: int) -> None:
    while len(into):
        got = os.preadv(fd, [into], offset)
        if got <= 0:
            raise OSError(f"short read from a spill file at byte {offset}")
        into, offset = into[got:], offset + got


def _pwrite_exact(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done
