"""Fused forward of the co-attention (docs/operators.md; design: docs/kernels.md, Forward) in one launch over all levels.

A program owns BLOCK_M query rows of one (batch, head) and walks the levels one after another;
for each level it streams the level's keys in BLOCK_N tiles with an online softmax (a running
max and denominator per row, float32 accumulators), normalises, saves the level's output and
log-sum-exp, and adds alpha_s * out_s to the mixed output.

When B * H * ceil(Nq / BLOCK_M) programs cannot fill the GPU, the keys of every level are split
over `num_splits` programs (grid axis 2); each writes its unnormalised partial state and a
second kernel merges the splits (the same log-sum-exp algebra, over splits instead of tiles).
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    LN2, LOG2E, autotune, block_d, bucket, check_args, default_num_splits, dot_precision,
    dropout_keep, dropout_seed, level_sizes, level_table, live_levels, load_gaussian, mask_arg, score_tile,
)

# Autotuning candidates on the GPU, (BLOCK_M, BLOCK_N, num_warps, num_stages). 32 x 32 is the one
# that does not spill in float32 with dropout (the autotuner's prune leaves spilling
# configurations out where another does not spill). At head dim 128 in IEEE float32 every
# candidate spills (benchmarks/results/triton_resources.csv): the least spilling one is kept until
# a GPU's timings choose smaller tiles.
FORWARD_TILES = [(64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 2),
                 (128, 64, 8, 3), (128, 128, 8, 2), (32, 32, 4, 2)]
_COMBINE_BLOCK_M = 16


@triton.jit
def _finish_level(m2, l, acc, live):
    """(out_s, lse) of one level from the base-2 running max m2 (BLOCK_M,), the softmax
    denominator l (BLOCK_M,) and the unnormalised sum acc (BLOCK_M, BLOCK_D); live (BLOCK_M,) is
    false where the level's keys are all masked, and for rows past Nq, whose results are not
    stored. There lse = +inf and out_s = acc = sum_j 0 * v_j, as the reference's product with zero
    weights: 0, or NaN where a v_j is not finite. Elsewhere out_s = acc / l, NaN where l is 0
    (every score -inf) or NaN (a NaN score), as softmax gives."""
    l = tl.where(live, l, 1.0)  # an empty level's l is not used: no 0 / 0 to compute
    out_s = tl.where(live[:, None], acc / l[:, None], acc)
    lse = tl.where(live, (m2 + tl.log2(l)) * LN2, float("inf"))
    return out_s, lse


@triton.jit
def _level_live(live_ptr, s, HAS_MASK: tl.constexpr):
    """Whether level s of this program's batch element has an unpadded key; live_ptr: (S,) uint8
    row of the batch element (live_levels)."""
    if HAS_MASK:
        return tl.load(live_ptr + s) != 0
    return True


@triton.jit
def _store_level(out, out_s, lse, idx, row_ok, offs_d, d_ok,
                 alpha_ptr,  # (Nq, S) float32 of this (batch, head); read when HAS_ALPHA
                 out_levels_ptr,  # (Nq, S, D) q dtype of this (batch, head); written when HAS_ALPHA
                 lse_ptr,  # (Nq, S) float32 of this (batch, head)
                 HEAD_DIM: tl.constexpr, HAS_ALPHA: tl.constexpr):
    """Saves level s of the rows, idx = row * S + s (BLOCK_M,), and returns the mixed output
    out + alpha_s * out_s."""
    tl.store(lse_ptr + idx, lse, mask=row_ok)
    if HAS_ALPHA:
        tl.store(out_levels_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :],
                 out_s.to(out_levels_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        a = tl.load(alpha_ptr + idx, mask=row_ok, other=0.0)
        out += a[:, None] * out_s
    else:
        out += out_s  # one level: out = out_0
    return out


@autotune(FORWARD_TILES, interpret_tile=(16, 16, 4, 1),
          key=["nq_bucket", "l_bucket", "S", "num_splits", "HEAD_DIM", "HAS_ALPHA", "HAS_MASK",
               "HAS_DROPOUT", "DOT_PRECISION"])
@triton.jit
def _forward_kernel(
    q_ptr,  # (B, H, Nq, D) q dtype
    k_ptr,  # (B, H, L, D) q dtype
    v_ptr,  # (B, H, L, D) q dtype
    centers_ptr,  # (B, H, Nq, S, 2) float32, last axis (x, y)
    precision_ptr,  # (B, H, Nq, S, 2) float32
    alpha_ptr,  # (B, H, Nq, S) float32; read when HAS_ALPHA and not SPLIT
    levels_ptr,  # (S, 3) int32 rows (start, height, width)
    mask_ptr,  # (B, L) uint8, 1 = ignore the key; read when HAS_MASK
    live_ptr,  # (B, S) uint8, 1 = the level has an unpadded key; read when HAS_MASK
    out_ptr,  # (B, H, Nq, D) q dtype; written when not SPLIT
    out_levels_ptr,  # (B, H, Nq, S, D) q dtype; written when HAS_ALPHA and not SPLIT
    lse_ptr,  # (B, H, Nq, S) float32; written when not SPLIT
    part_acc_ptr,  # (num_splits, B, H, Nq, S, D) float32 unnormalised sums; written when SPLIT
    part_max_ptr,  # (num_splits, B, H, Nq, S) float32 running max of base-2 scores; when SPLIT
    part_sum_ptr,  # (num_splits, B, H, Nq, S) float32 softmax denominators; when SPLIT
    H, Nq, L, S, num_splits,
    scale, dropout_p, seed,
    nq_bucket, l_bucket,  # autotuning key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ALPHA: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    q_ptr += bh * Nq * HEAD_DIM
    k_ptr += bh * L * HEAD_DIM
    v_ptr += bh * L * HEAD_DIM
    centers_ptr += bh * Nq * S * 2
    precision_ptr += bh * Nq * S * 2
    mask_ptr += (bh // H) * L
    live_ptr += (bh // H) * S
    if SPLIT:
        part = split * tl.num_programs(1) + bh  # (split, batch, head) slice
        part_acc_ptr += part * Nq * S * HEAD_DIM
        part_max_ptr += part * Nq * S
        part_sum_ptr += part * Nq * S
    else:
        out_ptr += bh * Nq * HEAD_DIM
        out_levels_ptr += bh * Nq * S * HEAD_DIM
        alpha_ptr += bh * Nq * S
        lse_ptr += bh * Nq * S

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qk_scale = scale * LOG2E
    if HAS_DROPOUT:
        rows = bh * Nq + offs_m  # flat query rows of (B, H, Nq), for the Philox offsets
        keep_scale = 1.0 / (1.0 - dropout_p)
    out = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for s in range(S):
        start = tl.load(levels_ptr + 3 * s)
        width = tl.load(levels_ptr + 3 * s + 2)
        n = tl.load(levels_ptr + 3 * s + 1) * width
        idx = offs_m * S + s
        cx, cy, px, py = load_gaussian(centers_ptr, precision_ptr, idx, row_ok)
        # This split's share of the level: a run of whole key tiles (possibly none).
        tiles_per_split = tl.cdiv(tl.cdiv(n, BLOCK_N), num_splits)
        lo = split * tiles_per_split * BLOCK_N
        hi = tl.minimum(lo + tiles_per_split * BLOCK_N, n)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for j0 in range(lo, hi, BLOCK_N):
            local = j0 + tl.arange(0, BLOCK_N)  # key index within the level
            k, v, keys, key_ok, dx, dy, scores = score_tile(
                q, k_ptr, v_ptr, mask_ptr, start, local, hi, width, offs_d, d_ok, cx, cy, px, py, qk_scale,
                HEAD_DIM, HAS_MASK, DOT_PRECISION)

            m_new = tl.maximum(m_i, tl.max(scores, 1))
            # While a row has seen only masked keys its max is -inf; exp2 against 0 keeps it NaN-free.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(scores - m_safe[:, None])
            correction = tl.exp2(m_i - m_safe)
            l_i = l_i * correction + tl.sum(p, 1)  # statistics of the undropped weights
            if HAS_DROPOUT:
                keep = dropout_keep(seed, rows[:, None], keys[None, :], L, dropout_p)
                p = tl.where(keep, p * keep_scale, 0.0)
            acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        if SPLIT:
            tl.store(part_max_ptr + idx, m_i, mask=row_ok)
            tl.store(part_sum_ptr + idx, l_i, mask=row_ok)
            tl.store(part_acc_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], acc,
                     mask=row_ok[:, None] & d_ok[None, :])
        else:
            out_s, lse = _finish_level(m_i, l_i, acc, _level_live(live_ptr, s, HAS_MASK) & row_ok)
            out = _store_level(out, out_s, lse, idx, row_ok, offs_d, d_ok, alpha_ptr,
                               out_levels_ptr, lse_ptr, HEAD_DIM, HAS_ALPHA)

    if not SPLIT:
        tl.store(out_ptr + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(
    part_acc_ptr,  # (num_splits, B, H, Nq, S, D) float32
    part_max_ptr,  # (num_splits, B, H, Nq, S) float32, base 2
    part_sum_ptr,  # (num_splits, B, H, Nq, S) float32
    alpha_ptr,  # (B, H, Nq, S) float32; read when HAS_ALPHA
    live_ptr,  # (B, S) uint8, 1 = the level has an unpadded key; read when HAS_MASK
    out_ptr,  # (B, H, Nq, D) q dtype
    out_levels_ptr,  # (B, H, Nq, S, D) q dtype; written when HAS_ALPHA
    lse_ptr,  # (B, H, Nq, S) float32
    H, Nq, S, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ALPHA: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    live_ptr += (bh // H) * S
    out_ptr += bh * Nq * HEAD_DIM
    out_levels_ptr += bh * Nq * S * HEAD_DIM
    alpha_ptr += bh * Nq * S
    lse_ptr += bh * Nq * S
    part_acc_ptr += bh * Nq * S * HEAD_DIM
    part_max_ptr += bh * Nq * S
    part_sum_ptr += bh * Nq * S
    split_stride = tl.num_programs(1).to(tl.int64) * Nq * S  # one split's (B, H, Nq, S)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    d_ok = offs_d < HEAD_DIM
    out = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(S):
        idx = offs_m * S + s
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for split in range(num_splits):
            m = tl.maximum(m, tl.load(part_max_ptr + split * split_stride + idx, mask=row_ok,
                                      other=float("-inf")))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for split in range(num_splits):  # a split with m = -inf: weight 0 (times its NaN, if any)
            weight = tl.exp2(tl.load(part_max_ptr + split * split_stride + idx, mask=row_ok,
                                     other=float("-inf")) - m_safe)
            l += weight * tl.load(part_sum_ptr + split * split_stride + idx, mask=row_ok, other=0.0)
            acc_ptrs = part_acc_ptr + split * split_stride * HEAD_DIM + idx[:, None] * HEAD_DIM
            acc += weight[:, None] * tl.load(acc_ptrs + offs_d[None, :],
                                             mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        out_s, lse = _finish_level(m, l, acc, _level_live(live_ptr, s, HAS_MASK) & row_ok)
        out = _store_level(out, out_s, lse, idx, row_ok, offs_d, d_ok, alpha_ptr,
                           out_levels_ptr, lse_ptr, HEAD_DIM, HAS_ALPHA)
    tl.store(out_ptr + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def coattention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centers: torch.Tensor,
    precision: torch.Tensor,
    alpha: Optional[torch.Tensor],
    spatial_shapes: List[int],
    key_padding_mask: Optional[torch.Tensor],
    scale: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    *,
    num_splits: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The device kernel _coattention_forward: returns (out, out_levels, lse).

    q (B, H, Nq, D); k, v (B, H, L, D) float32/float16/bfloat16; centers, precision
    (B, H, Nq, S, 2) float32; alpha (B, H, Nq, S) float32 or None (S == 1); spatial_shapes
    [H0, W0, H1, W1, ...]; key_padding_mask (B, L) bool, True = ignore; seed the dropout's
    Philox key, a one-element int64 CPU tensor (None without dropout).
    out (B, H, Nq, D) q dtype; out_levels (B, H, Nq, S, D) q dtype, empty when alpha is None;
    lse (B, H, Nq, S) float32, +inf where all of a level's keys are masked.
    num_splits: programs sharing the keys of a query tile; None picks it from the GPU's size.
    """
    S = check_args(q, k, v, centers, precision, alpha, spatial_shapes, key_padding_mask, dropout_p)
    seed = dropout_seed(seed, dropout_p)
    q, k, v, centers, precision = (t.contiguous() for t in (q, k, v, centers, precision))
    alpha = None if alpha is None else alpha.contiguous()
    B, H, Nq, D = q.shape
    L = k.shape[2]
    out = torch.empty_like(q)
    out_levels = q.new_empty((B, H, Nq, S, D) if alpha is not None else (0,))
    lse = torch.empty((B, H, Nq, S), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, out_levels, lse

    if num_splits is None:
        num_splits = default_num_splits(B * H, Nq, max(level_sizes(spatial_shapes)), q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits: expected >= 1, got {num_splits}")
    split = num_splits > 1
    if split:
        part_acc = torch.empty((num_splits, B, H, Nq, S, D), dtype=torch.float32, device=q.device)
        part_max = torch.empty((num_splits, B, H, Nq, S), dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:  # unused pointers
        part_acc = part_max = part_sum = lse
    alpha_arg = centers if alpha is None else alpha  # unused pointer without alpha
    out_levels_arg = out if alpha is None else out_levels
    levels = level_table(spatial_shapes, q.device)
    mask = mask_arg(key_padding_mask, levels)
    live = live_levels(key_padding_mask, levels)

    def grid(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B * H, num_splits)

    _forward_kernel[grid](
        q, k, v, centers, precision, alpha_arg, levels, mask, live,
        out, out_levels_arg, lse, part_acc, part_max, part_sum,
        H, Nq, L, S, num_splits,
        scale, dropout_p, seed,
        bucket(Nq), bucket(L),
        HEAD_DIM=D, BLOCK_D=block_d(D),
        HAS_ALPHA=alpha is not None, HAS_MASK=key_padding_mask is not None,
        HAS_DROPOUT=dropout_p > 0.0, SPLIT=split, DOT_PRECISION=dot_precision(q.dtype),
    )
    if split:
        _combine_kernel[(triton.cdiv(Nq, _COMBINE_BLOCK_M), B * H)](
            part_acc, part_max, part_sum, alpha_arg, live, out, out_levels_arg, lse,
            H, Nq, S, num_splits,
            HEAD_DIM=D, BLOCK_D=block_d(D), HAS_ALPHA=alpha is not None,
            HAS_MASK=key_padding_mask is not None, BLOCK_M=_COMBINE_BLOCK_M,
        )
    return out, out_levels, lse
