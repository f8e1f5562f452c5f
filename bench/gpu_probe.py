"""Where the CUDA kernels' time goes on a GPU: each tensor-core kernel, forward and backward,
timed whole and with one stage left out or done twice.

The variants are ``Probe`` in ``csrc/masked_gram_cuda_kernels.cuh``, chosen by the environment
variable ``CAST_CUDA_PROBE`` (read at every launch; float32 and bfloat16, the widest tiles): the
loads alone, everything but the MMAs, the loads of F for the first tile / step only, the loads
twice. Their results are wrong; only their times matter. Layers relu1_1 and relu3_1 of a 1024^2
image, J = K = 3, r = 3, beside ``bench/issue_model.py``'s bound for each kernel (H100 rates).

    python bench/gpu_probe.py            # a CUDA machine; about 20 s

``--triton``: the Triton section (a process of its own in bench/gpu_check.sh, following no
``torch.compile``), the forward and the backward timed apart, CUDA events, median of 20:

- (a) the backward's scratch budget: at relu4_1 and relu5_1, J = K = 1 and 3, float32 and
  bfloat16, every shipped backward config that fits with the programs the budget allows
  (``backward_programs``, as shipped; "untuned default" marks the one
  ``CAST_TRITON_AUTOTUNE=0`` takes), the first with as many as are resident
  (``capped=False``), and the autotuned backward (the config column names the tuner's pick);
- (b) the float32 J = K = 1 step at relu2_1 and relu3_1 (6.1 ms at a37e7bb, 2.1 at 48ea547):
  every shipped forward and backward config forced, then the autotuned pair and the configs the
  tuner took. Hypotheses and the rows that tell them apart: bench/results/gpu-notes.md;
- (c) the backward at relu4_1 and relu5_1 with Gatys' 1 x 1 kernels, J = K = 1, float32 and
  bfloat16, autotuned: no scratch, so no budget (beside (a)'s r = 3 rows).

Each row also gives the host's time to issue the call (the op is launch-bound where it is near
the GPU time). ``--tiny``: the same rows on tiny shapes, on the CPU under the Triton
interpreter (TRITON_INTERPRET=1), for the tests.

    python bench/gpu_probe.py --triton   # a CUDA machine; about 10 s after the benches' compiles
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import torch
from issue_model import cuda_backward_chain, cuda_forward
from machine import require_device

from cast import backends
from cast.ops import canonical_inverse_mass

VARIANTS = {"whole": 0, "loads only": 1, "no MMA": 2, "no loads": 3, "loads twice": 4}
LAYERS = (("relu1_1", 64, 1024), ("relu3_1", 256, 256))  # name, C, side at a 1024^2 image
J = K = 3


def timed(run, device: str, warmup: int = 1, repeats: int = 5) -> tuple[float, float, float]:
    """Median and best ms of ``run`` (CUDA events on a GPU, the host's clock on the CPU) and the
    median ms the host takes to issue it (returning before the GPU is done)."""
    for _ in range(warmup):
        run()
    times, host = [], []
    for _ in range(repeats):
        if device == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            torch.cuda.synchronize()
            start.record()
        issued = time.perf_counter()
        run()
        host.append(1e3 * (time.perf_counter() - issued))
        if device == "cuda":
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append(host[-1])
    return statistics.median(times), min(times), statistics.median(host)


def median_ms(run, repeats: int = 5) -> float:
    return timed(run, "cuda", 1, repeats)[0]


def probe(name: str, C: int, side: int, dtype: torch.dtype, gen: torch.Generator) -> None:
    """One table row per kernel: the model's bound, then each variant's median time."""
    features = torch.randn((1, C, side, side), generator=gen, device="cuda").relu().to(dtype)
    masks = torch.rand((1, K, side, side), generator=gen, device="cuda").to(dtype)
    kernels = torch.randn((J, 3, 3), generator=gen, device="cuda").to(dtype)
    inv = canonical_inverse_mass(features, masks, None)
    grad = torch.randn((1, J, K, C, C), generator=gen, device="cuda")
    size = 4 if dtype == torch.float32 else 2
    cuda = backends.load("cuda")
    runs = {
        "forward": (
            lambda: cuda.forward(features, masks, kernels, inv, True),
            cuda_forward(side * side, C, J, K, 3, size=size),
        ),
        "backward": (
            lambda: cuda.backward(grad, features, masks, kernels, inv, True),
            cuda_backward_chain(side * side, C, J, K, 3, size=size),
        ),
    }
    for kernel, (run, model) in runs.items():
        cells = []
        for variant in VARIANTS.values():
            os.environ["CAST_CUDA_PROBE"] = str(variant)
            try:
                cells.append(f"{median_ms(run):.2f}")
            finally:
                del os.environ["CAST_CUDA_PROBE"]
        bound = 1e3 * max(model.seconds().values())
        print(f"| {name} | {str(dtype).removeprefix('torch.')} | {kernel} | {bound:.2f} | "
              + " | ".join(cells) + " |", flush=True)  # fmt: skip


def cuda_main() -> None:
    print(f"{torch.cuda.get_device_name()}, 1024^2 image, J = K = {J}, r = 3; ms, median of 5")
    print()
    print("| layer | dtype | kernel | model bound | " + " | ".join(VARIANTS) + " |")
    print("| --- | --- | --- | ---: |" + " ---: |" * len(VARIANTS))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, C, side in LAYERS:
        for dtype in (torch.float32, torch.bfloat16):
            probe(name, C, side, dtype, gen)


# ---------------------------------------------------------------------------------------------
# Triton: the backward's scratch budget, and the float32 J = K = 1 step at relu2_1 / relu3_1

# name, C, side at a 1024^2 image (bench/bench_masked_gram.py's VGG-16 layers)
BUDGET_LAYERS = (("relu4_1", 512, 128), ("relu5_1", 512, 64))
STEP_LAYERS = (("relu2_1", 128, 512), ("relu3_1", 256, 256))
TINY_LAYERS = (("tiny", 48, 12),)  # --tiny: every shipped config fits C = 48


def op_inputs(C: int, side: int, jk: int, dtype: torch.dtype, device: str, seed: int, r: int = 3):
    """Features (ReLU'd), soft masks, r x r kernels, 1 / n_k and dG, as the op's backward gets
    them."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn((1, C, side, side), generator=gen).relu()
    masks = torch.rand((1, jk, side, side), generator=gen)
    kernels = torch.randn((jk, r, r), generator=gen)
    grad = torch.randn((1, jk, jk, C, C), generator=gen)  # float32: the Grams' dtype
    to = dict(device=device, dtype=dtype)
    features, masks, kernels = features.to(**to), masks.to(**to), kernels.to(**to)
    return features, masks, kernels, canonical_inverse_mass(features, masks, None), grad.to(device)


def config_name(config: dict) -> str:
    sizes = [config[k] for k in ("TILE_H", "TILE_W", "BLOCK_C", "BLOCK_D") if k in config]
    stages = config.get("num_stages", 1)  # shown where the config is pipelined
    name = "x".join(map(str, sizes)) + f" w{config['num_warps']}"
    return name + (f" s{stages}" if stages > 1 else "")


def triton_row(part, layer, dtype, jk, kernel, config, programs, times) -> None:
    cells = [part, layer, str(dtype).removeprefix("torch."), f"{jk},{jk}", kernel, config,
             programs, *(f"{ms:.2f}" for ms in times)]  # fmt: skip
    print("| " + " | ".join(cells) + " |", flush=True)


def probe_budget(layers, dtypes, device: str, warmup: int, repeats: int) -> None:
    """(a) The backward alone: each fitting shipped config with the programs the scratch budget
    allows, the first uncapped, then autotuned (its candidates timed as the budget has them)."""
    from cast.kernels import masked_gram as triton_gram

    sms = triton_gram.multiprocessors(torch.device(device))
    for name, C, side in layers:
        for dtype in dtypes:
            for jk in (1, 3):
                features, masks, kernels, inv, grad = op_inputs(C, side, jk, dtype, device, 0)
                backward = partial(triton_gram.backward, grad, features, masks, kernels, inv, True)
                problem = triton_gram.Problem.of(features, masks, kernels)
                configs = triton_gram.fitting_configs(True, C, R=3)
                default = triton_gram.default_backward_config(problem, sms)
                runs = [("budget", config, True) for config in configs]
                runs.append(("uncapped", configs[0], False))
                for label, config, capped in runs:
                    programs = triton_gram.backward_programs(problem, config, sms, capped=capped)
                    rounds = triton_gram.backward_rounds(problem, config, sms, capped=capped)
                    if capped and config == default:
                        label += ", untuned default"
                    triton_row("a", name, dtype, jk, f"backward, {label}", config_name(config),
                               f"{programs} ({rounds} rounds)",
                               timed(partial(backward, config=config, programs=programs), device,
                                     warmup, repeats))  # fmt: skip
                times = timed(backward, device, warmup, repeats)
                tuned = triton_gram.tuned_configs()["backward"]
                triton_row("a", name, dtype, jk, "backward, autotuned", tuned, "-", times)


def probe_step(layers, device: str, warmup: int, repeats: int) -> None:
    """(b) float32, J = K = 1: the forward and the backward apart, each shipped config forced,
    then autotuned (the config column names the tuner's pick). The forced forwards take the
    autotuned one's splits of the rows (a forced config would cut by its own tile height)."""
    from cast.kernels import masked_gram as triton_gram

    dtype, jk = torch.float32, 1
    sms = triton_gram.multiprocessors(torch.device(device))
    fill = triton_gram.programs_to_fill(sms) if device == "cuda" else 1  # as forward() has it
    for name, C, side in layers:
        features, masks, kernels, inv, grad = op_inputs(C, side, jk, dtype, device, 0)
        problem = triton_gram.Problem.of(features, masks, kernels)
        splits = -(-side // triton_gram.split_rows(problem, {}, fill))
        forward = partial(triton_gram.forward, features, masks, kernels, inv, True)
        backward = partial(triton_gram.backward, grad, features, masks, kernels, inv, True)
        for config in triton_gram.fitting_configs(False, C, R=3):
            triton_row("b", name, dtype, jk, "forward", config_name(config), f"{splits} splits",
                       timed(partial(forward, config=config, splits=splits), device, warmup,
                             repeats))  # fmt: skip
        times = timed(forward, device, warmup, repeats)
        tuned = triton_gram.tuned_configs()["forward"]
        triton_row("b", name, dtype, jk, "forward, autotuned", tuned, "-", times)
        for config in triton_gram.fitting_configs(True, C, R=3):
            programs = triton_gram.backward_programs(problem, config, sms)
            times = timed(partial(backward, config=config), device, warmup, repeats)
            triton_row("b", name, dtype, jk, "backward", config_name(config), str(programs), times)
        times = timed(backward, device, warmup, repeats)
        tuned = triton_gram.tuned_configs()["backward"]
        triton_row("b", name, dtype, jk, "backward, autotuned", tuned, "-", times)


def probe_gatys(layers, dtypes, device: str, warmup: int, repeats: int) -> None:
    """(c) The backward alone with Gatys' 1 x 1 kernels, J = K = 1, autotuned: no scratch and
    every resident program (its own branch of the kernel), beside (a)'s r = 3 rows."""
    from cast.kernels import masked_gram as triton_gram

    sms = triton_gram.multiprocessors(torch.device(device))
    for name, C, side in layers:
        for dtype in dtypes:
            features, masks, kernels, inv, grad = op_inputs(C, side, 1, dtype, device, 0, r=1)
            backward = partial(triton_gram.backward, grad, features, masks, kernels, inv, True)
            problem = triton_gram.Problem.of(features, masks, kernels)
            config = triton_gram.default_backward_config(problem, sms)
            programs = triton_gram.backward_programs(problem, config, sms)
            times = timed(backward, device, warmup, repeats)
            tuned = triton_gram.tuned_configs()["backward"]
            triton_row("c", name, dtype, 1, "backward, r = 1, autotuned", tuned,
                       f"{programs} (untuned)", times)  # fmt: skip


def triton_main(tiny: bool) -> None:
    device = "cpu" if tiny else "cuda"
    warmup, repeats = (0, 1) if tiny else (3, 20)
    where = "CPU, Triton interpreter" if tiny else f"{torch.cuda.get_device_name()}, CUDA events"
    print(f"Triton, {where}, 1024^2 image's layers, r = 3; ms: median and best of {repeats} "
          f"after {warmup} warm-up calls; host ms: the median time to issue one")  # fmt: skip
    print()
    print("| part | layer | dtype | J,K | kernel | config | programs | ms | best ms | host ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: |")
    # (b) first: if Triton's cache misses and the step's limit cuts the rest, its rows are there
    probe_step(TINY_LAYERS if tiny else STEP_LAYERS, device, warmup, repeats)
    dtypes = (torch.float32, torch.bfloat16)
    probe_budget(TINY_LAYERS if tiny else BUDGET_LAYERS, dtypes, device, warmup, repeats)
    probe_gatys(TINY_LAYERS if tiny else BUDGET_LAYERS, dtypes, device, warmup, repeats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", action="store_true", help="the Triton section (see above)")
    parser.add_argument("--tiny", action="store_true", help="--triton on the CPU, tiny shapes")
    args = parser.parse_args(argv)
    if not args.tiny:
        require_device("cuda")
    if args.triton or args.tiny:
        triton_main(args.tiny)
    else:
        cuda_main()


if __name__ == "__main__":
    main()
