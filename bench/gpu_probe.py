"""Where the CUDA kernels' time goes on a GPU: each tensor-core kernel, forward and backward,
timed whole and with one stage left out or done twice.

The variants are ``Probe`` in ``csrc/masked_gram_cuda_kernels.cuh``, chosen by the environment
variable ``CAST_CUDA_PROBE`` (read at every launch; float32 and bfloat16, the widest tiles): the
loads alone, everything but the MMAs, the loads of F for the first tile / step only, the loads
twice. Their results are wrong; only their times matter. Layers relu1_1 and relu3_1 of a 1024^2
image, J = K = 3, r = 3, beside ``bench/issue_model.py``'s bound for each kernel (H100 rates).

    python bench/gpu_probe.py            # a CUDA machine; about 20 s
"""

from __future__ import annotations

import os
import statistics

import torch
from issue_model import cuda_backward_chain, cuda_forward

from cast import backends
from cast.ops import canonical_inverse_mass

VARIANTS = {"whole": 0, "loads only": 1, "no MMA": 2, "no loads": 3, "loads twice": 4}
LAYERS = (("relu1_1", 64, 1024), ("relu3_1", 256, 256))  # name, C, side at a 1024^2 image
J = K = 3


def median_ms(run, repeats: int = 5) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, 1024^2 image, J = K = {J}, r = 3; ms, median of 5")
    print()
    print("| layer | dtype | kernel | model bound | " + " | ".join(VARIANTS) + " |")
    print("| --- | --- | --- | ---: |" + " ---: |" * len(VARIANTS))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, C, side in LAYERS:
        for dtype in (torch.float32, torch.bfloat16):
            probe(name, C, side, dtype, gen)


if __name__ == "__main__":
    main()
