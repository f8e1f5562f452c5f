"""Where the tiles of an exactly tiled objective lie (SPEC §5).

Every pixel is owned by exactly one tile; a tile's network pass reads its owned pixels plus a
halo wide enough that every feature at an owned cell, and every neighbour the high-order kernels
read, is computed exactly as on the whole image. Tile and crop corners sit on multiples of the
strides of the poolings the crop runs through, so its pooling grids coincide with the whole
image's. Deeper layers need less of the halo: layer by layer, the network drops what no later
layer reads.

A halo as wide as the deepest layer's reach (96 px on VGG-19) makes the shallow layers, the
costly ones, compute a 512 px tile's crop at (512 + 2 * 96)^2 px, 1.9x the tile. So the steps
and the targets cut the network in two segments at ``CUT`` (pool3): the first runs the shallow
layers on crops with the halo that they and the cut need (24 px), and writes the cut's owned
cells into an image-wide map (16 B/px); the second runs the deep layers on that map in tiles
twice as wide, whose halo (64 px) costs little at an eighth of the resolution. Every feature is
still the whole image's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import CastError

Rect = tuple[int, int, int, int]  # (top, bottom, left, right) px, ends exclusive


@dataclass(frozen=True)
class Tile:
    """Pixel rectangles in image coordinates: the pixels the tile owns, and its crop."""

    owned: Rect
    crop: Rect

    def window(self, margin: int) -> Rect:
        """The owned pixels and ``margin`` px around them, within the crop (image pixels)."""
        top, bottom, left, right = self.owned
        c_top, c_bottom, c_left, c_right = self.crop
        return (max(c_top, top - margin), min(c_bottom, bottom + margin),
                max(c_left, left - margin), min(c_right, right + margin))  # fmt: skip

    def windows(self, margins: dict[str, int]) -> dict[str, Rect]:
        """``window(margin)`` of every layer of ``margins`` in the crop's pixels: what the
        network keeps of that layer's output (``VGGFeatures.forward``'s ``windows``)."""
        y, x = self.crop[0], self.crop[2]
        shift = lambda top, bottom, left, right: (top - y, bottom - y, left - x, right - x)  # noqa: E731
        return {layer: shift(*self.window(margin)) for layer, margin in margins.items()}

    def cells(self, stride: int, margin: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """The owned cells of a layer of ``stride`` px: as ``(rows, cols)`` of the whole
        image's grid, and of the grid over ``window(margin)``. Pooling rounds down, so
        ``end // stride`` is the last cell in both cases (also at the image's ragged bottom and
        right edges)."""
        top, bottom, left, right = (p // stride for p in self.owned)
        window = self.window(margin)
        y, x = window[0] // stride, window[2] // stride
        whole = (slice(top, bottom), slice(left, right))
        return whole, (slice(top - y, bottom - y), slice(left - x, right - x))

    def grid(self, stride: int, margin: int) -> tuple[int, int]:
        """``(h, w)`` of the grid over ``window(margin)`` at a layer of ``stride`` px."""
        top, bottom, left, right = self.window(margin)
        return (bottom - top) // stride, (right - left) // stride


@dataclass(frozen=True)
class TilePlan:
    """Tiles of ``tile x tile`` px (smaller at the bottom and right edges) covering an image."""

    height: int
    width: int
    tile: int  # 0: one tile, the whole image
    halo: int
    stride: int  # px: tile and crop corners sit on multiples of it
    tiles: tuple[Tile, ...]

    def __len__(self) -> int:
        return len(self.tiles)


# Where the steps cut the network (above), and how much wider the deep segment's tiles are.
CUT = "pool3"
DEEP_TILE_FACTOR = 2


@dataclass(frozen=True)
class Segment:
    """Consecutive layers of the network run tile by tile on their own plan: after ``start``
    (``None``: from the image) up to ``end``. Its tiles' crops are in image pixels; its input
    is the image, or ``start``'s output over the whole image (a cell per ``stride(start)`` px).
    ``margins``: what a crop keeps of each of its layers' output (``geometry``); ``end`` is
    the cut that the next segment reads, or the deepest layer used."""

    start: str | None
    end: str
    margins: dict[str, int]
    plan: TilePlan


def segments(network, content_layers: Sequence[str], style_layers: Sequence[str], radius: int,
             hw: tuple[int, int], tile: int, world: int = 1) -> tuple[Segment, ...]:  # fmt: skip
    """The steps' segments for an image of ``hw`` in tiles of ``tile`` px (0: whole): one, or
    two cut at ``cut_layer`` where the image has several tiles (the deep segment's tiles
    ``DEEP_TILE_FACTOR`` times as wide, where that still gives every one of ``world``
    processes a tile)."""
    cut = cut_layer(network, content_layers, style_layers)
    stride = max(network.stride(layer) for layer in (*content_layers, *style_layers))
    if count_tiles(*hw, tile, stride) == 1:
        cut = None
    deep_tile = tile * DEEP_TILE_FACTOR
    if count_tiles(*hw, deep_tile, stride) < world:
        deep_tile = tile
    result = []
    for start, end in _bounds(network, content_layers, style_layers, cut):
        margins_, halo, align = geometry(network, content_layers, style_layers, radius, start,
                                          end)  # fmt: skip
        size = tile if start is None else deep_tile
        result.append(Segment(start, end, margins_, plan_tiles(*hw, size, halo, align)))
    return tuple(result)


def cut_layer(network, content_layers: Sequence[str], style_layers: Sequence[str]) -> str | None:
    """``CUT``, where a layer after it is used (else there is nothing to cut)."""
    names = network.layer_names
    deepest = _deepest(network, content_layers, style_layers)
    return CUT if CUT in names and names.index(CUT) < names.index(deepest) else None


def crop_halo(network, content_layers: Sequence[str], style_layers: Sequence[str],
              radius: int) -> int:  # fmt: skip
    """The halo of the crops a tiled step differentiates at full resolution: the first
    segment's (what the memory plan sizes)."""
    cut = cut_layer(network, content_layers, style_layers)
    start, end = _bounds(network, content_layers, style_layers, cut)[0]
    return geometry(network, content_layers, style_layers, radius, start, end)[1]


def _bounds(network, content_layers, style_layers, cut: str | None):
    """``(start, end)`` of each segment: up to ``cut`` and after it, or one."""
    deepest = _deepest(network, content_layers, style_layers)
    return [(None, cut), (cut, deepest)] if cut else [(None, deepest)]


def _deepest(network, content_layers, style_layers) -> str:
    """The deepest layer used."""
    names = network.layer_names
    return names[max(names.index(layer) for layer in (*content_layers, *style_layers))]


def geometry(network, content_layers: Sequence[str], style_layers: Sequence[str], radius: int,
             start: str | None = None, end: str | None = None) -> tuple[dict[str, int], int, int]:
    """``(margins, halo, align)`` of the layers after ``start`` (default: from the image) up to
    ``end`` (default: the deepest used), ``radius = (r - 1) / 2`` being the high-order kernels'.

    ``halo``: the pixels a crop must extend beyond its owned tile, the receptive-field reach of
    the deepest layer read (beyond ``start``'s), plus, at style layers, the kernels' radius in
    cells of that layer. ``margins``: per layer, the pixels beyond the owned tile that its output
    must still hold for the owned cells of every later layer read to be exact; deeper layers
    need less, and a crop's network drops the rest. ``end``, when a cut, is read at its owned
    cells only. Everything is rounded up to ``align``, the largest stride among the layers
    (``start`` included), so every cut keeps the later pooling grids where the whole image's
    are."""
    names = network.layer_names
    end = end or _deepest(network, content_layers, style_layers)
    first, last = (names.index(start) + 1 if start else 0), names.index(end)
    inside = lambda layers: [la for la in layers if first <= names.index(la) <= last]  # noqa: E731
    reads = _reads(network, inside(content_layers), inside(style_layers), radius)
    reads.setdefault(end, network.reach(end))
    align = max(network.stride(name) for name in names[max(first - 1, 0) : last + 1])
    needs = {names[i]: max(need for layer, need in reads.items() if names.index(layer) >= i)
             - network.reach(names[i]) for i in range(first, last + 1)}  # fmt: skip
    # at least one cell: a ragged tile narrower than a cell of the deepest layer still gets
    # one there (a zero statistic for the cells it does not own, not an empty feature map)
    margins_ = {name: _round_up(max(need, 1), align) for name, need in needs.items()}
    halo = _round_up(max(reads.values()) - (network.reach(start) if start else 0), align)
    return margins_, halo, align


def _reads(network, content_layers: Sequence[str], style_layers: Sequence[str],
           radius: int) -> dict[str, int]:  # fmt: skip
    """Per layer used, the pixels beyond a cell's own square of the input that its statistic
    reads: its receptive-field reach, and at style layers the kernels' ``radius`` cells more."""
    reads = {layer: network.reach(layer) for layer in content_layers}
    for layer in style_layers:
        own = network.reach(layer) + radius * network.stride(layer)
        reads[layer] = max(reads.get(layer, 0), own)
    return reads


def _round_up(pixels: int, stride: int) -> int:
    return -(-pixels // stride) * stride


def count_tiles(height: int, width: int, tile: int, stride: int) -> int:
    """How many tiles ``plan_tiles`` makes, without making them (a huge image has millions)."""
    if tile % stride or tile < 0:
        raise CastError(
            f"the tile size must be a multiple of the network's total stride ({stride} px), "
            f"got {tile}; try {max(stride, round(tile / stride) * stride)}"
        )
    if tile == 0 or tile >= max(height, width):
        return 1
    return -(-height // tile) * -(-width // tile)


def plan_tiles(height: int, width: int, tile: int, halo: int, stride: int) -> TilePlan:
    """Tiles of ``tile`` px (a multiple of ``stride``) with crops ``halo`` px wider on each side,
    clipped to the image; ``tile = 0`` or one at least the image's size gives the whole image."""
    if halo % stride:
        raise ValueError(f"the halo must be a multiple of {stride} px, got {halo}")
    if count_tiles(height, width, tile, stride) == 1:
        whole = (0, height, 0, width)
        return TilePlan(height, width, 0, 0, stride, (Tile(whole, whole),))
    tiles = []
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            crop = (max(0, top - halo), min(height, bottom + halo),
                    max(0, left - halo), min(width, right + halo))  # fmt: skip
            tiles.append(Tile((top, bottom, left, right), crop))
    return TilePlan(height, width, tile, halo, stride, tuple(tiles))
