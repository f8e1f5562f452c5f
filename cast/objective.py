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

The targets are gathered tile by tile in both cases (one tile when untiled).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import masks
from .distributed import ALONE, Shard
from .losses import ContentLoss, GramStats, StyleLoss, TVLoss, gram_sums, gram_sums_grad
from .network import CONTENT_LAYERS, STYLE_LAYERS
from .reference import inverse_mass, mask_mass
from .tiling import Tile, TilePlan, halo_for, margins, plan_tiles


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


class Tiled(WholeImage):
    """The same objective, one crop at a time (see the module's docstring).

    ``shard`` deals the tiles to the ranks of a process group; every rank returns the same
    loss and gradient.
    """

    def __init__(self, network, content_losses, style_losses, weights, plan: TilePlan, kernels,
                 backend, shard: Shard = ALONE):  # fmt: skip
        super().__init__(network, content_losses, style_losses, weights)
        self.plan, self.kernels, self.backend, self.shard = plan, kernels, backend, shard
        self.strides = {layer: network.stride(layer) for layer in self.layers}
        self.margins = layer_margins(network, kernels, tuple(content_losses), tuple(style_losses))
        # 1 / n_k broadcast over (J, K, C, C)
        self.inverse_mass = [inverse_mass(loss.masks)[:, None, None]
                             for loss in self.style_losses.values()]  # fmt: skip

    def value_and_grad(self, image: Tensor) -> tuple[Tensor, Tensor]:
        style_losses = self.style_losses.items()
        # 1. statistics pass: Gram sums per style layer, then the content and TV errors
        parts = [
            torch.zeros(loss.target.shape, dtype=loss.target.dtype, device=image.device)
            for _, loss in style_losses
        ] + [image.new_zeros((), dtype=torch.float64) for _ in range(2)]
        with torch.no_grad():
            for tile in self.shard.mine(self.plan.tiles):
                crop = _crop(image, tile)
                features = self.network(crop[None], self.layers, tile.windows(self.margins))
                for sums, (layer, loss) in zip(parts, style_losses, strict=False):
                    sums += self._sums(features[layer], loss, tile, layer)[0]
                parts[-2] += self._content(features, tile)
                parts[-1] += self._tv(crop, tile)
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

        # 3. gradient pass: each tile's share, with dL/dG of the global statistics. The style
        # share <dL/dG, S_t / n_k> is linear in the tile's sums, so its gradient with respect to
        # a layer's features is the op's backward alone (its forward would be wasted); one
        # backward through the network then takes them with the content and TV shares.
        weights = [d * inverse for d, inverse in zip(d_grams, self.inverse_mass, strict=True)]
        grad = torch.zeros_like(image)
        for tile in self.shard.mine(self.plan.tiles):
            crop = _crop(image, tile).detach().requires_grad_()
            with torch.enable_grad():
                features = self.network(crop[None], self.layers, tile.windows(self.margins))
                share = self.content_weight * self._content(features, tile)
                share = share + self.tv_weight * self._tv(crop, tile)
            outputs, d_outputs = [share], [torch.ones_like(share)]
            for weight, (layer, term) in zip(weights, style_losses, strict=True):
                masks, kernels = self._owned(term, tile, layer, features[layer].dtype)
                outputs.append(features[layer])
                d_outputs.append(gram_sums_grad(features[layer], masks, kernels, weight[None],
                                                backend=self.backend))  # fmt: skip
            (crop_grad,) = torch.autograd.grad(outputs, crop, d_outputs)
            top, bottom, left, right = tile.crop
            grad[:, top:bottom, left:right] += crop_grad
        return loss.detach(), self.shard.all_reduce(grad)

    def _sums(self, features: Tensor, loss: StyleLoss, tile: Tile, layer: str) -> Tensor:
        """Gram sums ``(1, J, K, C, C)`` over the tile's owned cells of ``layer``."""
        masks, kernels = self._owned(loss, tile, layer, features.dtype)
        return gram_sums(features, masks, kernels, backend=self.backend)

    def _owned(self, loss: StyleLoss, tile: Tile, layer: str, dtype: torch.dtype):
        """The op's masks (``loss``'s, on the crop's grid of ``layer``, zero outside the tile's
        cells) and kernels, in ``dtype``."""
        masks = owned_masks(loss.masks.to(dtype), tile, self.strides[layer], self.margins[layer])
        return masks, self.kernels.to(dtype)

    def _content(self, features: dict[str, Tensor], tile: Tile) -> Tensor:
        """The content term's share of the tile's owned cells (``ContentLoss``, by parts)."""
        total = 0
        for layer, loss in self.content_losses.items():
            whole, local = tile.cells(self.strides[layer], self.margins[layer])
            error = features[layer][..., local[0], local[1]] - loss.target[..., whole[0], whole[1]]
            total = total + error.square().sum() * loss.scale
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


def _crop(image: Tensor, tile: Tile) -> Tensor:
    top, bottom, left, right = tile.crop
    return image[:, top:bottom, left:right]


def owned_masks(grid_masks: Tensor, tile: Tile, stride: int, margin: int) -> Tensor:
    """``(K, h, w)`` masks on the grid of the tile's window of ``margin`` px: the whole image's
    masks at the owned cells, 0 around them (SPEC §5: the masks do the ownership; the kernels
    still see the neighbours)."""
    owned = grid_masks.new_zeros(grid_masks.shape[0], *tile.grid(stride, margin))
    whole, local = tile.cells(stride, margin)
    owned[:, local[0], local[1]] = grid_masks[:, whole[0], whole[1]]
    return owned


@torch.no_grad()
def gather(
    network, image: Tensor, plan: TilePlan, grid_masks: dict[str, Tensor], kernels: Tensor,
    backend, keep: tuple[str, ...] = (), shard: Shard = ALONE,
) -> tuple[dict[str, GramStats], dict[str, Tensor]]:  # fmt: skip
    """Statistics of ``image`` tile by tile: per layer of ``grid_masks`` (masks on that layer's
    whole grid) its ``GramStats``, and the whole features ``(1, C, h, w)`` of the ``keep``
    layers, assembled from the tiles' owned cells."""
    J, K = len(kernels), next(iter(grid_masks.values())).shape[0]
    new = lambda *shape: image.new_zeros(shape)  # noqa: E731
    sums = {layer: new(J, K, network.channels(layer), network.channels(layer))
            for layer in grid_masks}  # fmt: skip
    kept = {layer: new(1, network.channels(layer), *(s // network.stride(layer)
                                                     for s in image.shape[-2:]))
            for layer in keep}  # fmt: skip
    margin_of = layer_margins(network, kernels, keep, tuple(grid_masks))
    for tile in shard.mine(plan.tiles):
        features = network(_crop(image, tile)[None], tuple(dict.fromkeys([*keep, *grid_masks])),
                           tile.windows(margin_of))  # fmt: skip
        for layer, layer_masks in grid_masks.items():
            owned = owned_masks(layer_masks, tile, network.stride(layer), margin_of[layer])
            sums[layer] += gram_sums(features[layer], owned, kernels, backend=backend)[0]
        for layer in keep:
            whole, local = tile.cells(network.stride(layer), margin_of[layer])
            kept[layer][..., whole[0], whole[1]] = features[layer][..., local[0], local[1]]
    for t in [*sums.values(), *kept.values()]:
        shard.all_reduce(t)  # owned cells are disjoint: the zeros elsewhere add exactly
    stats = {layer: GramStats(sums[layer], mask_mass(m).to(sums[layer].dtype))
             for layer, m in grid_masks.items()}  # fmt: skip
    return stats, kept


def build(
    network, content, styles, content_masks, style_masks, kernels, content_weight, style_weight,
    tv_weight, backend, tile: int = 0, shard: Shard = ALONE, *,
    content_layers: Sequence[str] = CONTENT_LAYERS, style_layers: Sequence[str] = STYLE_LAYERS,
    blend: Sequence[float] | None = None,
) -> WholeImage:  # fmt: skip
    """The objective at this scale: its targets are the content features, and per style layer
    the pooled statistics of every style image's regions; a region no style image has keeps its
    own statistics. ``tile`` px tiles (a multiple of the stride) or ``0``: the whole image.
    ``blend``: one weight per style image, each region's target the weighted mean of the styles'
    Grams there; default, the styles pool their positions (a larger image counts more)."""
    content_layers, style_layers = tuple(content_layers), tuple(style_layers)
    halo, stride = geometry(network, kernels, content_layers, style_layers)
    plan_of = lambda image: plan_tiles(*image.shape[-2:], tile, halo, stride)  # noqa: E731

    # A region's statistics, the style's and the result's alike, come only from cells whose
    # kernel neighbourhood and one cell more lie inside it: a deep layer's cell sees far across
    # the border, and would carry the neighbouring region's look into the region's.
    inside = kernels.shape[-1] // 2 + 1

    def grid_masks(region_masks, image):
        return {layer: masks.inner(on_grid(region_masks, image.shape[-2:],
                                           network.poolings_before(layer)), inside)
                for layer in style_layers}  # fmt: skip

    # the styles first: their masks on every grid are gone before the content's features come
    pooled = None
    for i, (style, mask) in enumerate(zip(styles, style_masks, strict=True)):
        stats, _ = gather(network, style, plan_of(style), grid_masks(mask, style), kernels,
                          backend, shard=shard)  # fmt: skip
        if blend is not None:
            stats = {layer: s.weighted(blend[i]) for layer, s in stats.items()}
        pooled = stats if pooled is None else {k: pooled[k] + stats[k] for k in stats}
    plan = plan_of(content)
    region_masks = grid_masks(content_masks, content)
    own, content_features = gather(network, content, plan, region_masks, kernels, backend,
                                   keep=content_layers, shard=shard)  # fmt: skip
    style_losses = {
        layer: StyleLoss(
            pooled[layer].mean(fallback=own[layer].mean()),
            region_masks[layer],
            kernels,
            backend=backend,
        )  # fmt: skip
        for layer in style_layers
    }
    content_losses = {layer: ContentLoss(content_features[layer]) for layer in content_layers}
    weights = (content_weight, style_weight, tv_weight)
    if len(plan) == 1 and shard.world == 1:
        return WholeImage(network, content_losses, style_losses, weights)
    return Tiled(network, content_losses, style_losses, weights, plan, kernels, backend, shard)


def geometry(
    network, kernels: Tensor, content_layers: Sequence[str] = CONTENT_LAYERS,
    style_layers: Sequence[str] = STYLE_LAYERS,
) -> tuple[int, int]:  # fmt: skip
    """``(halo, stride)`` in pixels of this objective's tiles: the network's total stride over
    the layers used, and the halo that makes tiling exact (``cast.tiling.halo_for``)."""
    stride = max(network.stride(layer) for layer in (*content_layers, *style_layers))
    radius = kernels.shape[-1] // 2
    return halo_for(network, content_layers, style_layers, radius, stride), stride


def layer_margins(network, kernels: Tensor, content_layers: Sequence[str],
                  style_layers: Sequence[str]) -> dict[str, int]:  # fmt: skip
    """What a crop's network keeps of each layer's output (``cast.tiling.margins``), in px."""
    stride = geometry(network, kernels, content_layers, style_layers)[1]
    return margins(network, content_layers, style_layers, kernels.shape[-1] // 2, stride)


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
