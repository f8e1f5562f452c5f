"""Where the tiles of an exactly tiled objective lie (SPEC §5).

Every pixel is owned by exactly one tile; a tile's network pass reads its owned pixels plus a
halo wide enough that every feature at an owned cell, and every neighbour the high-order kernels
read, is computed exactly as on the whole image. Tile and crop corners sit on multiples of the
network's total stride, so the pooling grids of a crop coincide with the whole image's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import CastError


@dataclass(frozen=True)
class Tile:
    """Pixel rectangles ``(top, bottom, left, right)``, ends exclusive, in image coordinates."""

    owned: tuple[int, int, int, int]
    crop: tuple[int, int, int, int]

    def cells(self, stride: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """The owned cells of a layer of ``stride`` px: as ``(rows, cols)`` of the whole
        image's grid, and of the crop's grid. Pooling rounds down, so ``end // stride`` is the
        last cell in both cases (also at the image's ragged bottom and right edges)."""
        top, bottom, left, right = (p // stride for p in self.owned)
        y, x = self.crop[0] // stride, self.crop[2] // stride
        whole = (slice(top, bottom), slice(left, right))
        return whole, (slice(top - y, bottom - y), slice(left - x, right - x))

    def crop_grid(self, stride: int) -> tuple[int, int]:
        """``(h, w)`` of the crop's grid at a layer of ``stride`` px."""
        top, bottom, left, right = self.crop
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
    needed = max(
        [network.reach(layer) for layer in content_layers]
        + [network.reach(layer) + radius * network.stride(layer) for layer in style_layers]
    )
    return -(-needed // stride) * stride


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
