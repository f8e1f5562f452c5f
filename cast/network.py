"""The VGG feature extractor, its layers named the way the style-transfer literature names them."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from .weights import ARCHITECTURES, DEFAULT_MODEL, VGGWeights, load_vgg

# Gatys et al. (2016): content from relu4_2, style from the first ReLU of every block.
CONTENT_LAYERS = ("relu4_2",)
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")

POOLINGS = ("avg", "max")

# The network's parameters and constants, whatever the caller's default dtype: the weights are
# float32 (cast.weights), and a float64 network beside float32 images and stores fails where
# they meet (a tiled step) and changes the numbers everywhere else.
DTYPE = torch.float32


def layer_names(architecture: str) -> tuple[str, ...]:
    """``conv1_1, relu1_1, conv1_2, ..., pool1, conv2_1, ...`` for ``architecture``."""
    names = []
    for block, convs in enumerate(ARCHITECTURES[architecture], start=1):
        for conv in range(1, len(convs) + 1):
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
        names.append(f"pool{block}")
    return tuple(names)


class VGGFeatures(nn.Module):
    """Frozen VGG-16/19 features of RGB images, by layer name.

    ``model`` is a name from ``cast.weights.MODELS``, a weights file path, or ``VGGWeights``.
    ``pooling="avg"`` (default here) replaces VGG's max pooling by average pooling, Gatys et
    al.'s choice for image synthesis (smoother gradients); ``"max"`` keeps the original network.
    ``cast.stylize`` defaults to ``"max"`` instead (measured closer to neural-style's results:
    README, Departures from the paper) and always passes its own: to get the network it runs
    by default, give ``pooling="max"``.
    """

    def __init__(self, model: str | VGGWeights = DEFAULT_MODEL, pooling: str = "avg"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        weights = model if isinstance(model, VGGWeights) else load_vgg(model)
        self.architecture = weights.architecture
        self.layer_names = layer_names(weights.architecture)
        self.pooling = pooling
        self.source = weights.source

        layers, convs = OrderedDict(), iter(zip(weights.weights, weights.biases, strict=True))
        for name in self.layer_names:
            if name.startswith("conv"):
                weight, bias = next(convs)
                # uninitialised: a default init would draw from the caller's global generator
                conv = nn.utils.skip_init(nn.Conv2d, weight.shape[1], weight.shape[0], 3,
                                          padding=1, dtype=DTYPE)  # fmt: skip
                conv.weight.data.copy_(weight)
                conv.bias.data.copy_(bias)
                layers[name] = conv
            elif name.startswith("relu"):
                # Not in place: a requested conv output must survive the ReLU after it.
                layers[name] = nn.ReLU()
            else:
                layers[name] = nn.AvgPool2d(2) if pooling == "avg" else nn.MaxPool2d(2)
        self.layers = nn.Sequential(layers)

        prep = weights.preprocessing
        self.bgr = prep.bgr
        constant = lambda values: torch.tensor(values, dtype=DTYPE)  # noqa: E731
        self.register_buffer("scale", constant(prep.scale), persistent=False)
        self.register_buffer("mean", constant(prep.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", constant(prep.std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def poolings_before(self, layer: str) -> int:
        """How many 2x poolings lie before ``layer``'s output, a pooling layer's own included:
        each of its cells sees 2**that pixels a side (each pooling rounds down, so trailing rows
        and columns of odd sizes reach no cell)."""
        up_to = self.layer_names[: self.layer_names.index(layer) + 1]
        return sum(name.startswith("pool") for name in up_to)

    def stride(self, layer: str) -> int:
        """Pixels between neighbouring cells of ``layer``."""
        return 2 ** self.poolings_before(layer)

    def channels(self, layer: str) -> int:
        """Feature maps of ``layer``: those of the last convolution up to it."""
        names = self.layer_names[: self.layer_names.index(layer) + 1]
        return next(self.layers.get_submodule(n) for n in reversed(names) if n.startswith("conv")
                    ).out_channels  # fmt: skip

    def reach(self, layer: str) -> int:
        """Pixels beyond a cell's own ``stride x stride`` square that its value depends on, on
        each side: every convolution before it widens the receptive field by its radius times
        the stride it runs at (poolings only merge whole cells)."""
        reach, stride = 0, 1
        for name, module in self.layers.named_children():
            if isinstance(module, nn.Conv2d):
                reach += module.kernel_size[0] // 2 * stride
            elif name.startswith("pool"):
                stride *= 2
            if name == layer:
                return reach
        raise ValueError(f"unknown layer {layer!r} for {self.architecture}")

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """RGB ``(B, 3, H, W)`` in [0, 1] to the network's input convention."""
        if self.bgr:
            image = image.flip(1)
        return (image * self.scale - self.mean) / self.std

    def forward(
        self, image: torch.Tensor, layers: Sequence[str],
        windows: dict[str, tuple[int, int, int, int]] | None = None, start: str | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Features ``{name: (B, C_l, H_l, W_l)}`` of ``image`` (``(B, 3, H, W)`` RGB in [0, 1]).

        Runs only as deep as the deepest requested layer. ``windows``: per layer name, the
        part ``(top, bottom, left, right)`` of the image's pixels (corners on that layer's
        grid) whose cells its output keeps; the layers after it run on those alone (a tile's
        crop: deeper layers need less of its halo). ``start``: ``image`` is that layer's output
        instead, and the layers after it run (the deep segment of a tiled objective).
        """
        if isinstance(layers, str):
            layers = (layers,)
        unknown = [name for name in layers if name not in self.layer_names]
        if unknown:
            raise ValueError(
                f"unknown layer(s) {unknown} for {self.architecture}; "
                f"known: {', '.join(self.layer_names)}"
            )
        if start is None and (image.dim() != 4 or image.shape[1] != 3):
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(image.shape)}")
        wanted = set(layers)
        deepest = max(self.layer_names.index(name) for name in wanted) if wanted else -1
        first = 0 if start is None else self.layer_names.index(start) + 1
        features, x = {}, self.preprocess(image) if start is None else image
        top = left = 0  # the pixel at x's first cell
        for name, layer in list(self.layers.named_children())[first : deepest + 1]:
            x = layer(x)
            if windows and name in windows:
                stride = self.stride(name)
                w_top, w_bottom, w_left, w_right = windows[name]
                w_top, w_left = max(top, w_top), max(left, w_left)  # never wider than x
                rows = slice((w_top - top) // stride, (w_bottom - top) // stride)
                x = x[..., rows, (w_left - left) // stride : (w_right - left) // stride]
                top, left = w_top, w_left
            if name in wanted:
                features[name] = x
        return features
