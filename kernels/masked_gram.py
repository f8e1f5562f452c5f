"""The masked high-order Gram op of SPEC §1 as fused Triton kernels (backend ``"triton"``).

Forward. A program owns one batch item ``b``, one kernel ``p_j``, a chunk of up to four masks,
one upper-triangle pair of channel blocks ``(a, c)``, ``a <= c``, and one contiguous split of
the ``N`` positions. Per tile of positions it forms ``Z_j = P_j F`` for both channel blocks on
chip (``r*r`` shifted masked loads of ``F``, which hit L1/L2) and adds
``(m_k^2 Z_a)^T Z_c`` to one accumulator per mask, so ``P_j F`` and ``M_k P_j F`` never reach
memory. Masks come in chunks of ``NUM_MASKS`` (a constexpr, unrolled: the largest divisor of
``K`` up to four) rather than all ``K`` at once, which bounds the registers a program needs;
``K = 3`` is one chunk, and ``F`` is read once for all three. Each split of the positions
writes its own partial Gram and the splits are summed afterwards: deterministic, no atomics,
and the scratch, ``S * B*J*K*C^2``, is kept within a tenth of the inputs and outputs.

Backward. ``dF = sum_jk W_jk S_jk`` with ``S_jk = (dG_jk + dG_jk^T) / n_k`` (tiny, formed
once in ``cast.ops``) and ``W_jk = P_j^T M_k^2 P_j F``, which acts on each channel alone.
Grouping the two taps of ``P_j^T`` and ``P_j`` by their difference ``u`` turns ``W_jk`` into
one ``(2r-1) x (2r-1)`` stencil with per-position weights,
``W_jk F[n] = sum_u A_jku[n] F[n+u]``, ``A_jku[n] = sum_t p_j[t+u] p_j[t] m_k^2[n-t]``, so a
program (one tile of positions, one block of output channels) needs ``(2r-1)^2`` shifted loads
of ``F`` per block of reduction channels, and no halo, no scratch and nothing proportional to
``J*N*C``. The position-only factors ``p_j[t] m_k^2[n-t]`` are loaded once per (j, mask) and
program; each ``A_u`` is rebuilt from them where it is used (``r^4`` vector multiply-adds per
mask and reduction block, against ``(2r-1)^2 * BLOCK_D`` for the stencil itself).

Cost: matmul work ``2*J*K*N*C^2``, twice the forward's upper triangle; the stencil is
recomputed for every block of output channels, ``(2r-1)^2 (1 + K)`` CUDA-core operations per
element and block. At ``C / BLOCK_C = 4``, ``K = 3``, ``r = 3`` that estimates the backward at
3-4x the forward on an H100, bound by the CUDA cores rather than the tensor cores (estimated,
not measured: no GPU here). Computing ``U_j`` on a haloed tile instead (option (b)) would put
the halo's overhead on the matmul and need a scratch buffer and a barrier; keeping every
reduction block's stencilled tile to avoid the recompute needs ``BLOCK_N * C * K`` values on
chip.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends import FLOAT_DTYPES
from ..reference import gram_dtype
from .utils import (
    INTERPRETING,
    channel_blocks,
    dot_constexprs,
    fits_channels,
    on_device,
    programs_to_fill,
    wide_offsets,
)

DTYPES = FLOAT_DTYPES  # every dtype the op takes
AUTOTUNE = os.environ.get("CAST_TRITON_AUTOTUNE", "1") not in ("", "0")
MASKS_PER_PROGRAM = 4
# Split scratch (partial Grams) may take at most this fraction of the inputs and outputs.
SPLIT_SCRATCH_FRACTION = 0.1

# One fixed config under the interpreter, where each op costs a numpy call however big its
# tile: large position tiles keep the tests fast, small channel blocks still give several
# channel blocks (and block pairs) at the tests' C = 20 and C = 40.
INTERPRETER_FWD_CONFIG = dict(BLOCK_N=64, BLOCK_C=16, num_warps=4)
INTERPRETER_BWD_CONFIG = dict(BLOCK_N=128, BLOCK_C=32, BLOCK_D=32, num_warps=4)

# num_stages=1: the r*r (forward) and (2r-1)^2 (backward) shifted loads of a tile are cache
# hits, and software pipelining would stage every one of them in shared memory (sm90 compile of
# the backward at num_stages=3: 272 KiB, over the H100's 227 KiB).
# Every config compiles for sm_90 without spilling at the mask counts _fits lets it take
# (tests/sm90.py reads the machine code; tests/test_triton_kernels.py asserts it).
FWD_CONFIGS = [
    triton.Config(dict(BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C), num_warps=num_warps, num_stages=1)
    for BLOCK_N, BLOCK_C, num_warps in [(64, 64, 8), (128, 64, 8)]
]
BWD_CONFIGS = [
    triton.Config(
        dict(BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D), num_warps=num_warps, num_stages=1
    )
    for BLOCK_N, BLOCK_C, BLOCK_D, num_warps in [(64, 64, 32, 8), (128, 64, 32, 8)]
]
# Splits of the positions are whole multiples of every BLOCK_N, so no tile straddles two.
SPLIT_QUANTUM = max(c.kwargs["BLOCK_N"] for c in FWD_CONFIGS)
# At most this many accumulator values per thread. sm_90, Triton 3.6: the forward at 64 x 64,
# 8 warps, takes 185 registers with one mask (16 accumulator values) and 227 with four (64);
# 128 x 128 spilled 448 B even with one mask (64 values), so no config reaches it.
MAX_ACCUMULATOR_REGISTERS = 64


@triton.jit
def _convolved_tile(
    base_ptr,  # scalar: position 0 of channel 0 of one batch item
    channel_offsets,  # (BLOCK_C,) c * N, int32 (int64 where C * N >= 2^31: WIDE_OFFSETS)
    channel_ok,  # (BLOCK_C,)
    offs_n,  # (BLOCK_N,)
    row,  # (BLOCK_N,) offs_n // W
    col,  # (BLOCK_N,) offs_n % W
    position_ok,  # (BLOCK_N,)
    kernel_ptr,  # (R, R) p_j
    H,
    W,
    R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """``(P_j F)[n, c]`` on a tile: cross-correlation with zero padding, ``R*R`` shifted loads.

    A loop, not unrolled: unrolled, the compiler issued all ``R*R`` loads of a 64 x 64 tile at
    once and spilled (255 registers, 1.2 KB spilled at 4 warps; sm_90, Triton 3.6). One offset
    tile and a scalar base rather than a tile of 64-bit pointers, for the same reason."""
    tile = tl.zeros((BLOCK_N, BLOCK_C), ACC_DTYPE)
    offsets = channel_offsets[None, :] + offs_n[:, None]
    for t in range(R * R):
        dy = t // R - R // 2
        dx = t % R - R // 2
        inside = position_ok & (row + dy >= 0) & (row + dy < H) & (col + dx >= 0) & (col + dx < W)
        x = tl.load(
            base_ptr + (offsets + (dy * W + dx)),
            mask=inside[:, None] & channel_ok[None, :],
            other=0.0,
        )
        tile += tl.load(kernel_ptr + t).to(ACC_DTYPE) * x.to(ACC_DTYPE)
    return tile


@triton.jit
def _round_to_tf32(x):
    """float32 rounded to TF32's 10 mantissa bits, to nearest (ties away from zero, as PTX's
    ``cvt.rna.tf32.f32``). The tensor cores truncate float32 operands, which biases every
    product of non-negative ReLU features low by about 1e-3; rounding first removes the bias.
    Plain integer arithmetic, so the interpreter computes the same values."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x1000) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot_operand(x, DOT_DTYPE: tl.constexpr, UPCAST_DOT: tl.constexpr, ROUND_TF32: tl.constexpr):
    """``x`` as a tl.dot operand: cast to the MMA's input dtype, TF32-rounded where TF32 is used."""
    x = x.to(DOT_DTYPE)
    if ROUND_TF32:
        x = _round_to_tf32(x)
    if UPCAST_DOT:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_gram(
    gram_ptr,  # (C, C) one Gram of the output
    acc,  # (BLOCK_C, BLOCK_C) rows: block a, columns: block c
    inv_mass_ptr,  # scalar 1 / n_k
    offs_a,  # (BLOCK_C,)
    offs_c,  # (BLOCK_C,)
    C,
):
    """The upper triangle where it is, mirrored below: G is exactly symmetric and no element
    is written twice, also in a diagonal block (a == c)."""
    gram = acc * tl.load(inv_mass_ptr)
    inside = (offs_a < C)[:, None] & (offs_c < C)[None, :]
    upper = offs_a[:, None] <= offs_c[None, :]
    strictly_upper = offs_a[:, None] < offs_c[None, :]
    tl.store(gram_ptr + offs_a[:, None] * C + offs_c[None, :], gram, mask=inside & upper)
    tl.store(gram_ptr + offs_c[None, :] * C + offs_a[:, None], gram, mask=inside & strictly_upper)


@triton.jit
def _masked_gram_fwd_kernel(
    features_ptr,  # (B, C, H, W)
    masks_ptr,  # (Bm, K, H, W)
    kernels_ptr,  # (J, R, R)
    inv_mass_ptr,  # (Bm, K): 1 / n_k, 0 for an empty mask
    out_ptr,  # (S, B, J, K, C, C): the Grams of each split of the positions, 1/n_k applied
    B,
    C,
    H,
    W,
    N,
    J,
    K,
    mask_batch_stride,  # K * N when each batch item has its masks, 0 when they are shared
    inv_mass_batch_stride,  # K or 0, likewise
    positions_per_split,
    size_class,  # only for the tuning key (size_class())
    R: tl.constexpr,
    NUM_MASKS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ROUND_TF32: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # axis 0: (b, j, mask chunk, channel block pair); axis 1: split of the positions
    blocks = tl.cdiv(C, BLOCK_C)
    pairs = blocks * (blocks + 1) // 2
    chunks = K // NUM_MASKS  # NUM_MASKS divides K
    pid = tl.program_id(0)
    pair = pid % pairs
    k0 = (pid // pairs) % chunks * NUM_MASKS
    j = pid // (pairs * chunks) % J
    b = pid // (pairs * chunks * J)
    split = tl.program_id(1)

    # Upper-triangle pair index -> (block_a <= block_c), enumerated column by column; the
    # float square root may be off by one either way, hence the two corrections.
    block_c = ((tl.sqrt(8.0 * pair + 1.0) - 1.0) * 0.5).to(tl.int32)
    block_c = tl.where(block_c * (block_c + 1) // 2 > pair, block_c - 1, block_c)
    block_c = tl.where((block_c + 1) * (block_c + 2) // 2 <= pair, block_c + 1, block_c)
    block_a = pair - block_c * (block_c + 1) // 2
    offs_a = block_a * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_c = block_c * BLOCK_C + tl.arange(0, BLOCK_C)
    a_ok = offs_a < C
    c_ok = offs_c < C

    batch_features = features_ptr + b.to(tl.int64) * C * N
    if WIDE_OFFSETS:
        offsets_a = offs_a.to(tl.int64) * N
        offsets_c = offs_c.to(tl.int64) * N
    else:
        offsets_a = offs_a * N
        offsets_c = offs_c * N
    kernel_ptr = kernels_ptr + j * R * R
    mask_ptr = masks_ptr + b.to(tl.int64) * mask_batch_stride + k0.to(tl.int64) * N

    grams = ()  # one (BLOCK_C, BLOCK_C) accumulator per mask of the chunk
    for _ in tl.static_range(NUM_MASKS):
        grams = grams + (tl.zeros((BLOCK_C, BLOCK_C), ACC_DTYPE),)
    start = split * positions_per_split
    end = tl.minimum(start + positions_per_split, N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        position_ok = offs_n < end
        row = offs_n // W
        col = offs_n - row * W
        z_a = _convolved_tile(
            batch_features,
            offsets_a,
            a_ok,
            offs_n,
            row,
            col,
            position_ok,
            kernel_ptr,
            H,
            W,
            R,
            BLOCK_N,
            BLOCK_C,
            ACC_DTYPE,
        )
        if block_a == block_c:
            z_c = z_a
        else:
            z_c = _convolved_tile(
                batch_features,
                offsets_c,
                c_ok,
                offs_n,
                row,
                col,
                position_ok,
                kernel_ptr,
                H,
                W,
                R,
                BLOCK_N,
                BLOCK_C,
                ACC_DTYPE,
            )
        z_c = _dot_operand(z_c, DOT_DTYPE, UPCAST_DOT, ROUND_TF32)
        updated = ()
        for i in tl.static_range(NUM_MASKS):
            weight = tl.load(mask_ptr + i * N + offs_n, mask=position_ok, other=0.0)
            weight = weight.to(ACC_DTYPE)
            # m_k^2 on one side only
            left = _dot_operand(z_a * (weight * weight)[:, None], DOT_DTYPE, UPCAST_DOT, ROUND_TF32)
            gram = tl.dot(
                tl.trans(left), z_c, grams[i], input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE
            )
            updated = updated + (gram,)
        grams = updated

    gram_ptr = out_ptr + (((split * B + b) * J + j) * K + k0).to(tl.int64) * C * C
    inv_ptr = inv_mass_ptr + b * inv_mass_batch_stride + k0
    for i in tl.static_range(NUM_MASKS):
        _store_gram(gram_ptr + i * C * C, grams[i], inv_ptr + i, offs_a, offs_c, C)


@triton.jit
def _weighted_mask_taps(
    mask_ptr,  # (H, W) one mask m_k
    taps,  # R*R scalars p_j[t]
    offs_n,  # (BLOCK_N,)
    row,  # (BLOCK_N,) offs_n // W
    col,  # (BLOCK_N,) offs_n % W
    position_ok,  # (BLOCK_N,)
    H,
    W,
    R: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """``p[t] m^2[n-t]`` for every tap ``t``, zero where ``n-t`` is outside the image (that is
    ``P^T``'s zero padding; ``P``'s shows in the zero-padded loads of ``F[n+u]``)."""
    weighted = ()
    for t in tl.static_range(R * R):
        dy = t // R - R // 2
        dx = t % R - R // 2
        inside = position_ok & (row >= dy) & (row - dy < H) & (col >= dx) & (col - dx < W)
        m = tl.load(mask_ptr + offs_n - (dy * W + dx), mask=inside, other=0.0).to(ACC_DTYPE)
        weighted = weighted + (taps[t] * (m * m),)
    return weighted


@triton.jit
def _add_sym_grad_product(
    acc,  # (BLOCK_N, BLOCK_C)
    stencilled,  # (BLOCK_N, BLOCK_D) (P_j^T M_k^2 P_j F) on reduction channels d
    sym_ptr,  # (C, C) S_jk
    offs_d,  # (BLOCK_D,)
    offs_c,  # (BLOCK_C,)
    C,
    DOT_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ROUND_TF32: tl.constexpr,
):
    """``acc + stencilled @ S_jk[d, c]``: MMA in the input's precision (bf16/fp16 operands for
    16-bit input, TF32 rounded to nearest or IEEE for float32), accumulation in ``acc``'s."""
    sym = tl.load(
        sym_ptr + offs_d[:, None] * C + offs_c[None, :],
        mask=(offs_d < C)[:, None] & (offs_c < C)[None, :],
        other=0.0,
    )
    stencilled = _dot_operand(stencilled, DOT_DTYPE, UPCAST_DOT, ROUND_TF32)
    sym = _dot_operand(sym, DOT_DTYPE, UPCAST_DOT, ROUND_TF32)
    return tl.dot(stencilled, sym, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def _masked_gram_bwd_kernel(
    features_ptr,  # (B, C, H, W)
    masks_ptr,  # (Bm, K, H, W)
    kernels_ptr,  # (J, R, R)
    sym_grad_ptr,  # (B, J, K, C, C): S = (dG + dG^T) / n_k, 0 for an empty mask
    dfeatures_ptr,  # (B, C, H, W)
    C,
    H,
    W,
    N,
    J,
    K,
    mask_batch_stride,  # K * N when each batch item has its masks, 0 when they are shared
    size_class,  # only for the tuning key (size_class())
    R: tl.constexpr,
    NUM_MASKS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ROUND_TF32: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # axis 0: tile of positions; axis 1: block of output channels; axis 2: batch item
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2)
    position_ok = offs_n < N
    row = offs_n // W
    col = offs_n - row * W
    batch_features = features_ptr + b.to(tl.int64) * C * N
    batch_masks = masks_ptr + b.to(tl.int64) * mask_batch_stride
    SPAN: tl.constexpr = 2 * R - 1

    acc = tl.zeros((BLOCK_N, BLOCK_C), ACC_DTYPE)
    for j in range(J):
        kernel_ptr = kernels_ptr + j * R * R
        taps = ()
        for t in tl.static_range(R * R):
            taps = taps + (tl.load(kernel_ptr + t).to(ACC_DTYPE),)
        for k0 in range(0, K, NUM_MASKS):
            # Position-only factors of the stencil weights, once per (j, mask) and program;
            # R*R vectors per mask rather than (2R-1)^2 finished weights keeps registers low.
            mask_ptr = batch_masks + tl.cast(k0, tl.int64) * N
            weighted = ()
            for i in tl.static_range(NUM_MASKS):
                weighted = weighted + (
                    _weighted_mask_taps(
                        mask_ptr + i * N, taps, offs_n, row, col, position_ok, H, W, R, ACC_DTYPE
                    ),
                )
            sym_ptr = sym_grad_ptr + ((b * J + j) * K + k0).to(tl.int64) * C * C
            for d0 in range(0, C, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                if WIDE_OFFSETS:
                    offsets = offs_d.to(tl.int64)[None, :] * N + offs_n[:, None]
                else:
                    offsets = offs_d[None, :] * N + offs_n[:, None]
                channel_ok = offs_d < C
                stencilled = ()  # (P_j^T M_k^2 P_j F) on channels d, one per mask
                for _ in tl.static_range(NUM_MASKS):
                    stencilled = stencilled + (tl.zeros((BLOCK_N, BLOCK_D), ACC_DTYPE),)
                # A loop, not unrolled: unrolled, the (2R-1)^2 shifted loads were all issued at
                # once and spilled (sm_90, Triton 3.9: 255 registers, 16 B spilled at 64x64x32).
                for u in range(SPAN * SPAN):
                    uy = u // SPAN - (R - 1)
                    ux = u % SPAN - (R - 1)
                    inside = position_ok & (row + uy >= 0) & (row + uy < H)
                    inside = inside & (col + ux >= 0) & (col + ux < W)
                    f = tl.load(
                        batch_features + (offsets + (uy * W + ux)),
                        mask=inside[:, None] & channel_ok[None, :],
                        other=0.0,
                    ).to(ACC_DTYPE)
                    updated = ()
                    for i in tl.static_range(NUM_MASKS):
                        # A_u[n] = sum_t p[t + u] p[t] m^2[n - t]; tap t + u from memory
                        # (u is a loop variable), zero where it falls outside the kernel
                        weight = tl.zeros(offs_n.shape, ACC_DTYPE)
                        for t in tl.static_range(R * R):
                            sy = t // R + uy
                            sx = t % R + ux
                            shifted = (sy >= 0) & (sy < R) & (sx >= 0) & (sx < R)
                            tap = tl.load(kernel_ptr + (sy * R + sx), mask=shifted, other=0.0)
                            weight += tap.to(ACC_DTYPE) * weighted[i][t]
                        updated = updated + (stencilled[i] + weight[:, None] * f,)
                    stencilled = updated
                for i in tl.static_range(NUM_MASKS):
                    acc = _add_sym_grad_product(
                        acc,
                        stencilled[i],
                        sym_ptr + i * C * C,
                        offs_d,
                        offs_c,
                        C,
                        DOT_DTYPE,
                        UPCAST_DOT,
                        INPUT_PRECISION,
                        ROUND_TF32,
                    )

    if WIDE_OFFSETS:
        out_offsets = offs_c.to(tl.int64)[None, :] * N + offs_n[:, None]
    else:
        out_offsets = offs_c[None, :] * N + offs_n[:, None]
    tl.store(
        dfeatures_ptr + b.to(tl.int64) * C * N + out_offsets,
        acc.to(dfeatures_ptr.dtype.element_ty),
        mask=position_ok[:, None] & (offs_c < C)[None, :],
    )


def config_fits(config: triton.Config, C: int, num_masks: int) -> bool:
    """Whether ``config``'s channel blocks fit C and its accumulators fit the registers."""
    block_c, warps = config.kwargs["BLOCK_C"], config.num_warps
    if "BLOCK_D" in config.kwargs:  # backward: one (BLOCK_N, BLOCK_C) + NUM_MASKS stencils
        tile = block_c + num_masks * config.kwargs["BLOCK_D"]
        fits = fits_channels(config.kwargs["BLOCK_D"], C)
        registers = config.kwargs["BLOCK_N"] * tile / (32 * warps)
    else:  # forward: NUM_MASKS (BLOCK_C, BLOCK_C) accumulators
        fits = True
        registers = num_masks * block_c * block_c / (32 * warps)
    return fits and fits_channels(block_c, C) and registers <= MAX_ACCUMULATOR_REGISTERS


def _fits(configs, named_args, **kwargs):
    """The autotuner's pruning: the configs that fit, else the first (smallest) one."""
    kept = [c for c in configs if config_fits(c, named_args["C"], kwargs["NUM_MASKS"])]
    return kept or configs[:1]


# Tuned once per channel count, masks, kernel size, precision and size class (about a factor
# of four in positions): not per image size, so coarse-to-fine scales and the layers of one
# image reuse each other's choice. (The dtypes of the pointer arguments are part of every key.)
TUNING_KEY = ["C", "J", "K", "R", "NUM_MASKS", "INPUT_PRECISION", "size_class"]
if INTERPRETING:
    _fwd_kernel, _bwd_kernel = _masked_gram_fwd_kernel, _masked_gram_bwd_kernel
else:
    prune = dict(early_config_prune=_fits)
    _fwd_kernel = triton.autotune(FWD_CONFIGS, key=TUNING_KEY, prune_configs_by=prune)(
        _masked_gram_fwd_kernel
    )
    _bwd_kernel = triton.autotune(BWD_CONFIGS, key=TUNING_KEY, prune_configs_by=prune)(
        _masked_gram_bwd_kernel
    )


def masks_per_program(K: int) -> int:
    """The largest divisor of K up to four: every chunk of masks is full, so no kernel needs
    a "mask k exists" test, and at most four (C, C) accumulators live in registers."""
    return max(d for d in range(1, MASKS_PER_PROGRAM + 1) if K % d == 0)


def size_class(N: int) -> int:
    """A coarse bucket of the positions for the tuning key: N within a factor of four."""
    return max(N, 1).bit_length() // 2


def _as_launch_config(config: triton.Config) -> dict:
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _launch_choice(tuned, raw, configs, config, interpreter_config, C, num_masks):
    """The autotuned kernel on a GPU; the raw kernel with a fixed config when one is given
    (tests of tiling variants), under the interpreter (one small config keeps tests fast), or
    with ``CAST_TRITON_AUTOTUNE=0`` (the first config that fits: no tuning runs, one compile
    per shape class; the GPU tests use it)."""
    if config is not None:
        return raw, config
    if INTERPRETING:
        return raw, interpreter_config
    if not AUTOTUNE:
        return raw, _as_launch_config(_fits(configs, dict(C=C), NUM_MASKS=num_masks)[0])
    return tuned, {}


def position_splits(features: Tensor, gram_bytes: int, programs: int) -> int:
    """How many splits of the positions fill the GPU, keeping their scratch small."""
    N = features.shape[-2] * features.shape[-1]
    wanted = triton.cdiv(programs_to_fill(features.device), programs)
    affordable = int(
        SPLIT_SCRATCH_FRACTION
        * (features.numel() * features.element_size() + gram_bytes)
        // gram_bytes
    )
    return max(1, min(wanted, affordable, triton.cdiv(N, SPLIT_QUANTUM), 65535))


def forward(
    features: Tensor,
    masks: Tensor,
    kernels: Tensor,
    inv_mass: Tensor,
    allow_tf32: bool,
    *,
    config: dict | None = None,
    splits: int | None = None,
) -> Tensor:
    """``G (B, J, K, C, C)`` of canonical inputs (see ``cast.backends``).

    ``config`` (``BLOCK_N``, ``BLOCK_C``, ``num_warps``) and ``splits`` (of the positions)
    override the launch layout; they change only the order of the sums.
    """
    B, C, H, W = features.shape
    K = masks.shape[1]
    J, R = kernels.shape[:2]
    N = H * W
    acc_dtype = gram_dtype(features.dtype)
    num_masks = masks_per_program(K)
    chunks = K // num_masks
    shared_masks = masks.shape[0] == 1

    gram = torch.empty((B, J, K, C, C), dtype=acc_dtype, device=features.device)
    kernel, launch_config = _launch_choice(
        _fwd_kernel,
        _masked_gram_fwd_kernel,
        FWD_CONFIGS,
        config,
        INTERPRETER_FWD_CONFIG,
        C,
        num_masks,
    )
    if splits is None:
        nominal_block = launch_config.get("BLOCK_C", 64)
        blocks = channel_blocks(C, nominal_block)
        programs = B * J * chunks * blocks * (blocks + 1) // 2
        splits = position_splits(features, gram.numel() * gram.element_size(), programs)
    quantum = launch_config.get("BLOCK_N", SPLIT_QUANTUM)
    positions_per_split = triton.cdiv(triton.cdiv(N, splits), quantum) * quantum
    splits = triton.cdiv(N, positions_per_split)
    out = gram[None] if splits == 1 else gram.new_empty((splits, *gram.shape))

    def grid(meta):
        blocks = channel_blocks(C, meta["BLOCK_C"])
        return (B * J * chunks * blocks * (blocks + 1) // 2, splits)

    with on_device(features):
        kernel[grid](
            features,
            masks,
            kernels,
            inv_mass,
            out,
            B,
            C,
            H,
            W,
            N,
            J,
            K,
            0 if shared_masks else K * N,
            0 if shared_masks else K,
            positions_per_split,
            size_class(N),
            R=R,
            NUM_MASKS=num_masks,
            WIDE_OFFSETS=wide_offsets(C, N),
            **dot_constexprs(features.dtype, allow_tf32),
            **launch_config,
        )
    return gram if splits == 1 else torch.sum(out, dim=0, out=gram)


def backward(
    sym_grad: Tensor,
    features: Tensor,
    masks: Tensor,
    kernels: Tensor,
    allow_tf32: bool,
    *,
    config: dict | None = None,
) -> Tensor:
    """``dF (B, C, H, W)`` in the features' dtype, for ``sym_grad = (dG + dG^T) / n_k``.

    ``config`` (``BLOCK_N``, ``BLOCK_C``, ``BLOCK_D``, ``num_warps``) overrides the tiling.
    """
    B, C, H, W = features.shape
    K = masks.shape[1]
    J, R = kernels.shape[:2]
    N = H * W
    dfeatures = torch.empty_like(features)
    # One mask at a time: each mask's stencil re-reads the tile of F from cache, but with
    # three masks' stencils live at once the kernel spilled (sm_90, Triton 3.6: 255 registers
    # and 16 B spilled at 64x64x32, 8 warps; 184 registers and none with one mask).
    num_masks = 1
    kernel, launch_config = _launch_choice(
        _bwd_kernel,
        _masked_gram_bwd_kernel,
        BWD_CONFIGS,
        config,
        INTERPRETER_BWD_CONFIG,
        C,
        num_masks,
    )

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), channel_blocks(C, meta["BLOCK_C"]), B)

    with on_device(features):
        kernel[grid](
            features,
            masks,
            kernels,
            sym_grad,
            dfeatures,
            C,
            H,
            W,
            N,
            J,
            K,
            0 if masks.shape[0] == 1 else K * N,
            size_class(N),
            R=R,
            NUM_MASKS=num_masks,
            WIDE_OFFSETS=wide_offsets(C, N),
            **dot_constexprs(features.dtype, allow_tf32),
            **launch_config,
        )
    return dfeatures
