"""The memory plan of a run: whether the image fits whole, else the tile size (and, for L-BFGS,
the history) that makes it fit, decided before any work.

Three parts grow with the image: the network's activations while one crop is differentiated
(measured on a small probe, then scaled by the crop's pixels: they grow linearly; the whole
network's, an upper bound for the shallow segment's crops, cast.tiling), what stays resident for
the whole run (image, gradient, content and style images at this scale, content features, masks
on every layer's grid, a tiled step's cut and its gradient), and the optimiser's copies of the
image (L-BFGS keeps two per remembered step). Tiling bounds only the first; the plan lowers the
L-BFGS history when the other two do not fit.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .checks import MIN_SIZE
from .errors import CastError
from .tiling import count_tiles, cut_layer

# Histories tried, longest first, when the default one does not fit (an explicit one is kept).
HISTORIES = (50, 20, 10, 5)
# Tile sizes tried, largest first: large tiles waste least on halos (at 512 px a shallow crop,
# 24 px each side, is up to 1.2x its tile; at 128 px 1.8x). Smaller ones only when nothing else
# fits.
TILES = (2048, 1536, 1024, 768, 512, 384, 256, 192, 128, 96, 64, 48, 32, 16)
# Regions assumed for the masks' memory (the masks are read after the plan): a few floats per
# pixel, small next to the rest.
REGIONS = 4
# Share of the free memory a plan may use: allocators round up and fragment.
HEADROOM = 0.9
# Plan as if only this many GiB were free (shared machines, tests).
LIMIT_VARIABLE = "CAST_MEMORY_GIB"
GiB = 2**30


def amount(nbytes: float) -> str:
    """Bytes as a person reads them: GiB with one decimal, MiB below a tenth of a GiB."""
    if nbytes < 0.1 * GiB:
        return f"{nbytes / 2**20:.0f} MiB"
    return f"{nbytes / GiB:.1f} GiB"


@dataclass(frozen=True)
class Plan:
    height: int
    width: int
    device: torch.device
    tile: int  # 0: the whole image at once
    tiles: int
    halo: int
    history: int | None  # L-BFGS only
    need: float  # bytes
    free: float | None  # bytes, None where unknown
    spill: bool = False  # image-sized state on disk (cast.ondisk), Adam stepping in chunks

    def __str__(self) -> str:
        how = "whole" if self.tile == 0 else (
            f"in {self.tiles} tiles of {self.tile} px (+{self.halo} px halo)")  # fmt: skip
        history = "" if self.history is None else f", L-BFGS history {self.history}"
        free = "" if self.free is None else f" of {amount(self.free)} free"
        spill = ", state on disk (Adam in chunks of rows)" if self.spill else ""
        return (f"plan: {self.width}x{self.height} on {self.device} {how}{history}{spill}, "
                f"about {amount(self.need)}{free}")  # fmt: skip


def plan_memory(network, content_layers: Sequence[str], style_layers: Sequence[str],
                hw: tuple[int, int], style_hws: Sequence[tuple[int, int]], device: torch.device,
                optimizer: str, history: int | None, tile: int | None, halo: int, stride: int,
                processes: int = 1, spill: bool | None = False,
                free: float | None = None) -> Plan:  # fmt: skip
    """The plan for an image of ``hw`` (its finest scale) styled by images of ``style_hws`` (at
    the same scale: ``--style-scale`` applied), with the layers that will run. ``tile``: ``None``
    chooses (whole if it fits), ``0`` forbids tiling, else that size (a multiple of ``stride``).
    ``history``: ``None`` chooses (50 if it fits). Every one of ``processes`` gets a tile at
    least. ``spill``: ``None`` puts the image-sized state on disk (and steps Adam in chunks)
    only when nothing fits in memory, ``True`` always, ``False`` never. ``free``: the bytes
    this process may use, default ``free_bytes``. Raises ``CastError`` when nothing fits."""
    height, width = hw
    count = lambda size: count_tiles(height, width, size, stride)  # noqa: E731
    if tile is not None and count(tile) < processes:  # also refuses a tile off the stride
        raise CastError(
            f"{processes} processes but {'no tiling' if tile == 0 else f'--tile {tile}'} "
            f"makes {count(tile)} tile(s) of this {width}x{height} image; use a smaller --tile "
            "or fewer processes"
        )
    activations = _activation_bytes_per_pixel(network, (*content_layers, *style_layers), device)
    content_features = sum(network.channels(layer) / network.stride(layer) ** 2
                           for layer in content_layers)  # fmt: skip
    grids = sum(1 / network.stride(layer) ** 2 for layer in style_layers)
    # a tiled step's cut between its segments (cast.tiling), and its gradient: bytes a pixel
    cut = cut_layer(network, content_layers, style_layers)
    cut_bytes = 0 if cut is None else 8 * network.channels(cut) / network.stride(cut) ** 2
    if optimizer == "lbfgs":
        histories = HISTORIES if history is None else (history,)
    else:
        histories = (None,)
    if tile is None:  # whole, then tiles that waste little on halos, then shorter histories
        sizes = [s for s in [0, *TILES] if s < max(hw) and s % stride == 0
                 and count(s) >= processes]  # fmt: skip
        efficient = [s for s in sizes if s == 0 or s >= 256]
        candidates = [(s, h) for h in histories for s in efficient]
        # small tiles after every efficient one failed: memory is short, the history too; where
        # there is none (a small image shared by processes), they are not for memory
        small = [s for s in sizes if s not in efficient]
        candidates += [(s, h) for h in (histories[-1:] if efficient else histories) for s in small]
    else:
        candidates = [(tile, h) for h in histories]
    if not candidates:
        raise CastError(
            f"{processes} processes but a {width}x{height} image makes at most "
            f"{count(stride)} tiles; use fewer processes"
        )
    if free is None:
        free = free_bytes(device, processes)

    def crop(size: int, h: int, w: int) -> int:
        return h * w if size == 0 else min(size + 2 * halo, h) * min(size + 2 * halo, w)

    def need(size: int, history: int | None, on_disk: bool = False, scale: float = 1) -> float:
        """Bytes the plan ``(size, history, on_disk)`` needs, for images ``scale`` times as
        large as these (a refusal's advice)."""
        sized = [(int(h * scale), int(w * scale)) for h, w in [hw, *style_hws]]
        pixels, style_pixels = sized[0][0] * sized[0][1], sum(h * w for h, w in sized[1:])
        copies = 0 if on_disk else 2 * history + 4 if history is not None else 6
        # the targets' pass runs the network on the style images' crops too, on the same
        # segments but without autograd: a differentiated crop bounds it
        largest = max(crop(size, h, w) for h, w in sized)
        if on_disk:
            # on disk: the image, its gradient, the content features, the masks on the grids
            # and the optimiser's state; in RAM stay the content image and its masks, the
            # style images (and the image while the scales change)
            state = 4 * (pixels * (3 * 2 + REGIONS) + style_pixels * (3 + REGIONS))
        else:
            # image, gradient, content at two sizes; content-layer features; region masks on
            # the image and on every style layer's grid; every style image with its masks
            state = 4 * (pixels * (3 * 4 + content_features + REGIONS * (1 + grids))
                         + style_pixels * (3 + REGIONS))  # fmt: skip
            state += cut_bytes * pixels if size else 0
        return activations * largest + state + copies * 12 * pixels

    if spill is not False:  # on disk: tiles as before, no history (Adam)
        on_disk = [(s, None, True) for s in dict.fromkeys(s for s, _ in candidates)]
        candidates = on_disk if spill else [(*c, False) for c in candidates] + on_disk
    fits = lambda c: free is None or need(*c) <= HEADROOM * free  # noqa: E731
    chosen = next((c for c in candidates if fits(c)), None)
    if chosen is None:
        least = need(*candidates[-1])
        size = candidates[-1][0]
        # the largest size at which the plan that needs least fits (not a ratio of the need:
        # a crop's activations do not shrink with the image)
        sides = range(-(-MIN_SIZE // stride) * stride, max(hw) + 1, stride)
        least_at = lambda side: need(*candidates[-1], scale=side / max(hw))  # noqa: E731
        below = bisect.bisect_right(sides, HEADROOM * free, key=least_at)  # it grows with side
        fits = sides[below - 1] if below else None
        tiled = "" if tile == 0 else f" in tiles of {size} px"
        advice = {0: "allow tiling (drop --tile 0), ", None: ""}.get(tile, "lower --tile, ")
        advice += f"lower --size (about {fits} fits), " if fits else ""
        # a plan on disk steps Adam already
        adam = "--optimizer adam or " if optimizer != "adam" and spill is False else ""
        raise CastError(
            f"a {width}x{height} image needs about {amount(least)} on {device}{tiled} "
            f"but {amount(free)} is free; {advice}use {adam}a larger device"
        )
    size, history, *on_disk = chosen
    on_disk = bool(on_disk and on_disk[0])
    # whole where every image is one tile (a style image larger than the image may not be)
    whole = all(count_tiles(h, w, size, stride) == 1 for h, w in [hw, *style_hws])
    tiled = 0 if whole else size
    return Plan(height, width, device, tiled, count(tiled), halo if tiled else 0, history,
                need(size, history, on_disk), free, on_disk)  # fmt: skip


def _activation_bytes_per_pixel(network, layers, device: torch.device) -> float:
    """Bytes autograd saves per input pixel for one forward pass, measured on a probe image;
    twice that covers the transient activations of the backward pass."""
    probe = 64
    saved: dict[int, torch.UntypedStorage] = {}  # held here, so no address is reused meanwhile
    weights = {p.untyped_storage().data_ptr() for p in network.parameters()}

    def pack(t: Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:  # convolutions save their weights too: not per pixel
            saved[storage.data_ptr()] = storage
        # the graph keeps nothing: a saved output packed as itself closes a cycle through
        # autograd's C++ graph that Python's collector cannot see (it leaked the network per call)

    def unpack(_):
        raise RuntimeError("the probe's graph is never differentiated")

    dtype = next(network.parameters()).dtype
    # a step records its graph whatever the caller's mode: under their no_grad or
    # inference_mode the probe saved nothing, and the plan counted no activations
    with torch.inference_mode(False), torch.enable_grad():
        # grey, not random: what autograd saves depends on the shapes alone, and torch.rand
        # would advance the caller's global generator (stylize's seed= promises its own)
        x = torch.full((1, 3, probe, probe), 0.5, device=device, dtype=dtype, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            features = network(x, layers)
    del features, x
    return 2 * sum(s.nbytes() for s in saved.values()) / probe**2


def free_bytes(device: torch.device, processes: int = 1) -> float | None:
    """Bytes free for one of a run's ``processes`` on ``device`` (``None``: unknown). On the
    CPU the machine's memory is shared by the run's processes on it (torchrun's
    ``LOCAL_WORLD_SIZE``, else all of them), each of which holds the image and its state."""
    limit = os.environ.get(LIMIT_VARIABLE)
    if limit:
        try:
            free = float(limit) * GiB
        except ValueError:
            free = math.nan
        if not 0 < free < math.inf:
            raise CastError(f"{LIMIT_VARIABLE} must be a positive number of GiB, got {limit!r}")
    elif device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]  # one GPU per process
    else:
        free = _available_ram()
    if device.type != "cpu" or processes == 1 or free is None:
        return free
    try:
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    except ValueError:
        raise CastError("LOCAL_WORLD_SIZE must be a whole number") from None
    return free / max(1, sharing)


def _available_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
