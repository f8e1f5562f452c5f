"""Benchmark of ``cast.masked_gram``, forward + backward, at the VGG style layers of an image.

Compares the fused backends present for the device with the eager reference
(``cast.reference.masked_gram_reference`` differentiated by autograd, the obvious PyTorch code)
and ``torch.compile`` of that reference, in one run, on one machine. For each layer and J, K:
median time, effective GFLOP/s (``4*J*K*N*C^2`` per forward + backward), the fraction of the
machine's matmul peak measured in the same run, speedups, and the extra peak memory beside the
``J*K*N*C`` intermediate the eager code materialises (and, for Triton, beside what its
launchers' own sizing predicts, and for CUDA what its plan allocates). Writes a markdown table to
``bench/results/<device>-masked_gram.md``.

    python bench/bench_masked_gram.py                       # CPU, 512x512 image
    python bench/bench_masked_gram.py --device cuda --image 1024 4096
    python bench/bench_masked_gram.py --quick               # smoke run, writes nothing
    python bench/bench_masked_gram.py --memory-model --image 1024 4096   # no GPU needed
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

# glibc would keep freed blocks in the heap, hiding them from the process's peak RSS, the only
# peak-memory gauge on CPU; with a fixed mmap threshold every large block goes back at free.
# Set before torch allocates anything, so the script re-executes itself once.
if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from issue_model import cuda_seconds, triton_seconds  # noqa: E402
from machine import device_name, git_sha, slug, versions  # noqa: E402

import cast  # noqa: E402
from cast import backends  # noqa: E402
from cast.network import STYLE_LAYERS  # noqa: E402
from cast.ops import mass_scratch_bytes  # noqa: E402
from cast.reference import masked_gram_reference  # noqa: E402
from cast.weights import ARCHITECTURES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("eager", "compile")
MIB = 1 << 20


@dataclass(frozen=True)
class Card:
    """What the memory models need of a GPU."""

    sms: int
    compute_capability: int  # major * 10 + minor
    max_smem: int  # shared memory per block, opted in, bytes

    @classmethod
    def of_device(cls) -> Card:
        props = torch.cuda.get_device_properties(0)
        # a torch build without the field (it is not in every one's bindings): an sm_90 card's
        smem = getattr(props, "shared_memory_per_block_optin", H100.max_smem)
        return cls(props.multi_processor_count, 10 * props.major + props.minor, smem)


H100 = Card(132, 90, 227 * 1024)  # and H200's: the card the memory model assumes without a GPU


@dataclass(frozen=True)
class Layer:
    name: str
    C: int
    H: int
    W: int

    @property
    def N(self) -> int:
        return self.H * self.W


def style_layers(image: int, architecture: str = "vgg16") -> list[Layer]:
    """``relu<b>_1`` has block b's channels on the image's grid pooled b - 1 times."""
    layers = []
    for name in STYLE_LAYERS:
        block = int(name.removeprefix("relu").split("_")[0])
        size = image >> (block - 1)
        layers.append(Layer(name, ARCHITECTURES[architecture][block - 1][0], size, size))
    return layers


def inputs_outputs_bytes(layer: Layer, J: int, K: int, dtype: torch.dtype) -> int:
    """What one forward + backward reads and writes (``measure`` checks it on its tensors):
    F, the masks, the 3 x 3 kernels and dG in, G and dF out; the Triton launchers' figure."""
    from cast.kernels import masked_gram as triton_gram

    return triton_gram.inputs_outputs_bytes(
        triton_gram.Problem((1, layer.C, layer.H, layer.W), 1, dtype, J, K, 3)
    )


def triton_extra_model(layer: Layer, J: int, K: int, dtype: torch.dtype, sms: int) -> int:
    """The Triton backend's extra bytes in one forward + backward on a card with ``sms`` SMs,
    from the launchers' own sizing and ``cast.ops``': the largest of n_k's scratch, the
    forward's partial Grams and the backward's scratch (the three phases do not overlap; the
    backward forms ``S = (dG + dG^T) / n_k`` a tile at a time, never whole)."""
    from cast.kernels import masked_gram as triton_gram

    problem = triton_gram.Problem((1, layer.C, layer.H, layer.W), 1, dtype, J, K, 3)
    return max(
        mass_scratch_bytes(1, K, layer.H, layer.W, "cuda"),
        triton_gram.forward_scratch_bytes(problem, sms),
        triton_gram.backward_scratch_bytes(problem, sms),
    )


@functools.cache
def cuda_planner():
    """``csrc/masked_gram_cuda.cu``'s plan, its host code built for this CPU by the tests' CUDA
    emulation (g++, about 3 s): the module and the library; None, said once, where it cannot be
    built (a lent GPU machine's compiler): the model's column is then left empty, and the
    measured rows are kept."""
    sys.path.insert(0, str(ROOT / "tests"))
    import cuda_emulation

    try:
        with tempfile.TemporaryDirectory(prefix="cast-cuda-plan-") as folder:
            return cuda_emulation, cuda_emulation.build(Path(folder), "-O0")
    except (RuntimeError, OSError) as err:
        print(f"no CUDA memory model: {str(err).splitlines()[0]}", file=sys.stderr)
        return None


def cuda_extra_model(layer: Layer, J: int, K: int, dtype: torch.dtype, card: Card) -> int | None:
    """The CUDA backend's extra bytes in one forward + backward on ``card``, from the plan of
    ``csrc/masked_gram_cuda.cu`` itself: the larger of the forward's scratch (the plan's copies
    of G; G holds split 0's sums) and the backward's (``S = (dG + dG^T) / n_k`` whole, G's
    size, where the plan takes it; else S is formed a block at a time in shared memory): the
    two are never live together. n_k's is left out: the extension that holds these kernels sums
    it in one op (csrc/mask_mass_cuda.cu: 8 bytes a mask and chunk of 8192 positions)."""
    planner = cuda_planner()
    if planner is None:
        return None
    emulation, library = planner
    shape = (1, layer.C, layer.H, layer.W, 1, K, J, 3)
    plan = emulation.plan(
        library, dtype, shape, True, compute_capability=card.compute_capability,
        max_smem=card.max_smem,
    )  # fmt: skip
    gram = J * K * layer.C**2 * 4
    return max(plan["scratch_grams"], plan["symmetric_scratch"]) * gram


def model_extra(backend: str, layer: Layer, J: int, K: int, dtype, card: Card) -> int | None:
    """The backend's predicted extra bytes, where it has a model."""
    if backend == "triton":
        return triton_extra_model(layer, J, K, dtype, card.sms)
    if backend == "cuda":
        return cuda_extra_model(layer, J, K, dtype, card)
    return None


MODELLED = ("triton", "cuda")


def memory_model_table(args) -> str:
    """The Triton and CUDA backends' predicted extra memory at every layer, no GPU needed."""
    dtype = getattr(torch, args.dtype)
    card = Card(args.sms, H100.compute_capability, H100.max_smem)
    lines = [
        f"# Extra memory of the fused GPU backends, predicted for a {args.sms}-SM sm_90 card, "
        f"{args.dtype}",
        "",
        "Forward + backward, 3x3 kernels, B = 1 (bench/bench_masked_gram.py "
        "triton_extra_model, cuda_extra_model); target: within 10 % of inputs + outputs.",
        "",
        "| image | layer | C x H x W | J,K | inputs + outputs MiB "
        + "".join(f"| {b} model extra MiB | % " for b in MODELLED)
        + "| target |",
        "| ---: | --- | --- | --- | ---: " + "| ---: | ---: " * len(MODELLED) + "| --- |",
    ]
    for image in args.image:
        for layer in style_layers(image):
            for J, K in args.jk:
                io = inputs_outputs_bytes(layer, J, K, dtype)
                extra = {b: model_extra(b, layer, J, K, dtype, card) for b in MODELLED}
                missed = [b for b in MODELLED if extra[b] is not None and extra[b] > 0.1 * io]
                cells = "".join(
                    "| - | - " if x is None else f"| {x / MIB:.2f} | {100 * x / io:.1f} "
                    for x in extra.values()
                )
                lines.append(
                    f"| {image} | {layer.name} | {layer.C}x{layer.H}x{layer.W} | {J},{K} "
                    f"| {io / MIB:.1f} {cells}"
                    f"| {'not met: ' + ', '.join(missed) if missed else 'met'} |"
                )
    return "\n".join(lines)


def fused_backends(device: str) -> list[str]:
    wanted = ("triton", "cuda") if device == "cuda" else ("cpu",)
    return [
        name
        for name in wanted
        if backends.available(name) and device in backends.load(name).device_types
    ]


def compile_reference():
    """``torch.compile`` of the eager reference. ``dynamic=False`` makes one graph per shape and
    grad mode, 10 an image here (five layers, two J,K pairs, forward + backward): past
    dynamo's default limit of 8 it would silently run the eager code from relu3_1 on under the
    name "compile". The limit is raised above what a run needs, and hitting it fails the run."""
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(masked_gram_reference, dynamic=False)


def forward_backward(backend: str, compiled_reference, backward: bool = True):
    """A callable (features, masks, kernels, dG) running one forward + backward (or, with
    ``backward=False``, the forward alone, without autograd)."""

    def run(features, masks, kernels, grad):
        x = features.detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            if backend == "eager":
                gram = masked_gram_reference(x, masks, kernels)
            elif backend == "compile":
                gram = compiled_reference(x, masks, kernels)
            else:
                gram = cast.masked_gram(x, masks, kernels, backend=backend)
        if not backward:
            return gram
        gram.backward(grad)
        return gram, x.grad

    return run


class Memory:
    """Peak memory above the level at ``start``: the CUDA allocator's, or the process's RSS.
    On a GPU also the peak of the bytes the op asked for: the allocator hands out a cached block
    of up to 1 MiB more than asked whole (PyTorch's CUDACachingAllocator splits a large cached
    block only where more than 1 MiB would remain), and max_memory_allocated counts the block."""

    def __init__(self, device: str):
        self.device = device

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            # (one of torch.cuda.memory_stats' documented keys; None if a build lacks it)
            self.base_requested = torch.cuda.memory_stats().get("requested_bytes.all.current")
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = self._status("VmRSS")

    def peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._status("VmHWM") - self.base

    def requested_peak(self) -> int | None:
        """The peak of the bytes asked for above ``start``'s (None off a GPU)."""
        if self.device != "cuda" or self.base_requested is None:
            return None
        torch.cuda.synchronize()
        return torch.cuda.memory_stats()["requested_bytes.all.peak"] - self.base_requested


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timings(fn, device: str, warmup: int, repeats: int) -> tuple[float, float]:
    """Median and best wall-clock seconds of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def memory_bandwidth(device: str, warmup: int, repeats: int) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    if device != "cuda":
        return float("nan")  # the CPU rows are compute-bound; no model is printed for them
    source = torch.randn(1 << 28, device=device)  # 1 GiB
    target = torch.empty_like(source)
    _, best = timings(lambda: target.copy_(source), device, warmup, repeats)
    return 2 * source.nbytes / best


def matmul_peak(device: str, dtype: torch.dtype, warmup: int, repeats: int) -> tuple[float, str]:
    """GFLOP/s of a large dense matmul in the precision the op uses on this device."""
    if device == "cuda":
        # float32 input runs on TF32 tensor cores (allow_tf32 defaults to True).
        size, mm_dtype = 8192, dtype
        what = {torch.float32: "TF32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        size, what, mm_dtype = 4096, "float32", torch.float32
    a = torch.randn(size, size, device=device, dtype=mm_dtype)
    b = torch.randn(size, size, device=device, dtype=mm_dtype)
    _, best = timings(lambda: a @ b, device, warmup, repeats)
    return 2 * size**3 / best / 1e9, f"{size}x{size} {what} torch.mm, best of {repeats}"


@dataclass
class Row:
    layer: Layer
    J: int
    K: int
    backend: str
    seconds: float  # median, forward + backward
    best: float
    forward_seconds: float  # median of the forward alone (no autograd); nan: not timed
    extra_bytes: int
    requested_extra_bytes: int | None  # the same from the bytes the op asked for (GPU only)
    io_bytes: int  # inputs + outputs
    model_extra_bytes: int | None  # the backend's memory model for this card (model_extra)

    element_size: int = 4

    @property
    def flops(self) -> float:
        return 4 * self.J * self.K * self.layer.N * self.layer.C**2

    @property
    def bytes(self) -> float:
        """The fewest bytes a forward + backward moves: F read twice, dF written, masks read
        twice, G written and dG read (float32)."""
        features = self.layer.N * self.layer.C * self.element_size
        masks = self.K * self.layer.N * self.element_size
        grams = 2 * self.J * self.K * self.layer.C**2 * 4
        return 3 * features + 2 * masks + grams

    def model_seconds(self, peak_flops: float, bandwidth: float) -> float:
        """The roofline bound: the larger of compute time at the matmul peak and memory time."""
        return max(self.flops / peak_flops, self.bytes / bandwidth)


def measure(args, image: int) -> list[Row]:
    device, dtype = args.device, getattr(torch, args.dtype)
    compiled_reference = compile_reference()
    memory = Memory(device)
    card = Card.of_device() if device == "cuda" else None
    rows = []
    for layer in style_layers(image):
        for J, K in args.jk:
            gen = torch.Generator().manual_seed(0)
            features = torch.randn(1, layer.C, layer.H, layer.W, generator=gen)
            masks = torch.rand(1, K, layer.H, layer.W, generator=gen)
            kernels = torch.randn(J, 3, 3, generator=gen)  # always 3x3: the convolution is real
            grad = torch.randn(1, J, K, layer.C, layer.C, generator=gen)
            to = dict(device=device, dtype=dtype)
            inputs = (features.to(**to), masks.to(**to), kernels.to(**to), grad.to(device))
            out_bytes = grad.nbytes + inputs[0].nbytes  # G and dF
            io = sum(t.nbytes for t in inputs) + out_bytes
            assert io == inputs_outputs_bytes(layer, J, K, inputs[0].dtype)
            for backend in args.backends:
                skip = baseline_skip(backend, layer, J, K, image, args)
                if skip:
                    print(f"{layer.name} J={J} K={K} {backend}: skipped ({skip})", flush=True)
                    continue
                repeats = args.repeats if backend in BASELINES else args.fused_repeats
                run = forward_backward(backend, compiled_reference)
                seconds, best = timings(partial(run, *inputs), device, args.warmup, repeats)
                forward_seconds = math.nan
                # not compile's: without autograd it is a graph of its own per shape, twice the
                # compiles (seconds each on a GPU machine, where gpu_check.sh's steps are timed)
                if backend != "compile":
                    forward_only = forward_backward(backend, compiled_reference, backward=False)
                    forward_seconds, _ = timings(
                        partial(forward_only, *inputs), device, args.warmup, repeats
                    )
                memory.start()
                result = run(*inputs)
                extra = memory.peak() - out_bytes
                requested = memory.requested_peak()
                requested = None if requested is None else requested - out_bytes
                del result
                rows.append(
                    Row(
                        layer,
                        J,
                        K,
                        backend,
                        seconds,
                        best,
                        forward_seconds,
                        extra,
                        requested,
                        io,
                        model_extra(backend, layer, J, K, inputs[0].dtype, card)
                        if device == "cuda"
                        else None,
                        inputs[0].element_size(),
                    )
                )
                print(
                    f"{layer.name} C={layer.C} {layer.H}x{layer.W} J={J} K={K} {backend:>8}: "
                    f"{seconds * 1e3:9.1f} ms (best {best * 1e3:.1f}, forward "
                    f"{milliseconds(forward_seconds, 1)}) "
                    f"{rows[-1].flops / seconds / 1e9:7.1f} GFLOP/s "
                    f"extra {extra / MIB:8.1f} MiB ({100 * extra / io:.1f} % of io)"
                    + ("" if requested is None else f", requested {requested / MIB:.1f} MiB")
                    + tuned_configs(backend),
                    flush=True,
                )
    return rows


def tuned_configs(backend: str) -> str:
    """For the log: the configs the Triton autotuner took for the row just run (a slow row may
    be its pick, not the kernels' speed: gpu-notes)."""
    if backend != "triton":
        return ""
    from cast.kernels import masked_gram as triton_gram

    return f" {triton_gram.tuned_configs()}"


def baseline_skip(backend: str, layer: Layer, J: int, K: int, image: int, args) -> str:
    """Why a baseline is not run here, or "": torch.compile only up to --compile-max-image
    (each shape compiles for tens of seconds), eager code only where its J*K*N*C intermediates
    (about four copies, autograd's included) fit in the device's free memory."""
    if backend == "compile" and args.compile_max_image and image > args.compile_max_image:
        return f"torch.compile only up to {args.compile_max_image}^2"
    if backend in BASELINES and args.device == "cuda":
        needed = 4 * J * K * layer.N * layer.C * 4
        free = torch.cuda.mem_get_info()[0]
        if needed > 0.8 * free:
            return f"needs about {needed / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
    return ""


def milliseconds(seconds: float, digits: int = 2) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.{digits}f}"


def ratio(base: Row | None, row: Row) -> str:
    return f"{base.seconds / row.seconds:.2f}x" if base else "-"


def table(rows: list[Row], peak: float, bandwidth: float, args) -> str:
    by_key = {(r.layer.name, r.J, r.K, r.backend): r for r in rows}
    bytes_per = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    lines = [
        "| layer | C x H x W | J,K | backend | ms | best ms | forward ms | model ms | % roofline "
        "| issue model ms | GFLOP/s | % peak | vs eager | vs compile | extra MiB | requested MiB "
        "| model extra MiB | extra % io | requested % io | J*K*N*C MiB |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        key = (r.layer.name, r.J, r.K)
        gflops = r.flops / r.seconds / 1e9
        blowup = r.J * r.K * r.layer.N * r.layer.C * bytes_per / MIB
        # no roofline on the CPU (no bandwidth measured there)
        model = r.model_seconds(peak * 1e9, bandwidth) if math.isfinite(bandwidth) else None
        # bench/issue_model.py's bound of the GPU kernels at an H100's rates (3x3 kernels)
        shape = (r.layer.N, r.layer.C, r.J, r.K)
        issue = "-"
        if args.device == "cuda" and r.backend == "triton":
            issue = f"{triton_seconds(*shape) * 1e3:.2f}"
        elif args.device == "cuda" and r.backend == "cuda":
            issue = f"{cuda_seconds(*shape, size=r.element_size) * 1e3:.2f}"
        lines.append(
            f"| {r.layer.name} | {r.layer.C}x{r.layer.H}x{r.layer.W} | {r.J},{r.K} | {r.backend} "
            f"| {r.seconds * 1e3:.2f} | {r.best * 1e3:.2f} | {milliseconds(r.forward_seconds)} "
            + (f"| {model * 1e3:.2f} | {100 * model / r.seconds:.0f}% " if model else "| - | - ")
            + f"| {issue} | {gflops:.1f} | {100 * gflops / peak:.0f}% "
            f"| {ratio(by_key.get((*key, 'eager')), r)} "
            f"| {ratio(by_key.get((*key, 'compile')), r)} "
            f"| {r.extra_bytes / MIB:.1f} "
            + (
                f"| {r.requested_extra_bytes / MIB:.1f} "
                if r.requested_extra_bytes is not None
                else "| - "
            )
            + (f"| {r.model_extra_bytes / MIB:.1f} " if r.model_extra_bytes is not None else "| - ")
            + f"| {100 * r.extra_bytes / r.io_bytes:.1f} "
            + (
                f"| {100 * r.requested_extra_bytes / r.io_bytes:.1f} "
                if r.requested_extra_bytes is not None
                else "| - "
            )
            + f"| {blowup:.0f} |"
        )

    lines += ["", "Summed over the five layers:", ""]
    lines += [
        "| J,K | backend | total ms | vs eager | vs compile | total best ms | best vs eager "
        "| best vs compile |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for J, K in args.jk:
        mine = [r for r in rows if (r.J, r.K) == (J, K)]
        median = {b: sum(r.seconds for r in mine if r.backend == b) for b in args.backends}

        ran = {b: sum(r.backend == b for r in mine) for b in args.backends}
        # a baseline's total only where it ran at every layer
        complete = {b: ran[b] == len(STYLE_LAYERS) for b in args.backends}

        best = {b: sum(r.best for r in mine if r.backend == b) for b in args.backends}
        for b in args.backends:
            if not ran[b]:
                continue
            cells = [f"{J},{K}", b]
            for totals in (median, best):
                cells.append(f"{totals[b] * 1e3:.1f}")
                cells += [
                    f"{totals[x] / totals[b]:.2f}x" if complete.get(x) else "-" for x in BASELINES
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(
    results: dict[int, list[Row]], peak: float, peak_how: str, bandwidth: float, args
) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    threads = torch.get_num_threads() if args.device == "cpu" else None
    header = [
        f"# masked_gram forward + backward at the VGG-16 style layers, {args.dtype}",
        "",
        f"- device: {device_name(args.device)}"
        + (f" ({threads} torch threads)" if threads else ""),
        f"- {versions()}",
        f"- git {git_sha()}, {now}, load average before the run {load}",
        f"- matmul peak measured in this run: {peak:.0f} GFLOP/s ({peak_how})",
        *(
            [
                f"- memory bandwidth measured in this run: {bandwidth / 1e9:.0f} GB/s (1 GiB "
                "device-to-device copy, bytes read + written); model ms: the roofline bound "
                "max(flops / peak, bytes / bandwidth) with the fewest bytes (F read twice, dF "
                "written, masks read twice, G and dG); % roofline = model / measured; issue "
                "model ms: bench/issue_model.py's bound of the Triton and CUDA kernels (MMAs, "
                "CUDA-core FMAs, L1 / shared-memory wavefronts, issue slots, at an H100's rates)"
            ]
            if math.isfinite(bandwidth)
            else []
        ),
        f"- time: median (and best) of {args.fused_repeats} runs (eager and compile: "
        f"{args.repeats}) after {args.warmup} warm-up runs, "
        "forward + backward (forward ms: the forward alone, without autograd; not timed for "
        "compile, whose forward alone would be as many compiles again); "
        "GFLOP/s from the median, counting 4*J*K*N*C^2 per forward + backward, against the "
        "peak's best run; 3x3 random kernels, soft masks, B=1",
        "- extra MiB: peak memory of one forward + backward above inputs and outputs "
        + (
            "(torch.cuda.max_memory_allocated: the blocks the caching allocator handed out, "
            "each up to 1 MiB over what was asked where it reused a cached block unsplit); "
            "requested MiB: the same from the peak of the bytes the op asked for "
            "(torch.cuda.memory_stats' requested_bytes), the figure to judge against the model "
            "and the target"
            if args.device == "cuda"
            else "(process VmHWM after clear_refs, fixed malloc mmap threshold)"
        )
        + "; model extra MiB: predicted for this card, Triton's from its launchers' own sizing "
        "(triton_extra_model), CUDA's from its plan (cuda_extra_model); extra % io: extra "
        "over inputs + outputs (F, masks, kernels, dG, G, dF; issue 9's target: 10 %), and "
        "requested % io the requested figure's; "
        "J*K*N*C MiB: the intermediate the eager code materialises"
        + (
            ". The CUDA rows read 0.0: the forward's only scratch (its partial Grams) is smaller "
            "than dF, which does not exist yet while it lives, and the backward needs none"
            if args.device == "cuda"
            else ""
        ),
        "",
        "",
    ]
    sections = [
        f"## {image}x{image} image\n\n{table(rows, peak, bandwidth, args)}\n"
        for image, rows in results.items()
    ]
    return "\n".join(header) + "\n".join(sections)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    parser.add_argument(
        "--image",
        type=int,
        nargs="+",
        choices=(512, 1024, 2048, 4096),
        help="image sizes (default: 512 on cpu, 1024 on cuda)",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="comma-separated, from the fused backends present, 'eager' and 'compile' "
        "(default: all of them)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--jk", default="1x1,3x3", help="J x K pairs, e.g. 1x1,3x3")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--fused-repeats",
        type=int,
        default=None,
        help="timed runs of the fused backends' rows, short ones (default: --repeats)",
    )
    parser.add_argument("--out", type=Path, default=None, help="markdown table path")
    parser.add_argument(
        "--compile-max-image",
        type=int,
        default=0,
        help="run the torch.compile baseline only up to this image size (0: at every size)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: a 64x64 image, few runs, writes nothing"
    )
    parser.add_argument(
        "--memory-model",
        action="store_true",
        help="print the GPU backends' predicted extra memory per layer and exit (no GPU)",
    )
    parser.add_argument("--sms", type=int, default=H100.sms, help="SMs for --memory-model")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: no CUDA device here")
    if args.warmup < 1:
        # the first call of torch.compile's code compiles it: timed, it would count the compile
        parser.error(f"--warmup {args.warmup}: at least 1 (the first call compiles)")
    if args.quick:
        args.warmup, args.repeats, args.fused_repeats = 1, 2, 2
    args.fused_repeats = args.fused_repeats or args.repeats
    args.image = args.image or [64 if args.quick else 512 if args.device == "cpu" else 1024]
    args.jk = [tuple(int(n) for n in pair.split("x")) for pair in args.jk.split(",")]
    present = fused_backends(args.device)
    args.backends = args.backends.split(",") if args.backends else [*present, *BASELINES]
    unknown = [b for b in args.backends if b not in (*present, *BASELINES)]
    if unknown:
        parser.error(
            f"--backends {','.join(unknown)}: not present on {args.device}; "
            f"choose from {', '.join([*present, *BASELINES])}"
        )
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_model:
        print(memory_model_table(args))
        return
    peak, peak_how = matmul_peak(args.device, getattr(torch, args.dtype), args.warmup, args.repeats)
    print(f"matmul peak: {peak:.0f} GFLOP/s ({peak_how})", flush=True)
    bandwidth = memory_bandwidth(args.device, args.warmup, args.repeats)
    print(f"memory bandwidth: {bandwidth / 1e9:.0f} GB/s", flush=True)
    out = args.out
    if out is None and not args.quick:
        name = slug(device_name(args.device))
        out = ROOT / "bench" / "results" / f"{name}-masked_gram.md"
    results = {}
    for image in args.image:  # the table is rewritten after each image: a cut run keeps its rows
        results[image] = measure(args, image)
        text = report(results, peak, peak_how, bandwidth, args)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
    print(text)
    if out is not None:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
