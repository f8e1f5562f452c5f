"""The objective of one scale, as value and gradient with respect to the image.

``content_weight * content + style_weight * mean_layers(style) + tv_weight * TV`` (SPEC §4).
Every implementation offers ``value_and_grad(image (3, H, W)) -> (loss, grad)``, which is all an
optimiser needs; ``WholeImage`` differentiates the whole image in one autograd graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import masks
from .losses import ContentLoss, GramStats, StyleLoss, TVLoss
from .network import CONTENT_LAYERS, STYLE_LAYERS


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


@torch.no_grad()
def build(
    network, content, styles, content_masks, style_masks, kernels, content_weight, style_weight,
    tv_weight, backend,
) -> WholeImage:  # fmt: skip
    """Targets at this scale: content features, and per style layer the pooled statistics of
    every style image's regions; a region no style image has keeps its own statistics."""
    content_features = network(content[None], CONTENT_LAYERS + STYLE_LAYERS)
    style_features = [network(s[None], STYLE_LAYERS) for s in styles]
    style_losses = {}
    for layer in STYLE_LAYERS:
        poolings = network.poolings_before(layer)
        region_masks = on_grid(content_masks, content, content_features[layer], poolings)
        own = GramStats.of(content_features[layer], region_masks, kernels, backend=backend)
        per_style = [
            GramStats.of(f[layer], on_grid(m, s, f[layer], poolings), kernels, backend=backend)
            for s, f, m in zip(styles, style_features, style_masks, strict=True)
        ]
        pooled = sum(per_style[1:], start=per_style[0])
        target = pooled.mean(fallback=own.mean())
        style_losses[layer] = StyleLoss(target, region_masks, kernels, backend=backend)
    content_losses = {layer: ContentLoss(content_features[layer]) for layer in CONTENT_LAYERS}
    return WholeImage(
        network, content_losses, style_losses, (content_weight, style_weight, tv_weight)
    )


def on_grid(mask: Tensor, image: Tensor, features: Tensor, poolings: int) -> Tensor:
    """``mask`` (of ``image``, at any resolution) averaged over the pixels each feature cell sees.

    Poolings round down, so the trailing rows and columns of ``image`` reach no cell: they are
    cropped first (in proportion when the mask's resolution differs from the image's).
    """
    grid = features.shape[-2:]
    seen = [
        round(m * g * 2**poolings / i)
        for m, g, i in zip(mask.shape[-2:], grid, image.shape[-2:], strict=True)
    ]
    return masks.resample(mask[..., : seen[0], : seen[1]], grid)
