"""Exact tiling and sharding: seconds per step and peak memory, untiled against tiled.

One step is the objective and its gradient with respect to the image (what L-BFGS pays per
iteration; the optimiser's own image-sized state is the same tiled or not and is left out), CAST
J = K = 3 (preset ``neighbours``, three soft bands), VGG-19, after the targets are built. Every
row runs in a fresh process, so its peak memory is its own: peak RSS on the CPU, peak allocated
memory on CUDA. Rows:

- untiled and tiled (``--tile``, default 512) at each ``--sizes`` (untiled only where it fits);
- ``--shard-size``: 1 and 2 gloo processes, one thread each (CPU only): scaling efficiency.

Writes ``bench/results/<device>-tiled.md`` (device, versions, git sha, date, load average).

    python bench/bench_tiled.py [--device cpu|cuda] [--sizes 1024 2048 4096 8192] [--tile 512]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import device_name, git_sha, slug

from cast import images
from cast.distributed import join
from cast.losses import high_order_kernels
from cast.memory import plan_memory
from cast.network import CONTENT_LAYERS, STYLE_LAYERS, VGGFeatures
from cast.objective import build, geometry

LAYERS = CONTENT_LAYERS + STYLE_LAYERS  # what the objective runs the network to

ROOT = Path(__file__).resolve().parents[1]
CONTENT, STYLE = ROOT / "examples" / "tubingen.jpg", ROOT / "examples" / "starry_night.jpg"
WEIGHTS = (0.3, 1.0, 2.0)


def bands(K: int, h: int, w: int) -> torch.Tensor:
    """``K`` soft horizontal bands that overlap where they meet: ``(K, h, w)``."""
    rows = torch.linspace(0, K, h)[:, None].expand(h, w)
    centres = torch.arange(K)[:, None, None] + 0.5
    return (1.5 - (rows - centres).abs()).clamp(0, 1)


def one_row(size: int, tile: int, steps: int, device: str) -> dict:
    """Build the objective at ``size``^2 and time ``steps`` steps (after one warm-up step when
    ``steps > 1``); in this process, joining a torchrun group when there is one."""
    shard, on = join(torch.device(device))
    network = VGGFeatures().to(on)
    content = images.resize(images.load_image(CONTENT), (size, size)).to(on)
    style = images.resize(images.load_image(STYLE), (size, size)).to(on)
    masks = bands(3, size, size).to(on)
    kernels = high_order_kernels("neighbours").to(on)
    objective = build(network, content, [style], masks, [masks], kernels, *WEIGHTS, None, tile,
                      shard)  # fmt: skip
    if steps > 1:
        objective.value_and_grad(content)
    _sync(on)
    start = time.perf_counter()
    for _ in range(steps):
        objective.value_and_grad(content)
    _sync(on)
    seconds = (time.perf_counter() - start) / steps
    if on.type == "cuda":
        peak = torch.cuda.max_memory_allocated(on)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shard.close()
    return {"seconds": seconds, "peak": peak, "rank": shard.rank}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_row(size: int, tile: int, device: str, steps: int, processes: int = 0) -> dict:
    """``one_row`` in a fresh process (``processes``: under torchrun, one thread each)."""
    args = [str(Path(__file__).resolve()), "--one", str(size), str(tile), str(steps),
            "--device", device]  # fmt: skip
    if processes:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", str(processes), *args]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": "1"}
    else:
        launch, env = [sys.executable, *args], os.environ
    done = subprocess.run(launch, capture_output=True, text=True, env=env, check=False)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not rows:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail}
    return max(rows, key=lambda row: row["seconds"])  # the slowest rank sets the pace


def fits_untiled(size: int, device: str) -> bool:
    network, on = VGGFeatures(), torch.device(device)
    halo, stride = geometry(network, high_order_kernels("neighbours"))
    try:
        plan_memory(network.to(on), LAYERS, (size, size), on, "adam", None, 0, halo, stride, 1)
    except Exception:
        return False
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row, up to 2048^2")
    parser.add_argument("--shard-size", type=int, default=1024, help="0: no sharding rows")
    parser.add_argument("--one", type=int, nargs=3, metavar=("SIZE", "TILE", "STEPS"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_row(*args.one, args.device)), flush=True)
        return

    load_before = os.getloadavg()[0]
    rows = ["| image | tiling | processes | s / step | peak memory | tiled / untiled time |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    untiled = {}
    for size in args.sizes:
        steps = args.steps if size <= 2048 else 1
        for tile in (0, args.tile):
            if tile == 0 and not fits_untiled(size, args.device):
                rows.append(f"| {size}² | untiled | 1 | does not fit | | |")
                continue
            row = run_row(size, tile, args.device, steps)
            if tile == 0 and "seconds" in row:
                untiled[size] = row["seconds"]
            rows.append(_row(size, tile, 1, row, untiled.get(size) if tile else None))
            print(rows[-1], flush=True)
    if args.device == "cpu" and args.shard_size:
        alone = run_row(args.shard_size, args.tile, "cpu", args.steps, processes=1)
        two = run_row(args.shard_size, args.tile, "cpu", args.steps, processes=2)
        for processes, row in ((1, alone), (2, two)):
            rows.append(_row(args.shard_size, args.tile, processes, row, None))
            print(rows[-1], flush=True)
        if "seconds" in alone and "seconds" in two:
            efficiency = alone["seconds"] / (2 * two["seconds"])
            rows.append(f"\nScaling efficiency, 1 → 2 gloo processes (one thread each) at "
                        f"{args.shard_size}²: {efficiency:.0%}")  # fmt: skip

    where = device_name(args.device)
    memory = "peak RSS of the process" if args.device == "cpu" else "peak CUDA memory allocated"
    text = "\n".join([
        f"# Tiled stylisation step, {where}",
        "",
        f"- machine: {where}; torch threads {torch.get_num_threads()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, git {git_sha()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- load average at start / end: {load_before:.1f} / {os.getloadavg()[0]:.1f} (other "
        "work on the machine slows every row)",
        f"- one step = CAST objective (VGG-19, J = K = 3) + gradient w.r.t. the image; mean of "
        f"{args.steps} step(s) up to 2048² (after a warm-up step when more than one), one cold "
        f"step above; memory: {memory}, "
        "optimiser state excluded; tile rows use tiles of the given size plus a 96 px halo",
        "",
        *rows,
        "",
    ])  # fmt: skip
    out = ROOT / "bench" / "results" / f"{slug(where)}-tiled.md"
    out.write_text(text)
    print(f"wrote {out.relative_to(ROOT)}")


def _row(size: int, tile: int, processes: int, row: dict, untiled: float | None) -> str:
    tiling = "untiled" if tile == 0 else f"tiles of {tile} px"
    if "error" in row:
        return f"| {size}² | {tiling} | {processes} | failed: {row['error'][:80]} | | |"
    ratio = f"{row['seconds'] / untiled:.2f}x" if untiled else ""
    return (f"| {size}² | {tiling} | {processes} | {row['seconds']:.2f} | "
            f"{row['peak'] / 2**30:.2f} GiB | {ratio} |")  # fmt: skip


if __name__ == "__main__":
    main()
