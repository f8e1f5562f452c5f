"""Region masks: from colour-coded label images, grey-scale soft masks, or alpha matting.

A set of region masks is a float32 tensor ``(K, H, W)`` in [0, 1] at image resolution;
``resample`` brings it to each network layer's grid.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import MaskError, MaskWarning
from .images import is_grey, open_image, pixels

PathArg = str | os.PathLike
Colour = tuple[int, int, int]

# Label colours closer than this (Euclidean, 0-255 RGB) are one region. Distinct label colours
# are far apart (pure red to dark red is 127); JPEG noise inside a flat region at quality 20
# stays within about 20, and chroma bleeding at edges is assigned to the nearest colour anyway.
COLOUR_RADIUS = 48.0
# A colour is a region when its flat pixels (see _flat_voters) cover at least this share of the
# image. Flatness, not the share, rejects the in-between colours of edges, so this can be low.
MIN_REGION_SHARE = 0.002
# More colours than this means the file is a photo, not a label image.
MAX_REGIONS = 32
# A label image has at least this share of its pixels within COLOUR_RADIUS / 2 of its colours
# (only edges fall in between). Measured: photos 0.45-0.75 (six of shared/images, full size and
# at 256 px), label images 0.86-1.0 (JPEG quality 15-30, bilinear resizing, 12 thin stripes).
MIN_LABELLED_SHARE = 0.8
# Aspect ratios (width / height) of a mask and its image may differ by this much (rounding).
ASPECT_TOLERANCE = 0.02
# Matting solves one unknown per pixel; above this many pixels it runs at reduced resolution.
MATTING_PIXELS = 512 * 384
# What matting takes per unknown pixel, at most: measured on 2 (shared) CPU cores, scribbles
# (every pixel but the strokes unknown) took 39-48 us a pixel at 256-512 px wide (9.2 s at
# 512x384), a trimap's band 12-22 us. Said before matting starts, which may take a while.
MATTING_SECONDS_PER_UNKNOWN = 50e-6
# pymatting compiles its numba kernels when it is first imported after installing: 33 s on
# 2 CPU cores, silent, once (numba caches them beside pymatting). Imports slower than this get
# a line saying why the wait (a compiled one took 0.8 s, 2.8 s beside three busy loops).
MATTING_IMPORT_NOTICE_SECONDS = 5.0
# A trimap is black, white and one grey (its unknown band or the scribbles' ground): at least
# this share of its pixels lie within TRIMAP_TOLERANCE (0-255) of one of the three. Measured:
# grey-scale photos 0.14-0.65 (six of shared/images, full size and at 64 px), trimaps 0.91-1.0
# (JPEG quality 10, bilinear resizing to 64 px).
MIN_TRIMAP_SHARE = 0.85
TRIMAP_TOLERANCE = 12
# A trimap is read this many pixels at a time (a band of whole rows), so that its float copies
# are a band's: a 27 MP trimap read whole took 600 MB beyond its 8-bit decoding.
TRIMAP_BAND_PIXELS = 1 << 20
# Shrunk to the mask's size, a trimap keeps one pixel of each cell (nearest neighbour): a stroke
# thinner than a cell can fall between them. Above this share of a colour's stroke pixels gone
# (beyond a cell of their kept pixels, see _vanished_share), read_trimap warns: a fifth is a
# whole stroke of a few, or thin strokes left in pieces. Measured on hand-drawn curves: 1-2 px
# wide shrunk 4x lose 7-40 %, 3 px shrunk 8x 11 %, 6 px and more shrunk 8x at most 2 %.
MAX_VANISHED_SHARE = 0.2


@dataclass
class RegionMasks:
    """Paired regions of a content image and its style images.

    ``colours[k]`` is region k's label colour; ``content`` is ``(K, H, W)``; ``styles[i]`` is
    ``(K, H_i, W_i)`` for style image i (all zeros for a region absent from it), or None for a
    style image given without a label image.
    """

    colours: list[Colour]
    content: torch.Tensor
    styles: list[torch.Tensor | None]


def label_masks(
    content_labels: PathArg,
    style_labels: Sequence[PathArg | None],
    content_size: tuple[int, int],
    style_sizes: Sequence[tuple[int, int]],
    strict: bool = False,
) -> RegionMasks:
    """Hard region masks from colour-coded label images, one region per content colour.

    Each label image is snapped to its own small palette (robust to JPEG noise and resampling:
    in-between colours never become regions), then resized with nearest neighbour to its
    image's ``(H, W)``. A style colour pairs with the content colour nearest to it (within
    ``COLOUR_RADIUS``); style colours absent from the content take no part. With ``strict``,
    a content colour found in no style label image is an error.
    """
    if len(style_labels) != len(style_sizes):
        raise ValueError(f"{len(style_labels)} style label images for {len(style_sizes)} styles")
    palette, content_index = _read_labels(content_labels, content_size)
    content = _one_hot(content_index, len(palette))
    styles, used = [], np.zeros(len(palette), dtype=bool)
    for labels, size in zip(style_labels, style_sizes, strict=True):
        if labels is None:
            styles.append(None)
            continue
        own_palette, own_index = _read_labels(labels, size)
        # -1: a colour the content does not have.
        to_content = torch.tensor([_nearest(colour, palette) for colour in own_palette])
        index = to_content[own_index]
        used[index[index >= 0].unique().numpy()] = True
        styles.append(_one_hot(index, len(palette)))
    if strict and any(labels is not None for labels in style_labels) and not used.all():
        missing = [palette[k] for k in np.flatnonzero(~used)]
        raise MaskError(
            f"content label colour(s) {', '.join(map(str, missing))} in '{content_labels}' appear "
            "in no style label image; paint them in a style label image or drop --strict"
        )
    return RegionMasks(colours=palette, content=content, styles=styles)


def _read_labels(path: PathArg, size: tuple[int, int]) -> tuple[list[Colour], torch.Tensor]:
    """(palette, index map ``(H, W)`` int64 at ``size``) for one label image."""
    picture = open_image(path, "label image", MaskError)
    check_aspect(f"mask '{path}'", picture.size, size)
    # pixels(), not convert("RGB"), which clips 16-bit greys at 255 and merges their regions
    rgb = np.rint(pixels(picture, grey=False) * 255).astype(np.int16)
    palette = _palette(rgb, path)
    # Snap, then resize with nearest neighbour (any other resampling would mix regions). Snapping
    # is per pixel, so snapping only the pixels nearest-neighbour picks gives the same map, and
    # costs O(size) rather than O(label image) (a 12 MP label image took 16 s the long way).
    rows = _nearest_exact(rgb.shape[0], size[0])
    cols = _nearest_exact(rgb.shape[1], size[1])
    picked = rgb[rows][:, cols]
    nearest = np.zeros(picked.shape[:2], dtype=np.int64)
    best = np.full(picked.shape[:2], np.inf, dtype=np.float32)
    for k, colour in enumerate(palette):
        distance = ((picked - np.array(colour, dtype=np.int16)).astype(np.float32) ** 2).sum(-1)
        closer = distance < best
        nearest[closer], best[closer] = k, distance[closer]
    return palette, torch.from_numpy(nearest)


def _nearest_exact(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output index for nearest-neighbour resizing (pixel centres), as
    ``F.interpolate(mode="nearest-exact")`` picks them for float32 (a trimap was resized by it
    whole): its float32 scale moves a few sizes' picks a pixel from exact arithmetic's, and
    float64's scale from float32's. Sides are far below 2**24, so float32 holds every index."""
    index = torch.arange(n_in, dtype=torch.float32)[None, None, :, None]
    picked = F.interpolate(index, size=(n_out, 1), mode="nearest-exact")
    return picked.flatten().numpy().astype(np.int64)


def _palette(pixels: np.ndarray, path: PathArg) -> list[Colour]:
    """The label colours of an ``(H, W, 3)`` image, most frequent first.

    Only flat pixels vote, so edges (antialiasing, JPEG ringing) cannot create colours. Greedy:
    the densest remaining colour bin seeds a region, which takes every voting colour within
    ``COLOUR_RADIUS``; its colour is their per-channel median (the exact label colour for a
    lightly compressed file).
    """
    voters, sampled = _flat_voters(pixels)
    min_count = max(1, MIN_REGION_SHARE * len(sampled))
    palette: list[Colour] = []
    while len(voters) >= min_count:
        bins = (voters // 16).astype(np.int64) @ np.array([256, 16, 1])
        densest = np.bincount(bins).argmax()
        seed = voters[bins == densest].mean(0)
        near = ((voters - seed) ** 2).sum(1) <= COLOUR_RADIUS**2
        if near.sum() < min_count:
            break
        colour = tuple(int(c) for c in np.median(voters[near], axis=0).round())
        voters = voters[~near]
        if palette and _nearest(colour, palette) >= 0:
            continue  # the fringe of a colour already found
        palette.append(colour)
        if len(palette) > MAX_REGIONS:
            raise MaskError(
                f"label image '{path}' has more than {MAX_REGIONS} colours; a label image "
                "paints each region in one flat colour"
            )
    if not palette:
        raise MaskError(
            f"label image '{path}' has no flat colour regions; paint each region in one colour"
        )
    nearest = np.full(len(sampled), np.inf, dtype=np.float32)
    for colour in palette:
        nearest = np.minimum(nearest, ((sampled - np.array(colour, np.float32)) ** 2).sum(1))
    labelled = float((nearest <= (COLOUR_RADIUS / 2) ** 2).mean())
    if labelled < MIN_LABELLED_SHARE:
        raise MaskError(
            f"'{path}' is not a label image: only {labelled:.0%} of its pixels lie within "
            f"{COLOUR_RADIUS / 2:g} of its {len(palette)} colours, a label image has at least "
            f"{MIN_LABELLED_SHARE:.0%}; paint each region in one flat colour"
        )
    return palette


def _flat_voters(pixels: np.ndarray, most: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Colours ``(M, 3)`` float32 of the flat pixels among at most ``most`` sampled on a grid,
    and the colours of all the sampled pixels. Flat: all 4 neighbours within
    ``COLOUR_RADIUS / 2``.
    """
    height, width = pixels.shape[:2]
    step = max(1, int(np.ceil((height * width / most) ** 0.5)))
    rows, cols = np.arange(0, height, step), np.arange(0, width, step)
    centre = pixels[rows][:, cols].astype(np.int32)
    flat = np.ones(centre.shape[:2], dtype=bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        neighbour = pixels[np.clip(rows + dy, 0, height - 1)][:, np.clip(cols + dx, 0, width - 1)]
        flat &= ((neighbour - centre) ** 2).sum(-1) <= (COLOUR_RADIUS / 2) ** 2
    return centre[flat].astype(np.float32), centre.reshape(-1, 3).astype(np.float32)


def _nearest(colour: Colour, palette: Sequence[Colour]) -> int:
    """Index of the palette colour within ``COLOUR_RADIUS`` of ``colour``, nearest; else -1."""
    distances = [sum((a - b) ** 2 for a, b in zip(colour, c, strict=True)) for c in palette]
    best = int(np.argmin(distances))
    return best if distances[best] <= COLOUR_RADIUS**2 else -1


def _one_hot(index: torch.Tensor, regions: int) -> torch.Tensor:
    """``(K, H, W)`` float32 masks from an index map; index -1 belongs to no region."""
    return (index[None] == torch.arange(regions)[:, None, None]).float()


def check_aspect(name: str, mask_wh: tuple[int, int], size_hw: tuple[int, int]) -> None:
    """The mask called ``name``, ``mask_wh = (W, H)``, has the aspect of its image's ``(H, W)``."""
    (width, height), (image_h, image_w) = mask_wh, size_hw
    # sides are whole pixels: one of n px moves the aspect by up to 0.5 / n, beyond the
    # tolerance where n is small (a 640x205 image at 64 px is 64x20, 2.5 % wider)
    rounding = 0.5 / width + 0.5 / height + 0.5 / image_w + 0.5 / image_h
    if abs((width / height) / (image_w / image_h) - 1) > ASPECT_TOLERANCE + rounding:
        raise MaskError(
            f"{name} is {width}x{height} but its image is {image_w}x{image_h} (as used); "
            "aspect ratios differ: draw it over the image itself"
        )


def soft_masks(paths: Sequence[PathArg], size: tuple[int, int]) -> torch.Tensor:
    """``(K, H, W)`` masks from grey-scale images, one per region (white = 1), at ``size``."""
    masks = []
    for path in paths:
        picture = open_image(path, "soft mask", MaskError, long_side=max(size))
        if not is_grey(picture):  # its brightness would make regions nobody drew
            raise MaskError(
                f"soft mask '{path}' is in colour; a soft mask is grey-scale (white = inside); "
                "give a colour label image with --content-mask"
            )
        check_aspect(f"mask '{path}'", picture.size, size)
        masks.append(_resize_grey(torch.from_numpy(pixels(picture, grey=True)), size))
    if not masks:
        raise ValueError("soft_masks needs at least one mask file")
    return torch.stack(masks)


def _resize_grey(grey: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An ``(H, W)`` map in [0, 1] at ``size``: antialiased bilinear, so it stays in [0, 1]."""
    if tuple(grey.shape) == tuple(size):
        return grey
    out = F.interpolate(grey[None, None], size=tuple(size), mode="bilinear", antialias=True)
    return out[0, 0].clamp_(0, 1)


def resample(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(K, H, W)`` or ``(B, K, H, W)`` masks at a layer's grid ``size = (h, w)``.

    Area averaging: each cell gets the mean of the mask over the pixels it covers, so values stay
    in [0, 1] and a region's share of the image is kept (exactly when the sizes divide).
    """
    if masks.dim() not in (3, 4):
        raise ValueError(f"masks must be (K, H, W) or (B, K, H, W), got {tuple(masks.shape)}")
    batched = masks if masks.dim() == 4 else masks[None]
    if tuple(batched.shape[-2:]) == tuple(size):
        return masks
    # Average in at least float32 (half-precision sums over large cells lose the mass).
    compute = torch.promote_types(batched.dtype, torch.float32)
    out = F.adaptive_avg_pool2d(batched.to(compute), tuple(size)).to(masks.dtype)
    return out if masks.dim() == 4 else out[0]


def inner(grid: torch.Tensor, radius: int) -> torch.Tensor:
    """``(K, h, w)`` masks on a layer's grid, eroded by up to ``radius`` cells: each cell takes the
    least value within ``radius`` cells around it (the image's edges do not erode).

    Statistics of a region are then taken only where a cell, and the neighbours a kernel pairs it
    with, lie inside it: at deep layers a border cell's features see across the border, and the
    region would lend the look of its neighbour too. A region too thin for ``radius`` (no cell
    left at half its strongest) is eroded less, down to the plain mask, rather than lose its
    statistics.
    """
    return torch.cat([band for _, band in inner_bands(grid, radius, grid.shape[-2])], dim=-2)


def inner_bands(grid: torch.Tensor, radius: int, rows: int):
    """``inner(grid, radius)`` a band of up to ``rows`` rows at a time, top first, as
    ``(top, band (K, rows, w))``: its temporaries are a band's, not a grid's (at a large
    image's first layer the grid is the image's size)."""
    height = grid.shape[-2]
    radii = [_surviving_radius(mask, radius, rows) for mask in grid]
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        yield top, torch.stack([_eroded(mask, r, top, bottom)
                                for mask, r in zip(grid, radii, strict=True)])  # fmt: skip


def _surviving_radius(mask: torch.Tensor, radius: int, rows: int) -> int:
    """The largest radius up to ``radius`` whose erosion of ``mask (h, w)`` leaves half its
    strongest value somewhere (erosion only shrinks), or 0; ``rows`` at a time."""
    height = mask.shape[0]
    for r in range(radius, 0, -1):
        bands = range(0, height, rows)
        if max(_eroded(mask, r, top, min(height, top + rows)).amax() for top in bands) >= (
            mask.amax() / 2
        ):
            return r
    return 0


def _eroded(mask: torch.Tensor, r: int, top: int, bottom: int) -> torch.Tensor:
    """Rows ``top:bottom`` of ``mask (h, w)`` eroded by ``r`` cells, reading ``r`` rows beyond
    them where the grid has them and repeating its edge rows where it does not."""
    if r == 0:
        return mask[top:bottom]
    above, below = max(0, top - r), min(mask.shape[0], bottom + r)
    pad = (r, r, r - (top - above), r - (below - bottom))
    padded = F.pad(mask[None, None, above:below], pad, mode="replicate").neg_()
    return F.max_pool2d(padded, 2 * r + 1, stride=1)[0, 0].neg_()


# Matting


def read_trimap(path: PathArg, size: tuple[int, int]) -> torch.Tensor:
    """An ``(H, W)`` trimap at ``size`` from a grey-scale image: black 0 = background,
    white 1 = foreground, anything in between 0.5 = unknown (snapped, so JPEG noise is harmless).

    Nearest-neighbour resizing (any other resampling would blur strokes into unknown), read a
    band of rows at a time: only the file's 8-bit decoding is ever whole.
    """
    picture = open_image(path, "trimap", MaskError)
    width, height = picture.size
    rows, cols = _nearest_exact(height, size[0]), _nearest_exact(width, size[1])
    # the mask's pixel (its cell) that each of the trimap's falls in, as one index
    row_cell = np.arange(height) * size[0] // height
    col_cell = np.arange(width) * size[1] // width
    histogram = np.zeros(256, dtype=np.int64)  # of the whole trimap, 0-255
    drawn = {0: 0, 2: 0}  # of each known level, how many of the trimap's pixels each cell holds
    picked = []  # the rows nearest-neighbour picks, as levels: 0 black, 1 grey, 2 white
    band = max(1, TRIMAP_BAND_PIXELS // width)
    for top in range(0, height, band):
        bottom = min(height, top + band)
        strip = picture.crop((0, top, width, bottom))
        if not is_grey(strip):  # a photo given for its trimap: the matte would be noise
            raise MaskError(
                f"trimap '{path}' is in colour; a trimap is a grey-scale picture of the image's "
                "shape: white inside, black outside, grey where unsure"
            )
        grey = pixels(strip, grey=True)
        histogram += np.bincount(np.rint(grey * 255).astype(np.uint8).ravel(), minlength=256)
        # pymatting's thresholds: <= 0.1 and >= 0.9 are known
        levels = (grey > 0.1).astype(np.uint8) + (grey >= 0.9)
        cells = (row_cell[top:bottom, None] * size[1] + col_cell).ravel()
        for level in drawn:
            drawn[level] += np.bincount(cells[levels.ravel() == level], minlength=size[0] * size[1])
        picked.append(levels[rows[(rows >= top) & (rows < bottom)] - top][:, cols])
    check_aspect(f"trimap '{path}'", picture.size, size)
    _check_three_levels(histogram, path)
    levels = np.concatenate(picked)
    # nearest neighbour picks one pixel in each cell: strokes thinner than a cell can vanish
    for level, colour, where in ((2, "white", "foreground"), (0, "black", "background")):
        if not drawn[level].any():  # matte() says so too, but cannot name the file
            raise MaskError(f"trimap '{path}' has no {where} ({colour}) pixels; mark some of each")
        if not (levels == level).any():
            raise MaskError(
                f"trimap '{path}': its {colour} strokes vanish at the mask's {size[1]}x{size[0]}; "
                "draw them thicker or make the mask larger"
            )
    vanished = _vanished({level: drawn[level].reshape(size) for level in drawn}, levels)
    if vanished:
        warnings.warn(
            f"trimap '{path}': {vanished} strokes' pixels vanish at the mask's "
            f"{size[1]}x{size[0]} (strokes thinner than {height / size[0]:.3g} px fall between "
            "the pixels kept); draw them thicker or make the mask larger",
            MaskWarning,
            stacklevel=2,
        )
    return torch.from_numpy(levels.astype(np.float32) / 2)


def _vanished(drawn: dict[int, np.ndarray], levels: np.ndarray) -> str:
    """"N% of the white and M% of the black" strokes' pixels lost when a trimap is shrunk to
    ``levels`` (0 black, 1 grey, 2 white in each cell), each where above MAX_VANISHED_SHARE;
    ``drawn[level]``: how many pixels of that level each cell held before (or what share)."""
    shares = {"white": _vanished_share(drawn[2], levels == 2),
              "black": _vanished_share(drawn[0], levels == 0)}  # fmt: skip
    return " and ".join(f"{share:.0%} of the {colour}" for colour, share in shares.items()
                        if share > MAX_VANISHED_SHARE)  # fmt: skip


def _vanished_share(drawn: np.ndarray, kept: np.ndarray) -> float:
    """The share of a level's pixels in the trimap (``drawn``: how many each cell of the mask
    holds) whose cell, and the 8 around it, kept none of the level (``kept``, bool). The 8
    around: a stroke's edge falls in cells whose kept pixel lies just beside it, so a
    thick stroke comes out a cell thinner, which is no loss."""
    near = kept.copy()
    near[1:] |= kept[:-1]
    near[:-1] |= kept[1:]
    around = near.copy()
    around[:, 1:] |= near[:, :-1]
    around[:, :-1] |= near[:, 1:]
    total = drawn.sum()  # none where a trimap tensor's known pixels are not exactly 0 and 1
    return float(drawn[~around].sum() / total) if total else 0.0


def _check_three_levels(histogram: np.ndarray, path: PathArg) -> None:
    """A grey-scale photo is no trimap: its matte would be the photo itself. ``histogram``:
    the trimap's pixel counts at 0-255."""
    tolerance = TRIMAP_TOLERANCE
    black, white = histogram[: tolerance + 1], histogram[255 - tolerance :]
    between = histogram[tolerance + 1 : 255 - tolerance]  # levels tolerance + 1 ... 254 - tolerance
    unknown = int(between.argmax())
    near_grey = between[max(0, unknown - tolerance) : unknown + tolerance + 1]
    share = float((black.sum() + white.sum() + near_grey.sum()) / histogram.sum())
    if share < MIN_TRIMAP_SHARE:
        raise MaskError(
            f"trimap '{path}' is not a trimap: only {share:.0%} of its pixels are black, white "
            f"or its most common grey, a trimap has at least {MIN_TRIMAP_SHARE:.0%}; paint it "
            "white inside, black outside and one grey where unsure (not the photo itself)"
        )


def _import_matting(progress: bool):
    """pymatting's solver, imported; with ``progress``, a slow import (its first after
    installing, which compiles it) says so on stderr once it has taken a while."""
    if not progress or "pymatting" in sys.modules:
        from pymatting import estimate_alpha_cf

        return estimate_alpha_cf
    line = "loading pymatting: its first use after installing compiles it (about 30 s, once)"
    notice = threading.Timer(
        MATTING_IMPORT_NOTICE_SECONDS, print, (line,), {"file": sys.stderr, "flush": True}
    )
    notice.daemon = True
    notice.start()
    try:
        from pymatting import estimate_alpha_cf
    finally:
        notice.cancel()
    return estimate_alpha_cf


def matte(
    image: torch.Tensor,
    trimap: torch.Tensor,
    max_pixels: int | None = MATTING_PIXELS,
    progress: bool = False,
) -> torch.Tensor:
    """Soft foreground mask ``alpha (H, W)`` in [0, 1] by closed-form matting (Levin et al.).

    ``image`` is ``(3, H, W)`` RGB in [0, 1]; ``trimap`` is ``(H, W)``: 0 = background,
    1 = foreground, 0.5 = unknown (pymatting's thresholds: <= 0.1 and >= 0.9 are known).
    Scribbles work too: a trimap that is mostly unknown with a few strokes of 0 and 1 (slower:
    every unknown pixel is solved for). Images above ``max_pixels`` are matted at reduced
    resolution and alpha is upsampled, then the known pixels are restored exactly. With
    ``progress``, says on stderr how many pixels are matted and about how long it may take.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"matte expects a (3, H, W) image, got shape {tuple(image.shape)}")
    if tuple(trimap.shape) != tuple(image.shape[1:]):
        raise MaskError(
            f"trimap is {trimap.shape[-1]}x{trimap.shape[0]} but the image is "
            f"{image.shape[-1]}x{image.shape[-2]}; draw the trimap over the image itself"
        )
    trimap = trimap.float().cpu()
    foreground, background = trimap >= 0.9, trimap <= 0.1
    if not foreground.any() or not background.any():
        missing = "foreground (white)" if not foreground.any() else "background (black)"
        raise MaskError(f"trimap has no {missing} pixels; mark some of each")
    unknown = ~(foreground | background)
    if not unknown.any():
        return foreground.float()
    trimap = torch.where(foreground, 1.0, torch.where(background, 0.0, 0.5))

    height, width = trimap.shape
    scale = min(1.0, (max_pixels / (height * width)) ** 0.5) if max_pixels else 1.0
    small = (max(1, round(height * scale)), max(1, round(width * scale)))
    small_image = image.detach().float().cpu()
    small_trimap = trimap
    if small != (height, width):
        small_image = F.interpolate(small_image[None], size=small, mode="area")[0]
        # Known only where the whole cell is known: a cell straddling a known edge is unknown.
        small_trimap = F.adaptive_avg_pool2d(trimap[None, None], small)[0, 0]
        fully_known = (small_trimap >= 1) | (small_trimap <= 0)
        small_trimap = torch.where(fully_known, small_trimap, torch.full_like(small_trimap, 0.5))
        if not (small_trimap >= 0.9).any() or not (small_trimap <= 0.1).any():
            raise MaskError("trimap's strokes vanish at matting resolution; draw thicker strokes")
        drawn = {
            level: F.adaptive_avg_pool2d((trimap == level / 2)[None, None].float(), small)[0, 0]
            for level in (0, 2)
        }  # each cell's share of the level, which counts its pixels (cells are alike)
        vanished = _vanished(
            {level: share.numpy() for level, share in drawn.items()},
            (small_trimap * 2).round().to(torch.uint8).numpy(),
        )
        if vanished:
            warnings.warn(
                f"trimap: {vanished} strokes' pixels vanish when matting at {small[1]}x{small[0]} "
                f"(a pixel there is known only where all {height / small[0]:.3g}x"
                f"{width / small[1]:.3g} of the mask's are: thinner strokes can fall between); "
                f"draw them thicker or make the mask at most {small[1]}x{small[0]}",
                MaskWarning,
                stacklevel=2,
            )

    estimate_alpha_cf = _import_matting(progress)
    if progress:
        unknowns = int(((small_trimap > 0.1) & (small_trimap < 0.9)).sum())
        seconds = math.ceil(unknowns * MATTING_SECONDS_PER_UNKNOWN)
        print(
            f"matting {unknowns:,} unknown pixels at {small[1]}x{small[0]}: up to about "
            f"{seconds} s",
            file=sys.stderr,
            flush=True,
        )
    # pymatting prints five lines to stdout when its preconditioner needs a second try (scribbles
    # on the 384x288 tubingen): nothing a user can act on, in the way of a pipe
    with contextlib.redirect_stdout(io.StringIO()):
        alpha = estimate_alpha_cf(
            small_image.permute(1, 2, 0).double().numpy(), small_trimap.double().numpy()
        )
    alpha = torch.from_numpy(alpha).float()
    if small != (height, width):
        alpha = F.interpolate(alpha[None, None], size=(height, width), mode="bilinear")[0, 0]
    alpha = torch.where(foreground, 1.0, torch.where(background, 0.0, alpha))
    return alpha.clamp_(0, 1)
