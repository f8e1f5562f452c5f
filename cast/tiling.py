"""Where the tiles of an exactly tiled objective lie (SPEC §5).

Every pixel is owned by exactly one tile; a tile's network pass reads its owned pixels plus a
halo wide enough that every feature at an owned cell, and every neighbour the high-order kernels
read, is computed exactly as on the whole image. Tile and crop corners sit on multiples of the
network's total stride, so the pooling grids of a crop coincide with the whole image's. Deeper
layers need less of the halo: layer by layer, the network drops what no later layer reads.
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
    tiles: tuple[Tile, ...]

    def __len__(self) -> int:
        return len(self.tiles)


def halo_for(network, content_layers: Sequence[str], style_layers: Sequence[str], radius: int,
             stride: int) -> int:  # fmt: skip
    """Pixels a crop must extend beyond its owned tile: the receptive-field reach of the deepest
    layer used, plus, for style layers, the high-order kernels' ``radius = (r - 1) / 2`` cells at
    that layer's stride; rounded up to ``stride`` so crop corners stay on the pooling grid."""
    return _round_up(max(_reads(network, content_layers, style_layers, radius).values()), stride)


def margins(network, content_layers: Sequence[str], style_layers: Sequence[str], radius: int,
            stride: int) -> dict[str, int]:  # fmt: skip
    """Per layer of the network up to the deepest one used: the pixels beyond the owned tile
    that its output must still hold for the owned cells of every later layer used to be exact
    (the reach of the convolutions still to come, plus the kernels' radius at style layers;
    the halo is the input's). Deeper layers need less: a crop's network drops the rest, in
    whole ``stride`` px so the cuts keep every later pooling grid where the whole image's is.
    """
    reads, names = _reads(network, content_layers, style_layers, radius), network.layer_names
    deepest = max(names.index(layer) for layer in reads)
    needs = {name: max(need for layer, need in reads.items() if names.index(layer) >= i)
             - network.reach(name) for i, name in enumerate(names[: deepest + 1])}  # fmt: skip
    # at least one stride: a ragged tile narrower than a cell of the deepest layer still gets
    # one there (a zero statistic for the cells it does not own, not an empty feature map)
    return {name: _round_up(max(need, 1), stride) for name, need in needs.items()}


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
        return TilePlan(height, width, 0, 0, (Tile(whole, whole),))
    tiles = []
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            crop = (max(0, top - halo), min(height, bottom + halo),
                    max(0, left - halo), min(width, right + halo))  # fmt: skip
            tiles.append(Tile((top, bottom, left, right), crop))
    return TilePlan(height, width, tile, halo, tuple(tiles))
