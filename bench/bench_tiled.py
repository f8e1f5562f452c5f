"""Exact tiling and sharding: seconds per step and peak memory, untiled against tiled.

One step is the objective and its gradient with respect to the image (what L-BFGS pays per
iteration; the optimiser's own image-sized state is the same tiled or not and is left out), CAST
J = K = 3 (preset ``neighbours``, three soft bands), VGG-19, after the targets are built (their
pass is timed apart). Every row runs in a fresh process, so its peak memory is its own: peak RSS
on the CPU, peak allocated memory on CUDA. The rows, in groups (``--rows``, default all):

- ``ratio``: untiled and tiled at 1024² and 2048²: the tiled / untiled time (needs a quiet
  machine: other work slows the rows unevenly);
- ``curve``: tiled at 1024², 2048² and 4096² (one step above 2048²): how flat the peak memory
  stays (its 1024² and 2048² rows are the same rows as ``ratio``'s tiled ones: running it
  replaces them, and the ratios then need ``ratio`` again, in one run);
- ``spill``: the curve's rows with the image-sized state on disk (``build(spill=True)``, the
  image a store, the content and style images and masks dropped after the targets): the memory
  a print-size image needs;
- ``large``: one tiled step at 8192²;
- ``shard``: 1 and 2 gloo processes, one thread each, tiled at 1024² (CPU only): scaling
  efficiency, with the CPU seconds every rank spent (the work that sharding does not split).

Every row is kept in ``bench/results/<device>-tiled.json`` with when, at which load and at which
commit it ran; a run replaces the rows it measures and writes the whole table to
``bench/results/<device>-tiled.md`` (``--rows`` alone only rewrites it). Ratios are taken
between rows of one run. The ratios on a quiet machine (about 20 minutes on 2 cores):

    python bench/bench_tiled.py --rows ratio shard

and the rest (about an hour on 2 quiet cores, 8192² most of it): ``--rows curve large``; the
curve with the state on disk (about 30 minutes, 4096² most of it): ``--rows spill``.

``--sizes`` puts other sizes in place of 1024², 2048², 4096² and 8192², and ``--out`` the
results elsewhere: ``tests/test_bench_tiled.py`` runs the whole bench on tiny images that way, so
that it cannot break unseen.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import device_name, git_sha, require_device, slug

from cast import images, ondisk
from cast.distributed import join
from cast.errors import CastError
from cast.losses import high_order_kernels
from cast.memory import plan_memory
from cast.network import CONTENT_LAYERS, STYLE_LAYERS, VGGFeatures
from cast.objective import build, geometry

ROOT = Path(__file__).resolve().parents[1]
CONTENT, STYLE = ROOT / "examples" / "tubingen.jpg", ROOT / "examples" / "starry_night.jpg"
WEIGHTS = (0.3, 1.0, 2.0)
SIZES = (1024, 2048, 4096, 8192)  # what ``--sizes`` replaces, in this order
# (size, mode, processes) of each group; processes 0: one plain process, all threads
GROUPS = {
    "ratio": [(1024, "untiled", 0), (1024, "tiled", 0), (2048, "untiled", 0), (2048, "tiled", 0)],
    "curve": [(1024, "tiled", 0), (2048, "tiled", 0), (4096, "tiled", 0)],
    "spill": [(1024, "spilled", 0), (2048, "spilled", 0), (4096, "spilled", 0)],
    "large": [(8192, "tiled", 0)],
    "shard": [(1024, "tiled", 1), (1024, "tiled", 2)],
}
CURVE_TARGET = 1.25  # issue 8: tiled peak memory flat within 25 % from 1024² to 4096²
EFFICIENCY_TARGET = 0.8


def bands(K: int, h: int, w: int) -> torch.Tensor:
    """``K`` soft horizontal bands that overlap where they meet: ``(K, h, w)``."""
    rows = torch.linspace(0, K, h)[:, None].expand(h, w)
    centres = torch.arange(K)[:, None, None] + 0.5
    return (1.5 - (rows - centres).abs()).clamp(0, 1)


def one_row(size: int, tile: int, steps: int, device: str, spill: bool = False) -> dict:
    """Build the objective at ``size``^2 and time ``steps`` steps (after one warm-up step when
    ``steps > 1``); in this process, joining a torchrun group when there is one. ``spill``: the
    state on disk, the image a store, the images and masks dropped once the targets are built."""
    with join(torch.device(device)) as (shard, on):
        return _timed_steps(size, tile, steps, shard, on, spill)


def _timed_steps(size: int, tile: int, steps: int, shard, on: torch.device, spill: bool) -> dict:
    network = VGGFeatures().to(on)
    content = images.resize(images.load_image(CONTENT), (size, size)).to(on)
    style = images.resize(images.load_image(STYLE), (size, size)).to(on)
    masks = bands(3, size, size).to(on)
    kernels = high_order_kernels("neighbours").to(on)
    started = time.perf_counter()
    objective = build(network, content, [style], masks, [masks], kernels, *WEIGHTS, None, tile,
                      shard, spill=spill)  # fmt: skip
    targets = time.perf_counter() - started
    # the whole-image objective takes a tensor, the tiled one a tensor or a store
    image = ondisk.keep(content, spill) if spill else content
    del content, style, masks
    gc.collect()
    # the steps' own peak, apart from the targets' (which hold the bench's full-size images)
    targets_peak = _reset_peak(on)
    if steps > 1:
        objective.value_and_grad(image)
    _sync(on)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        objective.value_and_grad(image)
    _sync(on)
    seconds = (time.perf_counter() - start) / steps
    cpu = (time.process_time() - cpu) / steps
    steps_peak = _peak(on)
    return {"seconds": seconds, "cpu": cpu, "targets": targets,
            "peak": max(targets_peak, steps_peak), "steps_peak": steps_peak,
            "threads": torch.get_num_threads()}  # fmt: skip


def _peak(device: torch.device) -> int:
    """Peak memory since the start or the last ``_reset_peak``: CUDA's allocated bytes, or the
    resident set's high-water mark (``VmHWM``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def _reset_peak(device: torch.device) -> int:
    """The peak so far, then start it afresh (resetting ``VmHWM`` resets ``ru_maxrss`` too)."""
    peak = _peak(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")
    return peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_row(size: int, tile: int, device: str, steps: int, processes: int,
            spill: bool = False) -> dict:  # fmt: skip
    """``one_row`` in a fresh process (``processes``: under torchrun, one thread each), with
    the load average before and after it."""
    args = [str(Path(__file__).resolve()), "--one", str(size), str(tile), str(steps),
            "--device", device, *(["--spill"] if spill else [])]  # fmt: skip
    if processes:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", str(processes), *args]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": "1"}
    else:
        launch, env = [sys.executable, *args], os.environ
    when, load, sha = datetime.datetime.now(datetime.timezone.utc), os.getloadavg()[0], git_sha()
    done = subprocess.run(launch, capture_output=True, text=True, env=env, check=False)
    row = {"when": f"{when:%Y-%m-%d %H:%M}", "load": [load, os.getloadavg()[0]], "git": sha,
           "steps": steps}  # fmt: skip
    ranks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not ranks:
        return row | {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    slowest = max(ranks, key=lambda rank: rank["seconds"])  # it sets the pace
    return row | slowest | {"peak": max(rank["peak"] for rank in ranks),
                            "cpu": sum(rank["cpu"] for rank in ranks)}  # fmt: skip


def fits_untiled(size: int, device: str) -> bool:
    network, on = VGGFeatures().to(device), torch.device(device)
    halo, stride = geometry(network, high_order_kernels("neighbours"))
    try:
        plan_memory(network, CONTENT_LAYERS, STYLE_LAYERS, (size, size), [(size, size)], on,
                    "adam", None, 0, halo, stride)  # fmt: skip
    except CastError:
        return False
    return True


def key(size: int, mode: str, processes: int) -> str:
    return f"{size} {mode} {processes}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rows", nargs="*", choices=list(GROUPS), default=list(GROUPS),
                        help="row groups to measure (none: rewrite the table from kept rows)")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs=4, default=SIZES, metavar="PX",
                        help="sizes in place of 1024, 2048, 4096 and 8192 (a quick check: "
                        "equal sizes make one row)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                        help="folder of the kept rows and the table")
    parser.add_argument("--steps", type=int, default=2,
                        help="timed steps per row up to 2048², after a warm-up step; one above")
    parser.add_argument("--one", type=int, nargs=3, metavar=("SIZE", "TILE", "STEPS"),
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--spill", action="store_true", help=argparse.SUPPRESS)  # with --one
    args = parser.parse_args(argv)
    require_device(args.device)
    if args.one:
        # one write of the whole line: under torchrun every rank shares this pipe, and a
        # line written in pieces (print writes the text and its newline apart when stdout is
        # unbuffered) can run into another rank's (PIPE_BUF keeps a single write whole)
        line = json.dumps(one_row(*args.one, args.device, args.spill)) + "\n"
        os.write(sys.stdout.fileno(), line.encode())
        return

    where = device_name(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / f"{slug(where)}-tiled.json"
    kept = json.loads(store.read_text()) if store.exists() else {}
    wanted = [row for group in args.rows for row in GROUPS[group]]
    run = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"  # ratios within a run
    sizes = dict(zip(SIZES, args.sizes, strict=True))
    for size, mode, processes in dict.fromkeys((sizes[n], *rest) for n, *rest in wanted):
        tiled = mode != "untiled"
        if processes and args.device != "cpu":
            continue
        if not tiled and not fits_untiled(size, args.device):
            row = {"when": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
                   "error": "does not fit"}  # fmt: skip
        else:
            steps = args.steps if size <= sizes[2048] else 1
            row = run_row(size, args.tile if tiled else 0, args.device, steps, processes,
                          mode == "spilled")  # fmt: skip
        kept[key(size, mode, processes)] = row | {"tile": args.tile if tiled else 0, "run": run}
        store.write_text(json.dumps(kept, indent=1) + "\n")
        print(size, mode, processes, row, flush=True)
    table = args.out / f"{slug(where)}-tiled.md"
    table.write_text(render(kept, where, args.device, args.sizes))
    print(f"wrote {table} and {store}")


def render(rows: dict, where: str, device: str, sizes=SIZES) -> str:
    memory = "peak RSS of the process" if device == "cpu" else "peak CUDA memory allocated"
    lines = [
        f"# Tiled stylisation step, {where}",
        "",
        f"- machine: {where}; torch {torch.__version__}, Python {platform.python_version()}",
        "- one step = CAST objective (VGG-19, J = K = 3, three soft bands) + its gradient w.r.t. "
        "the image, after the targets (timed apart); mean of the row's steps after a warm-up "
        "step, or one cold step; every row in a fresh process; memory: "
        f"{memory} (over the ranks), optimiser state excluded; tiles of 512 px unless said; "
        "rows from b142d52 on run two segments (24 px halo up to pool3, then 64 px in tiles "
        "twice as wide; from acaa56e on, the targets too), earlier rows one crop per tile with a "
        "96 px halo",
        "- each row says when it ran, the 1-minute load average before and after it (this "
        "machine's cores are shared: load slows rows unevenly) and the commit",
        "- written by `python bench/bench_tiled.py` (see its docstring for the row groups)",
        "",
        "| image | tiling | processes | s / step | CPU s / step | targets s | peak memory "
        "| peak in the steps | tiled / untiled time | ran (UTC, load, git) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    def order(name: str) -> tuple:  # plain processes first, by size, untiled, tiled, spilled
        size, tiling, processes = name.split()
        return int(processes), int(size), ("untiled", "tiled", "spilled").index(tiling)

    for name in sorted(rows, key=order):
        row = rows[name]
        size, tiling, processes = name.split()
        if tiling != "untiled":
            tiling = f"tiles of {row['tile']} px" + (", state on disk" * (tiling == "spilled"))
        threads = row.get("threads", torch.get_num_threads())
        shown = f"{max(1, int(processes))} × {threads} thread{'s' * (threads > 1)}"
        ran = row["when"]
        if "load" in row:
            ran += f", {row['load'][0]:.1f} → {row['load'][1]:.1f}, {row['git']}"
        ran += f"; {row['note']}" if "note" in row else ""
        if "error" in row:
            error = row["error"][:80]
            lines.append(f"| {size}² | {tiling} | {shown} | {error} | | | | | | {ran} |")
            continue
        untiled = rows.get(f"{size} untiled 0", {})
        ratio = ""
        same_run = untiled.get("run") == row.get("run")
        if tiling != "untiled" and not int(processes) and "seconds" in untiled and same_run:
            ratio = f"{row['seconds'] / untiled['seconds']:.2f}x"
        steps = "" if row["steps"] > 1 else " (1 cold)"
        cpu, targets = (f"{row[k]:.1f}" if k in row else "" for k in ("cpu", "targets"))
        in_steps = f"{row['steps_peak'] / 2**30:.2f} GiB" if "steps_peak" in row else ""
        lines.append(
            f"| {size}² | {tiling} | {shown} | {row['seconds']:.1f}{steps} | {cpu} | "
            f"{targets} | {row['peak'] / 2**30:.2f} GiB | {in_steps} | {ratio} | {ran} |"
        )
    lines.append("")
    for mode, held in [
        ("tiled", "what is image-sized (the image, its gradient, the content and style images "
         "and masks, the content target's relu4_2 features, the masks on every style layer's "
         "grid), not the crops"),
        ("spilled", "what stays image-sized in RAM with the state on disk"),
    ]:  # fmt: skip
        curve = [rows.get(f"{size} {mode} 0", {}).get("peak") for size in sizes[:3]]
        if not all(curve):
            continue
        spread = max(curve) / min(curve)
        shown = " → ".join(f"{peak / 2**30:.2f}" for peak in curve)
        small, middle, large = sizes[:3]
        verdict = "within" if spread <= CURVE_TARGET else "outside"
        grows = ""
        if large > middle:  # from 2048² on, every inner crop has its full size: what still
            slope = (curve[2] - curve[1]) / (large**2 - middle**2)  # grows is image-sized
            grows = f" From {middle}² to {large}² it grows by {slope:.0f} bytes per pixel: {held}."
        name = "Tiled" if mode == "tiled" else "Tiled with the state on disk,"
        lines += [""] * (mode == "spilled")
        lines.append(
            f"{name} peak memory {small}² → {middle}² → {large}²: {shown} GiB, largest / smallest "
            f"{spread:.2f} ({verdict} the target {CURVE_TARGET:.2f}).{grows}"
        )
        in_steps = [rows.get(f"{size} {mode} 0", {}).get("steps_peak") for size in sizes[:3]]
        if all(in_steps):
            spread = max(in_steps) / min(in_steps)
            verdict = "within" if spread <= CURVE_TARGET else "outside"
            shown = " → ".join(f"{peak / 2**30:.2f}" for peak in in_steps)
            lines[-1] += (
                f" In the steps alone (the peak from after the targets, which also hold the "
                f"bench's full-size content, style and mask tensors): {shown} GiB, "
                f"{spread:.2f} ({verdict} the target)."
            )
    one, two = rows.get(f"{sizes[0]} tiled 1", {}), rows.get(f"{sizes[0]} tiled 2", {})
    if "seconds" in one and "seconds" in two and one.get("run") == two.get("run"):
        efficiency = one["seconds"] / (2 * two["seconds"])
        work = ""
        if "cpu" in one and "cpu" in two:  # equal where sharding repeats no work
            work = (f"; CPU seconds per step {one['cpu']:.1f} alone, {two['cpu']:.1f} summed over "
                    "the two ranks")  # fmt: skip
        lines.append(
            f"\nScaling efficiency, 1 → 2 gloo processes (one thread each) at {sizes[0]}²: "
            f"{efficiency:.0%} = {one['seconds']:.1f} / (2 × {two['seconds']:.1f}) (target "
            f"{EFFICIENCY_TARGET:.0%}){work}."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
