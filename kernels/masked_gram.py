"""The masked high-order Gram op of SPEC §1 as fused Triton kernels (backend ``"triton"``).

Forward. A program owns one batch item ``b``, one kernel ``p_j``, a chunk of up to four masks,
one upper-triangle pair of channel blocks ``(a, c)``, ``a <= c``, and one split of the image
into bands of rows. Per ``TILE_H x TILE_W`` tile of positions it forms ``Z_j = P_j F`` for both
channel blocks on chip (``r*r`` shifted masked loads of ``F``, which hit L1/L2, coalesced: a
warp's load takes 32 consecutive positions of one channel; at ``r = 1``, 128-bit vectors where
``W`` is a multiple of 16) and adds
``(m_k^2 Z_a)^T Z_c`` to one accumulator per mask, so ``P_j F`` and ``M_k P_j F`` never reach
memory. Masks come in chunks of ``NUM_MASKS`` (a constexpr, unrolled: the largest divisor of
``K`` up to four) rather than all ``K`` at once, which bounds the registers a program needs;
``K = 3`` is one chunk, and ``F`` is read once for all three. Split 0 of the rows writes
``G``, each other split its own partial Gram, which a small kernel then adds into ``G`` in
split order: deterministic, no atomics, and the scratch, ``(S - 1) * B*J*K*C^2``, is kept
within a tenth of the inputs and outputs.

Backward. ``dF = sum_j P_j^T U_j`` with ``U_j = sum_k M_k^2 Z_j S_jk`` and
``S_jk = (dG_jk + dG_jk^T) / n_k``, a tile of it formed as it is loaded (a tile of dG, the
mirrored tile, 1/n_k: S is never in memory, nor anything of dG's size): ``P_j^T`` acts on each
channel alone, so it commutes with the channel mixing and is applied once per output instead of
once per mask. A program owns a ``TILE_H x TILE_W`` tile of positions and a block of output
channels; it writes dF on the tile's inner positions and computes ``U_j`` on the whole tile,
the inner positions' halo of ``r // 2`` included. Per block of reduction channels ``d`` it forms
``Z_j`` (``r*r`` shifted loads of ``F``, CUDA cores) and adds ``(m_k^2 Z_j) S_jk[d, c]`` for
every mask to one accumulator: ``[m_1^2 Z_j | ... | m_K^2 Z_j] [S_j1; ...; S_jK]``, one GEMM
with a ``K*C``-long reduction on the tensor cores (bf16/fp16 operands for 16-bit input). Then
``U_j`` goes through a per-program scratch tile (a tile cannot be shifted in registers) and the
adjoint convolution adds ``p_j[t] U_j[n - t]``, ``r*r`` multiply-adds per output element.
With ``1 x 1`` kernels (Gatys' Gram, the op's default) nothing is shifted: ``p_j`` is folded
into ``S_jk``, dF's sum stays in registers, and the backward takes no scratch at all.
Programs are persistent (as many as are resident at once, one per SM at 8 warps, and as the
scratch budget, a tenth of the op's inputs and outputs, has tiles for), so the scratch is one
tile per program (``U_j``, and dF's running sum between kernels), not anything proportional
to ``N``: at most 8.25 MiB on 132 SMs, 3.2 % of ``F`` at relu1_1 of a 1024^2 image; at a
small layer, fewer programs (relu5_1 of a 1024^2 image: 25 for 200 items in float32 and 16 in
bfloat16, where 100 would take them in 2 rounds: issue 9's memory target, paid in time). An
8 x 8 tile, a quarter of the scratch a program, buys part of that time back where the budget
binds (relu5_1 there: 108 programs in float32, 61 in bfloat16; the tuner picks per key).

Cost: matmul work ``2*J*K*N*C^2`` times the halo's overhead (the tile over its inner part,
256 / 196 = 1.31 at 16 x 16 and r = 3, 64 / 36 = 1.78 at 8 x 8); CUDA-core work ``J*r*r`` per
element and block of output channels for ``Z_j``, ``J*K`` for the masks, ``J*r*r`` for the
adjoint. The design it replaced applied the ``(2r-1)^2`` stencil of ``P_j^T M_k^2 P_j`` per
mask and block of output channels, ``(2r-1)^2 K`` (225 at r = K = 3) against
``r*r (1 + K) + r*r`` (45) now (``bench/results/gpu-notes.md`` has the model of both).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

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
    multiprocessors,
    on_device,
    programs_to_fill,
    wide_offsets,
)

DTYPES = FLOAT_DTYPES  # every dtype the op takes
AUTOTUNE = os.environ.get("CAST_TRITON_AUTOTUNE", "1") not in ("", "0")
MASKS_PER_PROGRAM = 4
# The forward's partial Grams may take at most this fraction of the op's inputs and outputs
# (inputs_outputs_bytes; issue 9's target for all scratch), and so may the backward's tiles,
# one per program (backward_programs: fewer programs where the budget asks).
SCRATCH_FRACTION = 0.1

# One fixed config under the interpreter, where each op costs a numpy call however big its
# tile: large position tiles keep the tests fast, small channel blocks still give several
# channel blocks (and block pairs) at the tests' C = 20 and C = 40.
INTERPRETER_FWD_CONFIG = dict(TILE_H=4, TILE_W=16, BLOCK_C=16, num_warps=4)
INTERPRETER_BWD_CONFIG = dict(TILE_H=8, TILE_W=16, BLOCK_C=16, BLOCK_D=16, num_warps=4)

# num_stages=1: the r*r shifted loads of a tile are cache hits, and software pipelining would
# stage every one of them in shared memory (sm90 compile of the stencil backward this replaced,
# at num_stages=3: 272 KiB, over the H100's 227 KiB).
# Every config compiles for sm_90 without spilling at the mask counts _fits lets it take
# (tests/sm90.py reads the machine code; tests/test_triton_kernels.py asserts it). Forward,
# sm_90a, float32 and bf16, 1-4 masks, sizes multiples of 16 or not, Triton 3.9 and 3.6: 2 x 32
# positions x 64 channels takes 174-255 registers, 4 x 32 x 64 184-255 (126-255 and 195-255 with
# the centre tap's 128-bit loads setting the layout, which made the shifted taps uncoalesced:
# _row_of_taps); 4 warps (m64n64 MMAs instead of m64n32) spilled 8-272 B at 3-4 masks. Backward,
# sm_90a, float32 and bf16, sizes multiples of 16 or not: 16 x 16 x 64 (reduction blocks of
# 16) takes 216-250 registers, 16 x 16 x 32 (for C <= 32) 228-243 (Triton 3.9, one scratch tile;
# 184-235 with two, on 3.9 and 3.6); the register allocation is erratic near the limit:
# 8 x 16 x 64 x 32 (half the tile) spilled 16-32 bytes, and so did 16 x 16 x 32 x 16 at 8 warps
# (8 B). 8 x 8 x 64 x 16 at 4 warps (a quarter of the positions and scratch, so the budget
# holds four times the programs; 36 of its 64 positions written at r = 3): 167-180 registers.
# It is third, for where the scratch budget binds: the lease of 30c9271 (H200) timed it 7 %-2.1x
# faster than 16 x 16 x 64 under the budget at relu4_1 and relu5_1 of a 1024^2 image, J = K = 1,
# and 51 % slower at relu4_1, J = K = 3, where the budget does not bind (gpu-notes).
# The third forward config, 32-channel blocks at 4 warps, is for where 64-channel blocks give
# the card too few programs (_forward_prune): sm_90a, Triton 3.9 and 3.6, float32 and bf16, 1-4
# masks, sizes multiples of 16 or not: 126-255 registers, so two to four programs an SM, no
# spill (4 x 32 x 32 took 255, 8 x 32 x 32 spilled 8-1248 B). The fourth is pipelined: every tap
# unrolled and 3 stages, so the next tiles' loads of F are asynchronous copies (cp.async) in
# flight while a tile is formed; its stages hold a copy of every tap's tile (2 x 9 x 4 KiB at
# r = 3, float32), so its tile is small: 1 x 32 x 32, 128-244 registers, 1-3 masks, no spill,
# 78-83 KiB of shared memory (sm_90a, Triton 3.9; 2 x 32 x 64 with 2 stages spilled 24-120 B at
# 3-4 masks, 2 x 32 x 32 112-176 B). float32 only: bf16's 2-byte loads are below cp.async's 4,
# so its stages stayed empty.
FWD_CONFIGS = [
    triton.Config(
        dict(TILE_H=TILE_H, TILE_W=TILE_W, BLOCK_C=BLOCK_C, UNROLL_ROWS=stages > 1),
        num_warps=num_warps,
        num_stages=stages,
    )
    for TILE_H, TILE_W, BLOCK_C, num_warps, stages in [
        (2, 32, 64, 8, 1),
        (4, 32, 64, 8, 1),
        (2, 32, 32, 4, 1),
        (1, 32, 32, 4, 3),
    ]
]
BWD_CONFIGS = [
    triton.Config(
        dict(TILE_H=TILE_H, TILE_W=TILE_W, BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D),
        num_warps=num_warps,
        num_stages=1,
    )
    for TILE_H, TILE_W, BLOCK_C, BLOCK_D, num_warps in [
        (16, 16, 64, 16, 8),
        (16, 16, 32, 16, 4),
        (8, 8, 64, 16, 4),
    ]
]
# Splits of the rows are whole multiples of every TILE_H, so no tile straddles two.
SPLIT_QUANTUM = max(c.kwargs["TILE_H"] for c in FWD_CONFIGS)
# At most this many bytes of a pipelined forward config's stages, each a copy of every tap's
# tile (float32): under half an H100's 227 KiB, so that two programs share an SM (r = 3: 72 KiB,
# 78-83 KiB with the tile's other buffers; r = 5 would take 200 KiB).
MAX_STAGED_BYTES = 100 * 1024
# At most this many accumulator values per thread. sm_90, Triton 3.6: the forward at 64 x 64,
# 8 warps, takes 161-255 registers with one to four masks (16 to 64 accumulator values);
# 128 x 128 spilled 448 B even with one mask (64 values), so no config reaches it.
MAX_ACCUMULATOR_REGISTERS = 64


@triton.jit
def _tap(tile, base_ptr, tap_offsets, inside, channel_ok, weight_ptr):
    """``tile += p_j[t] * F[n + t]``, the tap's offsets given, zero where not ``inside``."""
    if channel_ok is None:
        mask = inside[:, None]
    else:
        mask = inside[:, None] & channel_ok[None, :]
    x = tl.load(base_ptr + tap_offsets, mask=mask, other=0.0)
    return tile + tl.load(weight_ptr).to(tile.dtype) * x.to(tile.dtype)


@triton.jit
def _row_of_taps(tile, base_ptr, offsets, position_ok, row, col, H, W, channel_ok, kernel_ptr, ky,
                 R: tl.constexpr):  # fmt: skip
    """The taps of the kernel's row ``ky``, its columns unrolled.

    The row's offsets start at its leftmost tap, ``R // 2`` columns left of the centre, and
    the columns add constants to them. So at ``R > 1`` the compiler knows no alignment of any
    tap, and lays the tile out for coalescing: a warp's load takes 32 consecutive positions of
    one channel (one or two 128-byte lines). Were the centre tap known aligned, its 128-bit
    loads would set the layout of every tap (the coalescing pass gives all loads that feed
    one value the widest vector among them): 4 consecutive positions a thread (8 in bf16), so
    that a warp's load of a shifted tap spans 4-6 lines for 128 useful bytes. At ``R = 1``
    the one tap is the centre, aligned where ``W`` is a multiple of 16: 128-bit loads."""
    dy = ky - R // 2
    row_ok = position_ok & (row + dy >= 0) & (row + dy < H)
    row_offsets = offsets + (dy * W - R // 2)  # one scalar: its sum hides the centre's alignment
    for kx in tl.static_range(R):
        dx = kx - R // 2
        inside = row_ok & (col + dx >= 0) & (col + dx < W)
        tile = _tap(tile, base_ptr, row_offsets + kx, inside, channel_ok, kernel_ptr + ky * R + kx)
    return tile


@triton.jit
def _convolved_tile(
    base_ptr,  # scalar: position 0 of channel 0 of one batch item
    channel_offsets,  # (BLOCK_C,) c * N, int32 (int64 where C * N >= 2^31: WIDE_OFFSETS)
    channel_ok,  # (BLOCK_C,), or None where every channel offset is in bounds
    offs_n,  # (BLOCK_N,) row * W + col
    row,  # (BLOCK_N,)
    col,  # (BLOCK_N,)
    position_ok,  # (BLOCK_N,)
    kernel_ptr,  # (R, R) p_j
    H,
    W,
    R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UNROLL_COLUMNS: tl.constexpr,
    UNROLL_ROWS: tl.constexpr,
):
    """``(P_j F)[n, c]`` on a tile: cross-correlation with zero padding, ``R*R`` shifted loads.

    Rolled loops: unrolled whole, the compiler issued all ``R*R`` loads of a 64 x 64 tile at
    once and spilled (255 registers, 1.2 KB spilled at 4 warps; sm_90, Triton 3.6). With
    ``UNROLL_COLUMNS`` the kernel's rows are a loop and its columns unrolled
    (``_row_of_taps``: a row's loads issue together, coalesced, 128-bit at ``R = 1``); the
    backward's 4-warp config spilled unrolled (248-360 B), so it keeps the rolled loop.
    One offset tile and a scalar base rather than a tile of 64-bit pointers, for the same
    reason. With ``UNROLL_ROWS`` as well every tap is unrolled, and the loop over tiles around
    this is the innermost: Triton's pipeliner (``num_stages > 1``) then issues the next tiles'
    loads as asynchronous copies into shared memory while this tile is formed (float32; a
    small tile, as the stages hold every tap's copy)."""
    tile = tl.zeros((BLOCK_N, BLOCK_C), ACC_DTYPE)
    offsets = channel_offsets[None, :] + offs_n[:, None]
    if UNROLL_ROWS:
        for ky in tl.static_range(R):
            tile = _row_of_taps(
                tile, base_ptr, offsets, position_ok, row, col, H, W, channel_ok, kernel_ptr, ky, R
            )
    elif UNROLL_COLUMNS:
        for ky in range(R):
            tile = _row_of_taps(
                tile, base_ptr, offsets, position_ok, row, col, H, W, channel_ok, kernel_ptr, ky, R
            )
    else:
        for t in range(R * R):
            dy = t // R - R // 2
            dx = t % R - R // 2
            row_ok = position_ok & (row + dy >= 0) & (row + dy < H)
            inside = row_ok & (col + dx >= 0) & (col + dx < W)
            tile = _tap(tile, base_ptr, offsets + dy * W + dx, inside, channel_ok, kernel_ptr + t)
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
    MIRROR_TRANSPOSED: tl.constexpr,
):
    """The upper triangle where it is, mirrored below: G is exactly symmetric and no element
    is written twice, also in a diagonal block (a == c).

    ``MIRROR_TRANSPOSED`` stores the mirror as the transposed tile, so that its addresses run
    along the tile's last axis like the first store's. Where the accumulator has the shape of
    the tiles of F, a store contiguous along its first axis makes Triton's coalescing pass lay
    out F's loads like it: 4 positions a thread, from the 128-bit vectors the store allows.
    Elsewhere the plain mirror takes fewer registers (4 x 32 x 64 at 4 masks spilled 16 B with
    the transposed one)."""
    gram = acc * tl.load(inv_mass_ptr)
    inside = (offs_a < C)[:, None] & (offs_c < C)[None, :]
    upper = offs_a[:, None] <= offs_c[None, :]
    tl.store(gram_ptr + offs_a[:, None] * C + offs_c[None, :], gram, mask=inside & upper)
    if MIRROR_TRANSPOSED:
        strictly_lower = offs_c[:, None] > offs_a[None, :]  # G[c, a] with a < c
        tl.store(gram_ptr + offs_c[:, None] * C + offs_a[None, :], tl.trans(gram),
                 mask=tl.trans(inside) & strictly_lower)  # fmt: skip
    else:
        strictly_upper = offs_a[:, None] < offs_c[None, :]
        tl.store(gram_ptr + offs_c[None, :] * C + offs_a[:, None], gram,
                 mask=inside & strictly_upper)  # fmt: skip


@triton.jit
def _masked_gram_fwd_kernel(
    features_ptr,  # (B, C, H, W)
    masks_ptr,  # (Bm, K, H, W)
    kernels_ptr,  # (J, R, R)
    inv_mass_ptr,  # (Bm, K): 1 / n_k, 0 for an empty mask
    gram_out_ptr,  # (B, J, K, C, C): G, split 0's Gram, 1/n_k applied
    partial_ptr,  # (S - 1, B, J, K, C, C): the other splits' Grams (G itself at one split)
    B,
    C,
    H,
    W,
    N,
    J,
    K,
    mask_batch_stride,  # K * N when each batch item has its masks, 0 when they are shared
    inv_mass_batch_stride,  # K or 0, likewise
    rows_per_split,  # a multiple of TILE_H
    size_class,  # only for the tuning key (size_class())
    R: tl.constexpr,
    NUM_MASKS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ROUND_TF32: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    UNROLL_ROWS: tl.constexpr = False,  # every tap unrolled, for the pipelined config
):
    # axis 0: (b, j, mask chunk, channel block pair); axis 1: split of the rows
    BLOCK_N: tl.constexpr = TILE_H * TILE_W
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
    # Channels past C read channel C - 1 (and are never stored): the loads of F need no
    # channel mask, which took registers.
    loaded_a = tl.minimum(offs_a, C - 1)
    loaded_c = tl.minimum(offs_c, C - 1)

    batch_features = features_ptr + b.to(tl.int64) * C * N
    if WIDE_OFFSETS:
        offsets_a = loaded_a.to(tl.int64) * N
        offsets_c = loaded_c.to(tl.int64) * N
    else:
        offsets_a = loaded_a * N
        offsets_c = loaded_c * N
    kernel_ptr = kernels_ptr + j * R * R
    mask_ptr = masks_ptr + b.to(tl.int64) * mask_batch_stride + k0.to(tl.int64) * N

    grams = ()  # one (BLOCK_C, BLOCK_C) accumulator per mask of the chunk
    for _ in tl.static_range(NUM_MASKS):
        grams = grams + (tl.zeros((BLOCK_C, BLOCK_C), ACC_DTYPE),)
    # 2-D tiles of positions, TILE_W wide from a multiple of TILE_W: row and column come from
    # constexpr divisions, and the compiler sees the alignment that makes the centre column's
    # loads of F and the mask weights vector loads.
    offs_t = tl.arange(0, BLOCK_N)
    tile_row = offs_t // TILE_W
    tile_col = offs_t % TILE_W
    first_row = split * rows_per_split
    tiles_w = tl.cdiv(W, TILE_W)
    tiles = tl.cdiv(tl.minimum(rows_per_split, H - first_row), TILE_H) * tiles_w
    for tile in range(tiles):
        row = first_row + tile // tiles_w * TILE_H + tile_row
        col = tile % tiles_w * TILE_W + tile_col
        position_ok = (row < H) & (col < W)
        offs_n = row * W + col
        z_a = _convolved_tile(
            batch_features,
            offsets_a,
            None,
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
            True,
            UNROLL_ROWS,
        )
        if block_a == block_c:
            z_c = z_a
        else:
            z_c = _convolved_tile(
                batch_features,
                offsets_c,
                None,
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
                True,
                UNROLL_ROWS,
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

    if split == 0:
        out_ptr = gram_out_ptr
    else:
        out_ptr = partial_ptr + (split - 1).to(tl.int64) * B * J * K * C * C
    gram_ptr = out_ptr + ((b * J + j) * K + k0).to(tl.int64) * C * C
    inv_ptr = inv_mass_ptr + b * inv_mass_batch_stride + k0
    for i in tl.static_range(NUM_MASKS):
        _store_gram(gram_ptr + i * C * C, grams[i], inv_ptr + i, offs_a, offs_c, C,
                    BLOCK_N == BLOCK_C)  # fmt: skip


@triton.jit
def _add_partials_kernel(
    gram_ptr,  # (numel,): G, holding split 0's Gram
    partial_ptr,  # (partials, numel): the other splits' Grams
    numel,
    partials,
    BLOCK: tl.constexpr,
):
    """G += the other splits' Grams in split order: deterministic, in place, no temporary."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    total = tl.load(gram_ptr + offs, mask=inside)
    rows = partial_ptr + offs
    for _ in range(partials):
        total += tl.load(rows, mask=inside)
        rows += numel
    tl.store(gram_ptr + offs, total, mask=inside)


@triton.jit
def _masked_gram_bwd_kernel(
    features_ptr,  # (B, C, H, W)
    masks_ptr,  # (Bm, K, H, W)
    kernels_ptr,  # (J, R, R)
    grad_ptr,  # (B, J, K, C, C): dG
    inv_mass_ptr,  # (Bm, K): 1 / n_k, 0 for an empty mask
    scratch_ptr,  # (programs, TILE_H * TILE_W * BLOCK_C): U_j's tile, or dF's sum; R = 1: none
    dfeatures_ptr,  # (B, C, H, W)
    B,
    C,
    H,
    W,
    N,
    J,
    K,
    mask_batch_stride,  # K * N when each batch item has its masks, 0 when they are shared
    inv_mass_batch_stride,  # K or 0, likewise
    size_class,  # only for the tuning key (size_class())
    R: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    ROUND_TF32: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CHANNELS_ALIGNED: tl.constexpr,  # C a multiple of 16: dG's tiles in 128-bit loads
):
    # Persistent: program p takes work items p, p + programs, ... (item: batch item, tile of
    # positions, block of output channels), so the scratch is one tile per program, not per tile.
    HALO: tl.constexpr = R // 2
    OUT_H: tl.constexpr = TILE_H - 2 * HALO  # the tile's inner positions, whose dF it writes
    OUT_W: tl.constexpr = TILE_W - 2 * HALO
    BLOCK_M: tl.constexpr = TILE_H * TILE_W
    tiles_w = tl.cdiv(W, OUT_W)
    tiles = tl.cdiv(H, OUT_H) * tiles_w
    blocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    ty = offs_m // TILE_W
    tx = offs_m % TILE_W
    inner = (ty >= HALO) & (ty < TILE_H - HALO) & (tx >= HALO) & (tx < TILE_W - HALO)
    scratch = scratch_ptr + pid.to(tl.int64) * (BLOCK_M * BLOCK_C)
    cols = tl.arange(0, BLOCK_C)
    programs = tl.num_programs(0)
    # the tile's rows: addresses from row pointers, since a (tile, channel) offset tensor is
    # loop-invariant, the compiler hoists it, and it takes registers for good (sm_90, Triton
    # 3.9: two hoisted pointer tensors, 255 registers, spills)
    rows = scratch + offs_m * BLOCK_C

    for item in range(pid, B * tiles * blocks, programs):
        block = item % blocks
        tile = item // blocks % tiles
        b = item // (blocks * tiles)
        row = tile // tiles_w * OUT_H - HALO + ty
        col = tile % tiles_w * OUT_W - HALO + tx
        in_image = (row >= 0) & (row < H) & (col >= 0) & (col < W)
        offs_n = row * W + col
        offs_c = block * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        batch_features = features_ptr + b.to(tl.int64) * C * N
        batch_masks = masks_ptr + b.to(tl.int64) * mask_batch_stride
        batch_inv_mass = inv_mass_ptr + b * inv_mass_batch_stride

        # One tile per program holds U_j while it is shifted and, between kernels, dF's running
        # sum while U_j is formed: in registers beside U_j, Z_j and the MMA operands the sum
        # spilled (sm_90a, Triton 3.9, 16 x 16 x 64, 8 warps), and a second tile for it doubled
        # the scratch. Four barriers a kernel order the tile's uses (below). At R = 1 (Gatys'
        # kernels, p_j times the identity) nothing is shifted: dF = sum_j p_j U_j is one
        # accumulator over every j and k, p_j folded into S_jk, and the scratch is not used.
        u = tl.zeros((BLOCK_M, BLOCK_C), ACC_DTYPE)
        for j in range(J):
            kernel_ptr = kernels_ptr + j * R * R
            grad_j = grad_ptr + (b * J + j).to(tl.int64) * K * C * C
            if R == 1:
                adjoint = tl.load(kernel_ptr).to(ACC_DTYPE)
            else:
                adjoint = 1.0
                u = tl.zeros((BLOCK_M, BLOCK_C), ACC_DTYPE)
            # U_j = [m_1^2 Z_j | ... | m_K^2 Z_j] [S_j1; ...; S_jK] on the whole tile, halo
            # included; zero outside the image (the masks are), which is P_j^T's zero padding.
            for d0 in range(0, C, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < C
                if WIDE_OFFSETS:
                    offsets_d = offs_d.to(tl.int64) * N
                else:
                    offsets_d = offs_d * N
                z = _convolved_tile(
                    batch_features,
                    offsets_d,
                    d_ok,
                    offs_n,
                    row,
                    col,
                    in_image,
                    kernel_ptr,
                    H,
                    W,
                    R,
                    BLOCK_M,
                    BLOCK_D,
                    ACC_DTYPE,
                    False,
                    False,
                )
                # S_jk[d, c] = (dG[d, c] + dG[c, d]) / n_k, as reference.symmetric_grad, a tile
                # formed as loaded. Past C the tiles' rows read row C - 1 (rows of S meet zero
                # columns of Z_j, columns of S give columns of U_j that are never stored).
                if CHANNELS_ALIGNED:
                    # dG[d, c] along c, and the mirror as its own (c, d) tile along d, moved
                    # into place through shared memory: both loads coalesced, 128-bit. The
                    # columns are masked, not clamped: a clamp hides the offsets' contiguity,
                    # and Triton then gave both tiles one layout, a warp's lanes strided by C
                    # on one of them (the mirror on Triton 3.9, dG on 3.6).
                    grad_offsets = tl.minimum(offs_d, C - 1)[:, None] * C + offs_c[None, :]
                    mirrored_offsets = tl.minimum(offs_c, C - 1)[:, None] * C + offs_d[None, :]
                else:
                    # C not a multiple of 16 (no VGG layer): scalar loads either way, and the
                    # masked ones spilled (8-32 B); both tiles clamped
                    loaded_c = tl.minimum(offs_c, C - 1)
                    loaded_d = tl.minimum(offs_d, C - 1)
                    grad_offsets = loaded_d[:, None] * C + loaded_c[None, :]
                    mirrored_offsets = loaded_c[None, :] * C + loaded_d[:, None]
                for k in range(K):
                    grad_k = grad_j + k * C * C
                    if CHANNELS_ALIGNED:
                        grad = tl.load(grad_k + grad_offsets, mask=c_ok[None, :], other=0.0)
                        mirrored = tl.load(grad_k + mirrored_offsets, mask=d_ok[None, :], other=0.0)
                        mirrored = tl.trans(mirrored)
                    else:
                        grad = tl.load(grad_k + grad_offsets)
                        mirrored = tl.load(grad_k + mirrored_offsets)
                    sym = (grad + mirrored) * (tl.load(batch_inv_mass + k) * adjoint)
                    sym = _dot_operand(sym, DOT_DTYPE, UPCAST_DOT, ROUND_TF32)
                    m = tl.load(batch_masks + k * N + offs_n, mask=in_image, other=0.0)
                    m = m.to(ACC_DTYPE)
                    left = _dot_operand(z * (m * m)[:, None], DOT_DTYPE, UPCAST_DOT, ROUND_TF32)
                    u = tl.dot(left, sym, u, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            if R > 1:
                # P_j^T on the inner positions, dF[n] += sum_t p_j[t] U_j[n - t]: through the
                # scratch, the only way to shift a tile in Triton. The barriers order: the last
                # kernel's sum, stored, before it is read back; every read of it before U_j takes
                # the tile; U_j whole before its shifted reads; these before the sum takes the tile.
                started = tl.full((BLOCK_M, BLOCK_C), j, tl.int32) > 0  # zero before kernel 0
                tl.debug_barrier()
                acc = tl.load(rows[:, None] + cols[None, :], mask=started, other=0.0)
                tl.debug_barrier()
                tl.store(rows[:, None] + cols[None, :], u)
                tl.debug_barrier()
                for t in range(R * R):
                    shift = (t // R - HALO) * TILE_W + (t % R - HALO)
                    shifted = tl.load(
                        (rows - shift * BLOCK_C)[:, None] + cols[None, :],
                        mask=inner[:, None],
                        other=0.0,
                    )
                    acc += tl.load(kernel_ptr + t).to(ACC_DTYPE) * shifted
                tl.debug_barrier()
                tl.store(rows[:, None] + cols[None, :], acc)
        if R == 1:
            acc = u
        else:
            tl.debug_barrier()
            acc = tl.load(rows[:, None] + cols[None, :])

        if WIDE_OFFSETS:
            out_offsets = offs_c.to(tl.int64)[None, :] * N + offs_n[:, None]
        else:
            out_offsets = offs_c[None, :] * N + offs_n[:, None]
        tl.store(
            dfeatures_ptr + b.to(tl.int64) * C * N + out_offsets,
            acc.to(dfeatures_ptr.dtype.element_ty),
            mask=(inner & in_image)[:, None] & c_ok[None, :],
        )


def config_fits(config: triton.Config, C: int, num_masks: int = 1, R: int = 1) -> bool:
    """Whether ``config``'s channel blocks fit C, its accumulators the registers and (backward)
    its tile the halo of an R x R kernel."""
    block_c, warps = config.kwargs["BLOCK_C"], config.num_warps
    if "BLOCK_D" in config.kwargs:  # backward: spill-free at any C, J, K (its tiles are fixed)
        inner = min(config.kwargs["TILE_H"], config.kwargs["TILE_W"]) - 2 * (R // 2)
        return (
            fits_channels(block_c, C) and fits_channels(config.kwargs["BLOCK_D"], C) and inner > 0
        )
    # forward: NUM_MASKS (BLOCK_C, BLOCK_C) accumulators; a pipelined config's stages
    registers = num_masks * block_c * block_c / (32 * warps)
    positions = config.kwargs["TILE_H"] * config.kwargs["TILE_W"]
    staged = (config.num_stages - 1) * R * R * positions * block_c * 4
    return (
        fits_channels(block_c, C)
        and registers <= MAX_ACCUMULATOR_REGISTERS
        and staged <= MAX_STAGED_BYTES
        # the pipelined config spilled 8 B at 4 masks where sizes are not multiples of 16
        and (config.num_stages == 1 or num_masks <= 3)
    )


def _fits(configs, named_args, **kwargs):
    """The autotuner's pruning: the configs that fit, else the first (smallest) one."""
    C, num_masks, R = named_args["C"], kwargs.get("NUM_MASKS", 1), kwargs["R"]
    kept = [c for c in configs if config_fits(c, C, num_masks, R)]
    return kept or configs[:1]


def _forward_prune(configs, named_args, **kwargs):
    """``_fits``; then the pipelined config for float32 only (16-bit loads are too narrow for
    its copies), and the other 32-channel one only where 64-channel blocks leave SMs idle
    (relu5_1 of a 1024^2 image at J = K = 1: 72 programs for 132 SMs, 272 with 32-channel
    blocks): elsewhere it would read F twice as often, and each config is one more compile."""
    kept = _fits(configs, named_args, **kwargs)
    features, H, rows_per_split = (named_args[k] for k in ("features_ptr", "H", "rows_per_split"))
    J, K = named_args["J"], named_args["K"]
    problem = Problem(tuple(features.shape), 1, features.dtype, J, K, kwargs["R"])
    programs = forward_programs(problem, 64, triton.cdiv(H, rows_per_split))
    idle = programs < multiprocessors(features.device)

    def wanted(config: triton.Config) -> bool:
        if config.num_stages > 1:
            return features.dtype == torch.float32
        return config.kwargs["BLOCK_C"] >= 64 or idle

    return [c for c in kept if wanted(c)] or kept


# Tuned once per channel count, masks, kernel size, precision and size class (about a factor
# of four in positions): not per image size, so coarse-to-fine scales and the layers of one
# image reuse each other's choice. (The dtypes of the pointer arguments are part of every key.)
TUNING_KEY = ["C", "J", "K", "R", "INPUT_PRECISION", "size_class"]
FWD_TUNING_KEY = [*TUNING_KEY, "NUM_MASKS"]
if INTERPRETING:
    _fwd_kernel, _bwd_kernel = _masked_gram_fwd_kernel, _masked_gram_bwd_kernel
else:
    _fwd_kernel = triton.autotune(
        FWD_CONFIGS, key=FWD_TUNING_KEY, prune_configs_by=dict(early_config_prune=_forward_prune)
    )(_masked_gram_fwd_kernel)
    _bwd_kernel = triton.autotune(
        BWD_CONFIGS, key=TUNING_KEY, prune_configs_by=dict(early_config_prune=_fits)
    )(_masked_gram_bwd_kernel)


def tuned_configs() -> dict[str, str]:
    """The config each autotuned kernel launched last (the bench's logs), by direction."""
    tuned = {"forward": _fwd_kernel, "backward": _bwd_kernel}
    return {name: str(getattr(kernel, "best_config", None)) for name, kernel in tuned.items()}


def masks_per_program(K: int) -> int:
    """The largest divisor of K up to four: every chunk of masks is full, so no kernel needs
    a "mask k exists" test, and at most four (C, C) accumulators live in registers."""
    return max(d for d in range(1, MASKS_PER_PROGRAM + 1) if K % d == 0)


def size_class(N: int) -> int:
    """A coarse bucket of the positions for the tuning key: N within a factor of four."""
    return max(N, 1).bit_length() // 2


class Problem(NamedTuple):
    """What the launchers size programs and scratch from: the features' shape, how many mask
    sets (1: shared by the batch), the input dtype, J kernels of R x R and K masks."""

    shape: tuple[int, int, int, int]  # B, C, H, W
    mask_batch: int
    dtype: torch.dtype
    J: int
    K: int
    R: int

    @classmethod
    def of(cls, features: Tensor, masks: Tensor, kernels: Tensor) -> Problem:
        J, R = kernels.shape[:2]
        return cls(tuple(features.shape), masks.shape[0], features.dtype, J, masks.shape[1], R)


def _as_launch_config(config: triton.Config) -> dict:
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _launch_choice(tuned, raw, config, interpreter_config, untuned):
    """The autotuned kernel on a GPU; the raw kernel with a fixed config when one is given
    (tests of tiling variants), under the interpreter (one small config keeps tests fast), or
    with ``CAST_TRITON_AUTOTUNE=0`` (``untuned()``'s config: no tuning runs, one compile per
    shape class; the GPU tests use it)."""
    if config is not None:
        return raw, config
    if INTERPRETING:
        return raw, interpreter_config
    if not AUTOTUNE:
        return raw, untuned()
    return tuned, {}


def inputs_outputs_bytes(problem: Problem) -> int:
    """What one forward + backward reads and writes, as ``bench/bench_masked_gram.py`` counts
    it: F, the masks, the kernels and dG in, G and dF out."""
    (B, C, H, W), dtype, J, K, R = problem.shape, problem.dtype, problem.J, problem.K, problem.R
    gram_bytes = B * J * K * C * C * gram_dtype(dtype).itemsize
    inputs = (2 * B * C + problem.mask_batch * K) * H * W + J * R * R
    return inputs * dtype.itemsize + 2 * gram_bytes


def default_forward_config(C: int, num_masks: int, R: int) -> dict:
    """The forward's config without tuning: the first that fits."""
    return _as_launch_config(_fits(FWD_CONFIGS, dict(C=C), NUM_MASKS=num_masks, R=R)[0])


def forward_programs(problem: Problem, block_c: int, splits: int = 1) -> int:
    """The forward's programs: batch item x kernel x chunk of masks x upper-triangle pair of
    channel blocks x split of the rows."""
    (B, C, _, _), J, K = problem.shape, problem.J, problem.K
    blocks = channel_blocks(C, block_c)
    return B * J * (K // masks_per_program(K)) * blocks * (blocks + 1) // 2 * splits


def split_rows(problem: Problem, launch_config: dict, fill: int, splits: int | None = None) -> int:
    """The rows of each split of the forward (a multiple of the tiles' rows): as many splits
    as give ``fill`` programs, their partial Grams within the scratch budget (or ``splits``
    of them)."""
    (B, C, H, _), J, K = problem.shape, problem.J, problem.K
    quantum = launch_config.get("TILE_H", SPLIT_QUANTUM)
    if splits is None:
        programs = forward_programs(problem, launch_config.get("BLOCK_C", 64))
        gram_bytes = B * J * K * C * C * gram_dtype(problem.dtype).itemsize
        # R = 1: the kernels' few bytes are no reason to split differently
        budget = SCRATCH_FRACTION * inputs_outputs_bytes(problem._replace(R=1))
        wanted = triton.cdiv(fill, programs)
        # G holds split 0's Gram, so the budget holds the other splits'
        splits = min(wanted, 1 + int(budget // gram_bytes), triton.cdiv(H, quantum), 65535)
    return triton.cdiv(triton.cdiv(H, splits), quantum) * quantum


def forward_scratch_bytes(problem: Problem, sms: int) -> int:
    """The partial Grams the autotuned forward allocates on a GPU with ``sms`` SMs."""
    (B, C, H, _), J, K = problem.shape, problem.J, problem.K
    splits = triton.cdiv(H, split_rows(problem, {}, programs_to_fill(sms)))
    return (splits - 1) * B * J * K * C * C * gram_dtype(problem.dtype).itemsize


def resident_programs(config: dict, sms: int) -> int:
    """How many backward programs run at once: one of 8 warps per SM (216-255 registers a
    thread, so its 256 threads take the SM's 64 K registers), two of 4 warps (167-243). Persistent
    programs beyond these would only queue, each holding its own scratch."""
    return sms * max(1, 8 // config["num_warps"])


def backward_items(problem: Problem, config: dict) -> int:
    """The backward's work items: batch item x tile of positions (each tile writes its inner
    positions) x block of output channels."""
    (B, C, H, W), halo = problem.shape, problem.R // 2
    inner_h, inner_w = config["TILE_H"] - 2 * halo, config["TILE_W"] - 2 * halo
    tiles = triton.cdiv(H, inner_h) * triton.cdiv(W, inner_w)
    return B * tiles * channel_blocks(C, config["BLOCK_C"])


def backward_slot(problem: Problem, config: dict) -> int:
    """One backward program's scratch, in elements of the accumulation dtype: one tile, for
    U_j and, between kernels, dF's running sum; none for 1 x 1 kernels, which shift nothing."""
    if problem.R == 1:
        return 0
    return config["TILE_H"] * config["TILE_W"] * config["BLOCK_C"]


def backward_programs(problem: Problem, config: dict, sms: int, capped: bool = True) -> int:
    """The backward's persistent programs, one scratch tile each (none at R = 1): at most as
    many as are resident and as the scratch budget (a tenth of the op's inputs and outputs) has
    tiles for, at least one; then as few as take the work items in as many rounds as that many
    would. So the busiest program has as few items as the budget allows (as with every SM's
    program launched wherever the budget does not bite) and no tile is held by a program that
    would only wait. ``capped=False``: the count without the budget (bench/gpu_probe.py times
    both)."""
    items = backward_items(problem, config)
    tiles = items
    tile_bytes = backward_slot(problem, config) * gram_dtype(problem.dtype).itemsize
    if capped and tile_bytes:
        tiles = int(SCRATCH_FRACTION * inputs_outputs_bytes(problem) // tile_bytes)
    rounds = triton.cdiv(items, max(1, min(resident_programs(config, sms), tiles)))
    return triton.cdiv(items, rounds)


def backward_rounds(problem: Problem, config: dict, sms: int, capped: bool = True) -> int:
    """The busiest backward program's items: what the op's time grows with."""
    programs = backward_programs(problem, config, sms, capped)
    return triton.cdiv(backward_items(problem, config), programs)


def default_backward_config(problem: Problem, sms: int) -> dict:
    """The backward's config without tuning: the first that fits, unless the scratch budget at
    least doubles its rounds; then the fitting config whose busiest program has the least work
    (its rounds times its tile), as smaller tiles let the budget hold more programs but write
    fewer inner positions each (8 x 8 writes 36 of 64 at r = 3, 4 at r = 7). Measured at 30c9271
    (H200, relu4_1 and relu5_1 of a 1024^2 image, r = 3, gpu-notes): this takes the faster of
    16 x 16 x 64 and 8 x 8 in seven of eight cells, 7 % off in the eighth (relu4_1 f32, J = K =
    1: 8 rounds against 7)."""
    fits = _fits(BWD_CONFIGS, dict(C=problem.shape[1]), R=problem.R)
    fitting = [_as_launch_config(c) for c in fits]
    first = fitting[0]
    budget, unbound = (backward_rounds(problem, first, sms, capped) for capped in (True, False))
    if budget < 2 * unbound:
        return first
    return min(fitting, key=lambda c: backward_rounds(problem, c, sms) * backward_slot(problem, c))


# A backward config's constexprs: what the grid's meta names (not its warps, so no two shipped
# configs share them).
TILING = ("TILE_H", "TILE_W", "BLOCK_C", "BLOCK_D")


def tiling(config: dict) -> tuple[int, ...]:
    return tuple(config[k] for k in TILING)


def backward_plan(
    problem: Problem, candidates: list[dict], sms: int, programs: int | None = None
) -> tuple[dict[tuple[int, ...], int], int]:
    """Each candidate config's programs, by ``tiling``, and the scratch in elements that holds a
    slot for each program of any of them. The autotuner calls the grid with the config it times
    (``Autotuner._bench`` runs ``fn.run(*args, **meta, **config.all_kwargs())``), so it times
    every candidate with the programs the budget gives it: the one it picks is what runs.
    ``programs``: that many (at most one per item) instead of the budget's."""
    planned = {
        tiling(c): backward_programs(problem, c, sms)
        if programs is None
        else min(programs, backward_items(problem, c))
        for c in candidates
    }
    return planned, max(planned[tiling(c)] * backward_slot(problem, c) for c in candidates)


def fitting_configs(backward: bool, C: int, num_masks: int = 1, R: int = 1) -> list[dict]:
    """The shipped configs that fit (``config_fits``), as launch configs (``config=``)."""
    configs = BWD_CONFIGS if backward else FWD_CONFIGS
    return [_as_launch_config(c) for c in configs if config_fits(c, C, num_masks, R)]


def backward_candidates() -> list[dict]:
    """The configs an autotuned backward may launch (all shipped ones: the scratch is
    allocated before the tuner picks)."""
    return [_as_launch_config(c) for c in BWD_CONFIGS]


def backward_scratch_bytes(problem: Problem, sms: int) -> int:
    """The scratch the autotuned backward allocates on a GPU with ``sms`` SMs."""
    _, elements = backward_plan(problem, backward_candidates(), sms)
    return elements * gram_dtype(problem.dtype).itemsize


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

    ``config`` (``TILE_H``, ``TILE_W``, ``BLOCK_C``, ``num_warps``) and ``splits`` (of the
    rows) override the launch layout; they change only the order of the sums.
    """
    B, C, H, W = features.shape
    K = masks.shape[1]
    J, R = kernels.shape[:2]
    N = H * W
    acc_dtype = gram_dtype(features.dtype)
    num_masks = masks_per_program(K)
    shared_masks = masks.shape[0] == 1

    gram = torch.empty((B, J, K, C, C), dtype=acc_dtype, device=features.device)
    kernel, launch_config = _launch_choice(
        _fwd_kernel,
        _masked_gram_fwd_kernel,
        config,
        INTERPRETER_FWD_CONFIG,
        functools.partial(default_forward_config, C, num_masks, R),
    )
    on_gpu = features.device.type == "cuda"
    fill = programs_to_fill(multiprocessors(features.device)) if on_gpu else 1  # interpreter: 1
    problem = Problem.of(features, masks, kernels)
    rows_per_split = split_rows(problem, launch_config, fill, splits)
    splits = triton.cdiv(H, rows_per_split)
    partials = gram.new_empty((splits - 1, *gram.shape)) if splits > 1 else gram

    def grid(meta):
        return (forward_programs(problem, meta["BLOCK_C"]), splits)

    with on_device(features):
        kernel[grid](
            features,
            masks,
            kernels,
            inv_mass,
            gram,
            partials,
            B,
            C,
            H,
            W,
            N,
            J,
            K,
            0 if shared_masks else K * N,
            0 if shared_masks else K,
            rows_per_split,
            size_class(N),
            R=R,
            NUM_MASKS=num_masks,
            WIDE_OFFSETS=wide_offsets(C, N),
            **dot_constexprs(features.dtype, allow_tf32),
            **launch_config,
        )
        if splits > 1:
            block = 1024
            _add_partials_kernel[(triton.cdiv(gram.numel(), block),)](
                gram, partials, gram.numel(), splits - 1, BLOCK=block, num_warps=4
            )
    return gram


def backward(
    grad: Tensor,
    features: Tensor,
    masks: Tensor,
    kernels: Tensor,
    inv_mass: Tensor,
    allow_tf32: bool,
    *,
    config: dict | None = None,
    programs: int | None = None,
) -> Tensor:
    """``dF (B, C, H, W)`` in the features' dtype, from ``dG`` and ``1 / n_k`` (see
    ``cast.backends``).

    ``config`` (``TILE_H``, ``TILE_W``, ``BLOCK_C``, ``BLOCK_D``, ``num_warps``) overrides the
    tiling and ``programs`` the number of (persistent) programs; they change only the order of
    the sums.
    """
    B, C, H, W = features.shape
    K = masks.shape[1]
    J, R = kernels.shape[:2]
    N = H * W
    problem = Problem.of(features, masks, kernels)
    sms = multiprocessors(features.device)
    dfeatures = torch.empty_like(features)
    kernel, launch_config = _launch_choice(
        _bwd_kernel,
        _masked_gram_bwd_kernel,
        config,
        INTERPRETER_BWD_CONFIG,
        functools.partial(default_backward_config, problem, sms),
    )
    candidates = [launch_config] if launch_config else backward_candidates()
    planned, scratch_elements = backward_plan(problem, candidates, sms, programs)
    scratch = torch.empty(
        scratch_elements, dtype=gram_dtype(features.dtype), device=features.device
    )

    def grid(meta):
        return (planned[tiling(meta)],)

    with on_device(features):
        kernel[grid](
            features,
            masks,
            kernels,
            grad,
            inv_mass,
            scratch,
            dfeatures,
            B,
            C,
            H,
            W,
            N,
            J,
            K,
            0 if masks.shape[0] == 1 else K * N,
            0 if masks.shape[0] == 1 else K,
            size_class(N),
            R=R,
            WIDE_OFFSETS=wide_offsets(C, N),
            CHANNELS_ALIGNED=C % 16 == 0,
            **dot_constexprs(features.dtype, allow_tf32),
            **launch_config,
        )
    return dfeatures
