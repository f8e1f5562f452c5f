"""Seconds per optimisation step of CAST's objective, fused op against plain eager PyTorch.

One step is what L-BFGS pays per iteration: the objective (VGG features, content, masked
high-order style on the five style layers, TV) and its gradient with respect to the image, at
512x512. Rows, all with the same network and the same targets, in one run:

- the network alone: forward to relu5_1 and backward, the floor any objective pays;
- plain Gatys (preset ``none``, one all-ones region) and CAST (``neighbours``: J = 3, and K = 3
  soft regions), each with the fused op (the fastest backend present) and with the plain eager
  implementation: the reference op differentiated by autograd, which materialises the
  ``J*K*N*C`` masked convolved features.

Writes ``bench/results/<cpu>-stylize.md`` (CPU, versions, git sha, date, load average).

    python bench/bench_stylize.py [--size 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from machine import cpu_model, git_sha, slug

from cast import backends, images
from cast.losses import StyleLoss, high_order_kernels
from cast.network import CONTENT_LAYERS, STYLE_LAYERS, VGGFeatures
from cast.objective import build as build_objective
from cast.reference import masked_gram_reference

ROOT = Path(__file__).resolve().parents[1]
CONTENT, STYLE = ROOT / "examples" / "tubingen.jpg", ROOT / "examples" / "starry_night.jpg"
WEIGHTS = (0.3, 1.0, 2.0)  # content, style, TV: any values cost the same


class EagerStyleLoss(StyleLoss):
    """The same loss on the reference op, differentiated by autograd (no custom backward)."""

    def forward(self, features):
        gram = masked_gram_reference(features, self.masks[None], self.kernels)
        error = (gram - self.target).square().sum((-1, -2))
        return (error * self.scale).sum((1, 2)).mean()


def bands(K: int, h: int, w: int) -> torch.Tensor:
    """``K`` soft horizontal bands that overlap where they meet: ``(K, h, w)``."""
    rows = torch.linspace(0, K, h)[:, None].expand(h, w)
    centres = torch.arange(K)[:, None, None] + 0.5
    return (1.5 - (rows - centres).abs()).clamp(0, 1)


def objective(network, size: int, preset: str, K: int, eager: bool):
    content = images.resize(images.load_image(CONTENT), (size, size))
    style = images.resize(images.load_image(STYLE), (size, size))
    masks = bands(K, size, size)
    built = build_objective(
        network, content, [style], masks, [masks], high_order_kernels(preset), *WEIGHTS, None
    )
    if eager:
        for loss in built.style_losses.values():
            loss.__class__ = EagerStyleLoss  # same buffers, autograd through the reference
    return built, content


def network_alone(network, size: int):
    layers = tuple(dict.fromkeys(CONTENT_LAYERS + STYLE_LAYERS))
    return lambda x: sum(f.mean() for f in network(x[None], layers).values())


def seconds_per_step(fn, image: torch.Tensor, repeats: int) -> float:
    x = image.clone().requires_grad_()

    def step():
        x.grad = None
        fn(x).backward()

    step()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    fused = backends.default_for(torch.device("cpu"), torch.float32)
    network = VGGFeatures()
    load_before = os.getloadavg()[0]

    content = images.resize(images.load_image(CONTENT), (args.size, args.size))
    results = {
        "network": seconds_per_step(network_alone(network, args.size), content, args.repeats)
    }
    print(f"network forward+backward: {results['network']:.3f} s", flush=True)
    for label, preset, K in (("Gatys", "none", 1), ("CAST J=K=3", "neighbours", 3)):
        for eager in (False, True):
            built, image = objective(network, args.size, preset, K, eager)
            key = (label, eager)
            results[key] = seconds_per_step(built, image, args.repeats)
            print(f"{label} {'eager' if eager else fused}: {results[key]:.3f} s", flush=True)
            del built

    net = results["network"]
    rows = [
        "| objective | op | s / step | vs eager | vs network alone |",
        "| --- | --- | ---: | ---: | ---: |",
        f"| network forward + backward only | - | {net:.3f} | | 1.00x |",
    ]
    for label in ("Gatys", "CAST J=K=3"):
        fast, slow = results[(label, False)], results[(label, True)]
        rows.append(f"| {label} | fused ({fused}) | {fast:.3f} | {slow / fast:.2f}x faster | "
                    f"{fast / net:.2f}x |")  # fmt: skip
        rows.append(f"| {label} | eager reference + autograd | {slow:.3f} | 1.00x | "
                    f"{slow / net:.2f}x |")  # fmt: skip
    text = "\n".join(
        [
            f"# Stylisation step time, {args.size}x{args.size}, {cpu_model()}",
            "",
            f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}",
            f"- torch {torch.__version__}, Python {platform.python_version()}, git {git_sha()}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- load average at start / end: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
            "(other work on the machine slows every row alike)",
            f"- one step = objective + gradient w.r.t. the image; median of {args.repeats} after "
            "one warm-up; network vgg16-hed, avg pooling, style layers "
            f"{', '.join(STYLE_LAYERS)}, content {', '.join(CONTENT_LAYERS)}",
            "",
            *rows,
            "",
            "Targets (issue 3) at J = K = 3: at least 2.5x faster than eager; at most 1.6x the "
            "network alone.",
            "",
        ]
    )
    out = ROOT / "bench" / "results" / f"{slug(cpu_model())}-stylize.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
