"""The op's host path (issue 9): what one ``cast.masked_gram`` call costs besides its kernels.

On tiny inputs (the kernels take next to nothing), per forward call with ``mass=None``: the
ATen ops it runs before the custom op's own entry (views left out: they launch nothing), on a
GPU the kernels the whole call launches (torch.profiler), and the microseconds a call takes,
issued back to back (on a GPU the host issues faster than tiny kernels run only if the host
path is short, so this is the host's time a call). The same with ``requires_grad``, with n_k
by the float64 bands (the path before the compiled op, still the fallback without it), and
with ``mass=1.0`` (no n_k: what the mask mass's own share is). On a GPU also relu1_1's forward
at a 1024^2 image (J = K = 3), timed as bench/bench_masked_gram.py times it, both ways.

    python bench/host_path.py [--device cuda] [--backend cuda]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import time

import torch
from machine import require_device
from torch.utils._python_dispatch import TorchDispatchMode

import cast
from cast import backends


class CountOps(TorchDispatchMode):
    """The ATen ops run under it, by name, views excluded (the custom op counts as one)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def mass_in_bands():
    """n_k by ``cast.ops.mask_mass_in_bands`` within, as without the compiled op."""
    compiled_op = backends.compiled_op
    backends.compiled_op = lambda op, device: op != "_inverse_mask_mass" and compiled_op(op, device)
    try:
        yield
    finally:
        backends.compiled_op = compiled_op


def kernels_launched(call, device: str) -> int | None:
    if device != "cuda":
        return None
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        call()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


def microseconds(call, device: str, calls: int = 500, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean time of ``calls`` back-to-back calls: wall-clock
    time on a GPU, the process's CPU time on the CPU (a shared machine's other load then
    counts less; run with OMP_NUM_THREADS=1 so that no idle worker threads spin)."""
    clock = time.perf_counter if device == "cuda" else time.process_time
    for _ in range(min(calls, 50)):
        call()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = clock()
        for _ in range(calls):
            call()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((clock() - start) / calls * 1e6)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="default: the device's default")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--calls", type=int, default=500, help="calls a timing (7 timings)")
    args = parser.parse_args(argv)
    require_device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    to = dict(device=args.device, dtype=dtype)
    # J = K = 3, r = 3 as the bench; 16 x 16 positions, 8 channels: the kernels are negligible
    features = torch.randn(1, 8, 16, 16, generator=gen).to(**to)
    masks = torch.rand(3, 16, 16, generator=gen).to(**to)
    kernels = torch.randn(3, 3, 3, generator=gen).to(**to)
    print(f"{args.device} {args.dtype} backend {args.backend or 'default'}, torch "
          f"{torch.__version__}, features {tuple(features.shape)}, "
          f"masks {tuple(masks.shape)}")  # fmt: skip
    for grad, mass, bands in ((False, None, False), (True, None, False), (False, None, True),
                              (False, 1.0, False)):  # fmt: skip
        x = features.detach().requires_grad_(grad)

        def call(x=x, mass=mass):
            return cast.masked_gram(x, masks, kernels, mass=mass, backend=args.backend)

        with mass_in_bands() if bands else contextlib.nullcontext():
            call()
            with CountOps() as counted:
                call()
            ops = ", ".join(f"{name} {n}" for name, n in sorted(counted.ops.items()))
            launched = kernels_launched(call, args.device)
            took = microseconds(call, args.device, args.calls)
        print(f"requires_grad={grad}, mass={mass}{', bands' if bands else ''}: "
              f"{sum(counted.ops.values())} ATen ops ({ops})"
              + ("" if launched is None else f", {launched} kernels launched")
              + f", {took:.1f} us a call")  # fmt: skip
    if args.device == "cuda":
        layer_forward(args.backend, dtype)


def layer_forward(backend: str | None, dtype: torch.dtype) -> None:
    """relu1_1's forward at a 1024^2 image, J = K = 3, as the bench times it (synchronised
    before and after each call; median of 20), n_k by the op and by the bands, twice each."""
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(1, 64, 1024, 1024, generator=gen).to("cuda", dtype)
    masks = torch.rand(3, 1024, 1024, generator=gen).to("cuda", dtype)
    kernels = torch.randn(3, 3, 3, generator=gen).to("cuda", dtype)
    for bands in (False, True, False, True):
        with mass_in_bands() if bands else contextlib.nullcontext():
            times = []
            for _ in range(25):
                torch.cuda.synchronize()
                start = time.perf_counter()
                cast.masked_gram(features, masks, kernels, backend=backend)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        ms = statistics.median(times[5:]) * 1e3
        print(f"relu1_1 1024^2 J=K=3 forward, n_k by the {'bands' if bands else 'op'}: "
              f"{ms:.3f} ms (median of 20)")


if __name__ == "__main__":
    main()
