"""The objective of one scale, as value and gradient with respect to the image.

``content_weight * content + style_weight * mean_layers(style) + tv_weight * TV`` (SPEC §4).
Every implementation offers ``value_and_grad(image (3, H, W)) -> (loss, grad)``, which is all an
optimiser needs:

- ``WholeImage`` differentiates the whole image in one autograd graph;
- ``Tiled`` runs the network on one crop at a time (SPEC §5): a statistics pass without autograd
  adds up every tile's Gram sums and content and TV errors, the loss and ``dL/dG`` are formed once
  from the global statistics, then a gradient pass back-propagates each tile's share
  ``<dL/dG, S_t / n_k>`` (plus its owned content and TV terms) through its crop. Its memory is one
  crop's, and its result the whole image's up to float summation order.

The targets are gathered tile by tile in both cases (one tile when untiled), each image on its
own segments cut as the steps' are (``Crops``), in one pass without autograd.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from . import masks, ondisk, tiling
from .distributed import ALONE, Shard
from .losses import ContentLoss, GramStats, StyleLoss, TVLoss, gram_sums, gram_sums_grad
from .network import CONTENT_LAYERS, STYLE_LAYERS
from .ondisk import Store
from .reference import inverse, mask_mass
from .tiling import Segment, Tile, TilePlan, segments

Spill = bool | str | Path  # where image-sized state goes: False (RAM), True or a directory


class WholeImage(nn.Module):
    """The objective of the whole image as one autograd graph."""

    def __init__(self, network, content_losses, style_losses, weights):
        super().__init__()
        self.network = network
        self.content_losses = nn.ModuleDict(content_losses)
        self.style_losses = nn.ModuleDict(style_losses)
        self.tv_loss = TVLoss()
        self.content_weight, self.style_weight, self.tv_weight = weights
        self.layers = tuple(dict.fromkeys([*content_losses, *style_losses]))

    def forward(self, image: Tensor) -> Tensor:
        features = self.network(image[None], self.layers)
        content = sum(loss(features[name]) for name, loss in self.content_losses.items())
        style = sum(loss(features[name]) for name, loss in self.style_losses.items())
        return (
            self.content_weight * content
            + self.style_weight * style / len(self.style_losses)
            + self.tv_weight * self.tv_loss(image[None])
        )

    def value_and_grad(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """The loss (a detached scalar) and its gradient ``(3, H, W)`` at ``image``."""
        x = image.detach().requires_grad_()
        with torch.enable_grad():
            loss = self(x)
        (grad,) = torch.autograd.grad(loss, x)
        return loss.detach(), grad


class Crops:
    """The network run segment by segment (``cast.tiling.segments``), one tile's crop at a
    time: a segment's crops read the image or the previous segment's output at the cut, an
    image-wide store (in RAM or on disk: ``spill``) that ``forwards`` fills with its tiles'
    owned cells. ``layers``: the layers wanted of the network. ``shard`` deals the
    tiles to the ranks of a process group."""

    def __init__(self, network, segments: tuple[Segment, ...], layers: Sequence[str],
                 shard: Shard = ALONE, spill: Spill = False):  # fmt: skip
        self.network, self.segments, self.layers = network, segments, tuple(layers)
        self.shard, self.spill = shard, spill
        self.strides = {layer: network.stride(layer) for layer in network.layer_names}

    def forwards(self, image: Store, inputs: list | None = None, keep_last: bool = False):
        """Every tile's ``(segment, tile, crop, features)`` of the ranks' tiles, segment by
        segment, without autograd; with it for the last tile of all where ``keep_last`` (the
        crop then requires grad). Each segment but the last writes its end's owned cells into
        the next one's input, shared among the ranks; ``inputs``, where given, receives the
        segments' inputs (the image, then each cut)."""
        inputs = [] if inputs is None else inputs
        inputs.append(image)
        for segment in self.segments:
            cut = self._cut(segment, image)
            tiles = self.shard.mine(segment.plan.tiles)
            for tile in tiles:
                keep = keep_last and segment is self.segments[-1] and tile is tiles[-1]
                with torch.set_grad_enabled(keep):
                    crop, features = self.forward(segment, inputs[-1], tile)
                yield segment, tile, crop, features
                if cut is not None:
                    cut.write(_rect(self.cut_cells(segment, tile)[0]),
                              self.cut_features(segment, tile, features))  # fmt: skip
                del crop, features
            if cut is not None:
                inputs.append(self.shard.all_reduce_store(cut))

    def forward(self, segment: Segment, source: Store, tile: Tile) -> tuple[Tensor, dict]:
        """The tile's crop of the segment's input ``source``, and the segment's features on
        it (the layers wanted that it holds, and its end); differentiable where autograd is
        on."""
        crop = source.read(self.input_rect(segment, tile)).detach()
        crop.requires_grad_(torch.is_grad_enabled())
        wanted = [layer for layer in self.layers if layer in segment.margins]
        features = self.network(crop[None], tuple(dict.fromkeys([*wanted, segment.end])),
                                tile.windows(segment.margins), start=segment.start)  # fmt: skip
        return crop, features

    def input_rect(self, segment: Segment, tile: Tile) -> ondisk.Rect:
        """The tile's crop in its segment's input: image pixels, or cells of the cut."""
        stride = 1 if segment.start is None else self.strides[segment.start]
        return tuple(p // stride for p in tile.crop)

    def cells(self, segment: Segment, tile: Tile, layer: str):
        """The tile's owned cells of ``layer``: of the whole grid, and of the crop's output."""
        return tile.cells(self.strides[layer], segment.margins[layer])

    def cut_cells(self, segment: Segment, tile: Tile):
        """The tile's owned cells of the segment's end: of the whole grid, and of its output."""
        return self.cells(segment, tile, segment.end)

    def cut_features(self, segment: Segment, tile: Tile, features) -> Tensor:
        """``(C, h, w)``: the segment's end at the tile's owned cells."""
        local = self.cut_cells(segment, tile)[1]
        return features[segment.end][0, :, local[0], local[1]]

    def owned(self, grid_masks: Store, segment: Segment, tile: Tile, layer: str,
              kernels: Tensor, dtype: torch.dtype):  # fmt: skip
        """The op's inputs for the tile's share of ``layer``: its masks (zero outside the
        owned cells) and ``kernels`` in ``dtype``, and the cells of the layer's output they lie
        on (``owned_masks``)."""
        masks, cells = owned_masks(grid_masks, tile, self.strides[layer], segment.margins[layer],
                                   kernels.shape[-1] // 2, dtype)  # fmt: skip
        return masks, kernels.to(dtype), cells

    def sums(self, grid_masks: Store, segment: Segment, tile: Tile, layer: str,
             features: Tensor, kernels: Tensor, backend) -> Tensor:  # fmt: skip
        """Gram sums ``(1, J, K, C, C)`` of ``features``, the crop's output of ``layer``, over
        the tile's owned cells."""
        masks, kernels, cells = self.owned(grid_masks, segment, tile, layer, kernels,
                                           features.dtype)  # fmt: skip
        return gram_sums(features[cells], masks, kernels, backend=backend)

    def _cut(self, segment: Segment, image: Store) -> Store | None:
        """A zero store for the segment's output over the whole image, unless it is the last."""
        if segment is self.segments[-1]:
            return None
        stride = self.strides[segment.end]
        shape = (self.network.channels(segment.end), *(s // stride for s in image.shape[-2:]))
        return ondisk.zeros(shape, image.dtype, image.device, self.spill)


class Tiled(WholeImage):
    """The same objective, one crop at a time (see the module's docstring), segment by segment
    (``Crops``); the gradient pass runs the segments last first, each handing its input's
    gradient to the one before.

    Its image-sized state (the content targets, the masks on every style layer's grid, the
    cut and its gradient) is in stores (``cast.ondisk``), in RAM or on disk (``spill``);
    ``value_and_grad`` takes the image as a tensor or a store and gives the gradient in the
    same kind. ``shard`` deals the tiles to the ranks of a process group; every rank returns the
    same loss and gradient.
    """

    def __init__(self, network, content_targets: dict[str, Store], style_losses,
                 style_masks: dict[str, Store], masses: dict[str, Tensor], weights,
                 segments: tuple[Segment, ...], kernels, backend, shard: Shard = ALONE,
                 spill: Spill = False):  # fmt: skip
        super().__init__(network, {}, style_losses, weights)
        self.layers = tuple(dict.fromkeys([*content_targets, *style_losses]))
        self.crops = Crops(network, segments, self.layers, shard, spill)
        self.kernels, self.backend, self.shard = kernels, backend, shard
        self.content_targets, self.style_masks = content_targets, style_masks
        self.content_scales = {layer: ContentLoss.scale_of(_square_sum(target))
                               for layer, target in content_targets.items()}  # fmt: skip
        # 1 / n_k broadcast over (J, K, C, C)
        self.inverse_mass = [inverse(masses[layer])[:, None, None] for layer in style_losses]

    @property
    def segments(self) -> tuple[Segment, ...]:
        return self.crops.segments

    @property
    def plan(self) -> TilePlan:
        """The first segment's tiles: those of the image."""
        return self.segments[0].plan

    def value_and_grad(self, image: Tensor | Store) -> tuple[Tensor, Tensor | Store]:
        given = image
        image = ondisk.InRam(image.detach()) if isinstance(image, Tensor) else image
        device = image.device
        style_losses = self.style_losses.items()
        # 1. statistics pass: Gram sums per style layer, then the content and TV errors; each
        # segment but the last leaves its cut's owned cells in the next one's input. The last
        # tile of all keeps its graph: the gradient pass starts with it, without a forward.
        parts = [
            torch.zeros(loss.target.shape, dtype=loss.target.dtype, device=device)
            for _, loss in style_losses
        ] + [torch.zeros((), dtype=torch.float64, device=device) for _ in range(2)]
        inputs, kept = [], None
        for segment, tile, crop, features in self.crops.forwards(image, inputs, keep_last=True):
            with torch.set_grad_enabled(crop.requires_grad):
                share = self._shares(segment, tile, crop, features)
            with torch.no_grad():
                for sums, layer in zip(parts, self.style_losses, strict=False):
                    if layer in features:
                        sums += self.crops.sums(self.style_masks[layer], segment, tile, layer,
                                                features[layer], self.kernels,
                                                self.backend)[0]  # fmt: skip
                parts[-2] += share[0]
                parts[-1] += share[1]
            if crop.requires_grad:
                kept = tile, crop, features, share
            del crop, features, share
        flat = self.shard.all_reduce(torch.cat([p.flatten().double() for p in parts]))
        parts = [f.view_as(p).to(p.dtype) for f, p in zip(flat.split([p.numel() for p in parts]),
                                                         parts, strict=True)]  # fmt: skip
        content, tv = parts[-2], parts[-1]

        # 2. the loss and dL/dG from the global statistics
        grams = [(sums * inverse).requires_grad_()
                 for sums, inverse in zip(parts, self.inverse_mass, strict=False)]  # fmt: skip
        with torch.enable_grad():
            style = sum(loss.of_gram(g[None]) for g, (_, loss) in zip(grams, style_losses,
                                                                      strict=True))  # fmt: skip
            style = self.style_weight * style / len(self.style_losses)
        d_grams = torch.autograd.grad(style, grams)
        loss = style.detach() + (self.content_weight * content + self.tv_weight * tv).to(style)

        # 3. gradient pass, the last segment first: each tile's share, with dL/dG of the global
        # statistics, and the later segment's gradient at the cut's owned cells. The style
        # share <dL/dG, S_t / n_k> is linear in the tile's sums, so its gradient with respect to
        # a layer's features is the op's backward alone (its forward would be wasted); one
        # backward through the segment then takes them with the content, TV and cut shares.
        weights = dict(zip(self.style_losses, (d * inverse for d, inverse in
                                               zip(d_grams, self.inverse_mass, strict=True)),
                           strict=True))  # fmt: skip
        d_cut = None
        for segment in reversed(self.segments):
            source = inputs.pop()  # (the cut goes once its segment is done: d_cut is enough)
            grad = source.zeros_like()
            tiles = list(self.shard.mine(segment.plan.tiles))
            if kept is not None and segment is self.segments[-1]:
                tiles = [kept[0], *tiles[:-1]]
            for tile in tiles:
                if kept is not None and tile is kept[0]:
                    (_, crop, features, share), kept = kept, None
                else:
                    with torch.enable_grad():
                        crop, features = self.crops.forward(segment, source, tile)
                        share = self._shares(segment, tile, crop, features)
                share = self.content_weight * share[0] + self.tv_weight * share[1]
                outputs, d_outputs = [share], [torch.ones_like(share)]
                for layer in self.style_losses:
                    if layer in features:
                        masks, kernels, cells = self.crops.owned(
                            self.style_masks[layer], segment, tile, layer, self.kernels,
                            features[layer].dtype)  # fmt: skip
                        outputs.append(features[layer][cells])
                        d_outputs.append(gram_sums_grad(outputs[-1], masks, kernels,
                                                        weights[layer][None],
                                                        backend=self.backend))  # fmt: skip
                if d_cut is not None:
                    outputs.append(self.crops.cut_features(segment, tile, features))
                    d_outputs.append(d_cut.read(_rect(self.crops.cut_cells(segment, tile)[0])))
                # (a share that is a constant, no content or TV term in the segment, is skipped)
                use = [o.requires_grad for o in outputs]
                (crop_grad,) = torch.autograd.grad(
                    [o for o, u in zip(outputs, use, strict=True) if u],
                    crop, [d for d, u in zip(d_outputs, use, strict=True) if u],
                )  # fmt: skip
                grad.add(self.crops.input_rect(segment, tile), crop_grad)
                del crop, features, share, outputs, d_outputs, crop_grad
            d_cut = self.shard.all_reduce_store(grad)
        return loss.detach(), grad.read() if isinstance(given, Tensor) else grad

    def _shares(self, segment: Segment, tile: Tile, crop: Tensor, features) -> tuple:
        """The tile's ``(content, TV)`` shares (0-d tensors; TV in the first segment only)."""
        zero = torch.zeros((), dtype=crop.dtype, device=crop.device)
        content = self._content(features, tile, segment) + zero
        return content, self._tv(crop, tile) if segment.start is None else zero

    def _content(self, features: dict[str, Tensor], tile: Tile, segment: Segment) -> Tensor:
        """The content term's share of the tile's owned cells (``ContentLoss``, by parts)."""
        total = 0
        for layer, target in self.content_targets.items():
            if layer in features:
                whole, local = self.crops.cells(segment, tile, layer)
                error = features[layer][..., local[0], local[1]] - target.read(_rect(whole))
                total = total + error.square().sum() * self.content_scales[layer]
        return total

    def _tv(self, crop: Tensor, tile: Tile) -> Tensor:
        """``TVLoss`` by parts: the differences ``x[n] - x[n + 1]`` whose first pixel ``n`` the
        tile owns (the crop holds the next pixel: its halo is at least one stride wide)."""
        H, W = self.plan.height, self.plan.width
        top, bottom, left, right = tile.owned
        y, x = tile.crop[0], tile.crop[2]
        dx = crop[:, top - y : bottom - y, left - x : min(right + 1, W) - x].diff(dim=-1)
        dy = crop[:, top - y : min(bottom + 1, H) - y, left - x : right - x].diff(dim=-2)
        return self.tv_loss.of_differences(dx, dy, (1, 3, H, W))


def _rect(cells: tuple[slice, slice]) -> ondisk.Rect:
    rows, cols = cells
    return rows.start, rows.stop, cols.start, cols.stop


def _square_sum(store: Store) -> Tensor:
    """``sum(x^2)`` of a store, a chunk of rows at a time."""
    return sum(store.read(rows).square().sum() for rows in store.chunks())


def owned_masks(grid_masks: Store, tile: Tile, stride: int, margin: int, radius: int,
                dtype: torch.dtype) -> tuple[Tensor, tuple[slice, ...]]:  # fmt: skip
    """The op's masks for a tile's share of a layer of ``stride`` px whose output covers the
    tile's window of ``margin`` px: ``(K, h, w)``, the whole image's masks (``grid_masks``, on
    the layer's whole grid) at the owned cells, 0 around them (SPEC §5: the masks do the
    ownership; the kernels still see the neighbours). They cover the owned cells and the
    ``radius`` cells around them that the kernels read, no more (the op's cost is per cell);
    the second result is that part of the layer's output, ``(..., rows, cols)``."""
    whole, local = tile.cells(stride, margin)
    h, w = tile.grid(stride, margin)
    rows, cols = _around(local[0], radius, h), _around(local[1], radius, w)
    owned = torch.zeros(grid_masks.shape[0], rows.stop - rows.start, cols.stop - cols.start,
                        dtype=dtype, device=grid_masks.device)  # fmt: skip
    inside = (slice(local[0].start - rows.start, local[0].stop - rows.start),
              slice(local[1].start - cols.start, local[1].stop - cols.start))  # fmt: skip
    owned[:, inside[0], inside[1]] = grid_masks.read(_rect(whole))
    return owned, (Ellipsis, rows, cols)


def _around(cells: slice, radius: int, size: int) -> slice:
    """``cells`` and ``radius`` more on each side, within ``size``; one cell at least (a
    ragged tile may own none of a deep layer's: a zero statistic, not an empty feature map)."""
    start = max(0, min(cells.start - radius, size - 1))
    return slice(start, max(start + 1, min(size, cells.stop + radius)))


@torch.no_grad()
def gather(
    network, image: Tensor | Store, segments: tuple[Segment, ...], grid_masks: dict[str, Store],
    masses: dict[str, Tensor], kernels: Tensor, backend, keep: tuple[str, ...] = (),
    shard: Shard = ALONE, spill: Spill = False,
) -> tuple[dict[str, GramStats], dict[str, Store]]:  # fmt: skip
    """Statistics of ``image`` tile by tile, on its ``segments``: per layer of
    ``grid_masks`` (masks on that layer's whole grid, of mass ``masses``) its ``GramStats``, and
    the whole features ``(1, C, h, w)`` of the ``keep`` layers, assembled from the tiles' owned
    cells into stores (on disk when ``spill``)."""
    image = ondisk.InRam(image) if isinstance(image, Tensor) else image
    J, K = len(kernels), next(iter(grid_masks.values())).shape[0]
    sums = {layer: torch.zeros(J, K, network.channels(layer), network.channels(layer),
                               dtype=image.dtype, device=image.device)
            for layer in grid_masks}  # fmt: skip
    kept = {layer: ondisk.zeros((1, network.channels(layer),
                                 *(s // network.stride(layer) for s in image.shape[-2:])),
                                image.dtype, image.device, spill)
            for layer in keep}  # fmt: skip
    crops = Crops(network, segments, (*keep, *grid_masks), shard, spill)
    for segment, tile, crop, features in crops.forwards(image):
        for layer, layer_masks in grid_masks.items():
            if layer in features:
                sums[layer] += crops.sums(layer_masks, segment, tile, layer, features[layer],
                                          kernels, backend)[0]  # fmt: skip
        for layer in keep:
            if layer in features:
                whole, local = crops.cells(segment, tile, layer)
                kept[layer].write(_rect(whole), features[layer][..., local[0], local[1]])
        del crop, features  # before the next tile's forward
    # owned cells are disjoint: the zeros elsewhere add exactly
    for t in sums.values():
        shard.all_reduce(t)
    for store in kept.values():
        shard.all_reduce_store(store)
    stats = {layer: GramStats(sums[layer], masses[layer].to(sums[layer].dtype))
             for layer in grid_masks}  # fmt: skip
    return stats, kept


def build(
    network, content, styles, content_masks, style_masks, kernels, content_weight, style_weight,
    tv_weight, backend, tile: int = 0, shard: Shard = ALONE, *,
    content_layers: Sequence[str] = CONTENT_LAYERS, style_layers: Sequence[str] = STYLE_LAYERS,
    blend: Sequence[float] | None = None, spill: Spill = False,
) -> WholeImage:  # fmt: skip
    """The objective at this scale: its targets are the content features, and per style layer
    the pooled statistics of every style image's regions; a region no style image has keeps its
    own statistics. ``tile`` px tiles (a multiple of the stride) or ``0``: the whole image.
    ``blend``: one weight per style image, each region's target the weighted mean of the styles'
    Grams there; default, the styles pool their positions (a larger image counts more).
    ``spill`` (True, or a directory): the image-sized state goes to disk (``cast.ondisk``) as it
    is made, and the objective is tiled even with one tile; the caller may then drop the
    content and style images and the masks."""
    content_layers, style_layers = tuple(content_layers), tuple(style_layers)
    # the targets: one pass without autograd on each image, on segments cut as the steps' are
    radius = kernels.shape[-1] // 2
    segments_of = lambda image, keep=(): segments(network, keep, style_layers, radius,  # noqa: E731
                                                  tuple(image.shape[-2:]), tile, shard.world)

    # A region's statistics, the style's and the result's alike, come only from cells whose
    # kernel neighbourhood and one cell more lie inside it: a deep layer's cell sees far across
    # the border, and would carry the neighbouring region's look into the region's.
    inside = radius + 1

    def grid_masks(region_masks, image):
        """Per style layer, the masks on its grid (a store, made one layer at a time) and their
        mass."""
        stores, masses = {}, {}
        for layer in style_layers:
            grid = on_grid(region_masks, image.shape[-2:], network.poolings_before(layer))
            stores[layer] = ondisk.zeros(grid.shape, grid.dtype, grid.device, spill)
            # eroded a store's chunk of rows at a time: at the first layer the grid is the
            # image's size, and an eroded copy of it is what peaked in a large image's targets
            rows = ondisk.chunk_rows(grid.shape, grid.element_size())
            mass = torch.zeros(grid.shape[0], dtype=torch.float64, device=grid.device)
            for top, band in masks.inner_bands(grid, inside, rows):
                stores[layer].write((top, top + band.shape[-2], 0, band.shape[-1]), band)
                mass += mask_mass(band.double())
            masses[layer] = mass.to(grid.dtype)
            del grid
        return stores, masses

    # the styles first: their masks on every grid are gone before the content's features come
    pooled = None
    for i, (style, mask) in enumerate(zip(styles, style_masks, strict=True)):
        stats, _ = gather(network, style, segments_of(style), *grid_masks(mask, style),
                          kernels, backend, shard=shard, spill=spill)  # fmt: skip
        if blend is not None:
            stats = {layer: s.weighted(blend[i]) for layer, s in stats.items()}
        pooled = stats if pooled is None else {k: pooled[k] + stats[k] for k in stats}
    steps = segments_of(content, content_layers)
    region_masks, masses = grid_masks(content_masks, content)
    own, content_features = gather(network, content, steps, region_masks, masses, kernels,
                                   backend, keep=content_layers, shard=shard,
                                   spill=spill)  # fmt: skip
    weights = (content_weight, style_weight, tv_weight)
    tiled = len(steps[0].plan) > 1 or shard.world > 1 or bool(spill)
    style_losses = {
        layer: StyleLoss(
            pooled[layer].mean(fallback=own[layer].mean()),
            None if tiled else region_masks[layer].read(),
            kernels,
            StyleLoss.region_weights(masses[layer]),
            backend=backend,
        )  # fmt: skip
        for layer in style_layers
    }
    if not tiled:
        content_losses = {layer: ContentLoss(content_features[layer].read())
                          for layer in content_layers}  # fmt: skip
        return WholeImage(network, content_losses, style_losses, weights)
    return Tiled(network, content_features, style_losses, region_masks, masses, weights, steps,
                 kernels, backend, shard, spill)  # fmt: skip


def geometry(
    network, kernels: Tensor, content_layers: Sequence[str] = CONTENT_LAYERS,
    style_layers: Sequence[str] = STYLE_LAYERS,
) -> tuple[int, int]:  # fmt: skip
    """``(halo, stride)`` in pixels of this objective's tiles: the halo of the crops a step
    differentiates at full resolution (``cast.tiling.crop_halo``), and the network's total
    stride over the layers used (tile sizes are multiples of it)."""
    stride = max(network.stride(layer) for layer in (*content_layers, *style_layers))
    radius = kernels.shape[-1] // 2
    return tiling.crop_halo(network, content_layers, style_layers, radius), stride


def on_grid(mask: Tensor, image_hw: tuple[int, int], poolings: int) -> Tensor:
    """``mask`` (of an image of ``image_hw``, at any resolution) averaged over the pixels each
    cell of a layer behind ``poolings`` 2x poolings sees.

    Poolings round down, so the trailing rows and columns of the image reach no cell: they are
    cropped first (in proportion when the mask's resolution differs from the image's).
    """
    grid = [side >> poolings for side in image_hw]
    seen = [round(m * g * 2**poolings / i)
            for m, g, i in zip(mask.shape[-2:], grid, image_hw, strict=True)]  # fmt: skip
    return masks.resample(mask[..., : seen[0], : seen[1]], tuple(grid))
