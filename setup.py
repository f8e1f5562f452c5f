"""Builds ``cast._C``: the C++ CPU kernels always, the CUDA kernels where torch has CUDA.

Build switches (environment variables):
  CAST_SKIP_CUDA=1        build the CPU kernels only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST    CUDA targets, torch's own switch, e.g. "9.0" for H100/H200
  CAST_DEBUG=1            -O0 -g, no NDEBUG
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


debug = flag("CAST_DEBUG")
with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not flag("CAST_SKIP_CUDA")

cxx_flags = ["-O0", "-g", "-UNDEBUG"] if debug else ["-O3", "-DNDEBUG"]
cxx_flags += ["-fopenmp"]  # at::parallel_for only runs in parallel when compiled with OpenMP
# Lets the vectorised row kernels of csrc/masked_gram_cpu.cpp use fused multiply-adds.
cxx_flags += ["-ffp-contract=fast"]
nvcc_flags = (
    ["-O0", "-g", "-lineinfo", "-UNDEBUG"] if debug else ["-O3", "-DNDEBUG", "--use_fast_math"]
)

sources = ["csrc/module.cpp", "csrc/masked_gram_cpu.cpp", "csrc/mask_mass_cpu.cpp"]
if with_cuda:
    # The glue and the kernels need different object names: ninja refuses two masked_gram_cuda.o.
    # The kernels come in parts (csrc/masked_gram_cuda_kernels.cuh), one .cu each, which ninja
    # compiles in parallel (MAX_JOBS): as one file, nvcc took 48 s on one core for sm_90 alone.
    sources += ["csrc/masked_gram_cuda_ops.cpp", *sorted(glob.glob("csrc/*.cu"))]
    extension = CUDAExtension(
        "cast._C",
        sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension(
        "cast._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
    )

setup(
    packages=["cast", "cast.kernels"],
    package_dir={"cast": "cast", "cast.kernels": "kernels"},
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
)
