"""Fused backward of the co-attention, flash style, in three launches and without atomics.

With W_is = alpha_is P_is (alpha = 1 without alpha), dropout factor Z = keep / (1 - p) and
dot_is = <grad_out_i, out_is> (per level s):
    dalpha_is = dot_is
    dS        = W * (Z (grad_out V^T) - dot_is)      (= P * (dP - Delta) of the contract)
    dq = scale dS k,  dk = scale dS^T q,  dv = (Z W)^T grad_out
    dcx_i = 2 px_i^2 sum_j dS_ij (x_j - cx_i),  dpx_i = -2 px_i sum_j dS_ij (x_j - cx_i)^2 (and y)
A row of dS sums to zero, but dot comes from the rounded output, so the computed rows sum to
e = sum_j dS_ij and carry an extra e P_ij, which the factors (x_j - cx_i)^2 (the map size squared,
more for a centre outside it) would amplify. As in the C++ CPU kernel (csrc/cpu/tile_ops.h), it is
taken out: sum_j dS_ij w_j -> sum_j dS_ij w_j - e sum_j P_ij w_j.

1. _preprocess_kernel: dot (B, H, Nq, S) from grad_out and the saved per-level outputs.
2. _dkdv_kernel: a program per key tile (tiles never straddle levels) loops over all queries.
3. _dq_kernel: a program per query tile loops over the levels and their keys and also sums, per
   row and level, the MOMENTS that give dcenters / dprecision. Its key axis is split like the
   forward's; each split writes float32 partial sums that are added afterwards (a fixed order:
   deterministic), then centre_precision_grads applies the correction above.
P is recomputed from the saved lse; lse = +inf (all keys of the level masked) gives P = 0 and so
zero gradients. At a padded key dS = 0 whatever dP (a non-finite v there must not reach dq, dk),
while P is exp2(-inf - lse): 0, but NaN in a row whose lse is not finite, as the reference gives.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E, autotune, block_d, bucket, check_args, default_num_splits, dot_precision, dropout_keep,
    dropout_seed, level_sizes, level_table, load_gaussian, log_prior, mask_arg, score_tile, valid_keys,
)

# Autotuning candidates on the GPU, (BLOCK_M, BLOCK_N, num_warps, num_stages).
DKDV_TILES = [(32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2),
              (16, 64, 4, 3)]
# The 8-warp small tiles are those that do not spill in float32 with dropout (the autotuner's
# prune leaves spilling configurations out where another does not spill). At head dim 128 every
# float32 (IEEE and TF32) dK/dV and dQ candidate spills (benchmarks/results/triton_resources.csv):
# the least spilling one is kept until a GPU's timings choose smaller tiles.
DQ_TILES = [(64, 32, 4, 2), (64, 64, 4, 2), (32, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 8, 2),
            (32, 64, 8, 2)]
_PREPROCESS_BLOCK_R = 64
# The per-row, per-level sums of the dq pass, in the order of csrc/cpu/tile_ops.h's Moment:
# sum_j dS_j w_j and sum_j P_j w_j for w = dx, dx^2, dy, dy^2, and sum_j dS_j.
MOMENTS = ("ds_dx", "ds_dx2", "ds_dy", "ds_dy2", "ds", "p_dx", "p_dx2", "p_dy", "p_dy2")
NUM_MOMENTS = tl.constexpr(len(MOMENTS))  # globals read inside kernels must be constexpr


@triton.jit
def _preprocess_kernel(
    grad_out_ptr,  # (B, H, Nq, D) q dtype
    out_levels_ptr,  # (B, H, Nq, S, D) q dtype
    dot_ptr,  # (B, H, Nq, S) float32: <grad_out_i, out_is>
    num_rows, S,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = (rows < num_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    grad_out = tl.load(grad_out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=tile_mask,
                       other=0.0).to(tl.float32)
    for s in range(S):
        idx = rows * S + s
        out_s = tl.load(out_levels_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], mask=tile_mask,
                        other=0.0).to(tl.float32)
        tl.store(dot_ptr + idx, tl.sum(grad_out * out_s, 1), mask=rows < num_rows)


@autotune(DKDV_TILES, interpret_tile=(16, 16, 4, 1),
          key=["nq_bucket", "l_bucket", "HEAD_DIM", "HAS_ALPHA", "HAS_MASK", "HAS_DROPOUT",
               "DOT_PRECISION"])
@triton.jit
def _dkdv_kernel(
    q_ptr,  # (B, H, Nq, D) q dtype
    k_ptr,  # (B, H, L, D) q dtype
    v_ptr,  # (B, H, L, D) q dtype
    grad_out_ptr,  # (B, H, Nq, D) q dtype
    centers_ptr,  # (B, H, Nq, S, 2) float32, last axis (x, y)
    precision_ptr,  # (B, H, Nq, S, 2) float32
    alpha_ptr,  # (B, H, Nq, S) float32; read when HAS_ALPHA
    levels_ptr,  # (S, 3) int32 rows (start, height, width)
    mask_ptr,  # (B, L) uint8, 1 = ignore the key; read when HAS_MASK
    lse_ptr,  # (B, H, Nq, S) float32, natural log, +inf for fully masked levels
    dot_ptr,  # (B, H, Nq, S) float32 from _preprocess_kernel
    grad_k_ptr,  # (B, H, L, D) q dtype
    grad_v_ptr,  # (B, H, L, D) q dtype
    H, Nq, L, S,
    scale, dropout_p, seed,
    nq_bucket, l_bucket,  # autotuning key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ALPHA: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tile = tl.program_id(0)  # key tiles numbered level after level
    bh = tl.program_id(1).to(tl.int64)
    q_ptr += bh * Nq * HEAD_DIM
    grad_out_ptr += bh * Nq * HEAD_DIM
    k_ptr += bh * L * HEAD_DIM
    v_ptr += bh * L * HEAD_DIM
    grad_k_ptr += bh * L * HEAD_DIM
    grad_v_ptr += bh * L * HEAD_DIM
    centers_ptr += bh * Nq * S * 2
    precision_ptr += bh * Nq * S * 2
    alpha_ptr += bh * Nq * S
    lse_ptr += bh * Nq * S
    dot_ptr += bh * Nq * S
    mask_ptr += (bh // H) * L

    # The level of this tile: the last level whose first tile is at or before it.
    level = tile * 0
    local_tile = tile
    tiles_before = tile * 0
    for s in range(S):
        if tile >= tiles_before:
            level = s
            local_tile = tile - tiles_before
        n_s = tl.load(levels_ptr + 3 * s + 1) * tl.load(levels_ptr + 3 * s + 2)
        tiles_before += tl.cdiv(n_s, BLOCK_N)
    start = tl.load(levels_ptr + 3 * level)
    width = tl.load(levels_ptr + 3 * level + 2)
    n = tl.load(levels_ptr + 3 * level + 1) * width

    local = local_tile * BLOCK_N + tl.arange(0, BLOCK_N)  # key index within the level
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    key_ok = local < n
    keys = start + local
    kv_offs = keys[:, None] * HEAD_DIM + offs_d[None, :]
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
    x = (local % width).to(tl.float32)
    y = (local // width).to(tl.float32)
    key_ok = valid_keys(mask_ptr, keys, key_ok, HAS_MASK)
    qk_scale = scale * LOG2E
    if HAS_DROPOUT:
        keep_scale = 1.0 / (1.0 - dropout_p)

    # Tiles are transposed, (keys, queries), so that dk and dv come out of plain dots.
    grad_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i0 in range(0, Nq, BLOCK_M):
        offs_m = i0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Nq
        q_offs = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)
        grad_out = tl.load(grad_out_ptr + q_offs, mask=q_mask, other=0.0)
        idx = offs_m * S + level
        # Rows past Nq get lse = +inf, hence P = 0.
        lse2 = tl.load(lse_ptr + idx, mask=row_ok, other=float("inf")) * LOG2E
        dot = tl.load(dot_ptr + idx, mask=row_ok, other=0.0)
        cx, cy, px, py = load_gaussian(centers_ptr, precision_ptr, idx, row_ok)

        scores_t = (tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
                    + log_prior(x[:, None] - cx[None, :], y[:, None] - cy[None, :],
                                px[None, :], py[None, :]) * LOG2E)
        scores_t = tl.where(key_ok[:, None], scores_t, float("-inf"))
        w_t = tl.exp2(scores_t - lse2[None, :])  # P^T
        if HAS_ALPHA:
            w_t *= tl.load(alpha_ptr + idx, mask=row_ok, other=0.0)[None, :]
        dw_t = tl.dot(v, tl.trans(grad_out), input_precision=DOT_PRECISION)  # (grad_out V^T)^T
        if HAS_DROPOUT:
            keep = dropout_keep(seed, (bh * Nq + offs_m)[None, :], keys[:, None], L, dropout_p)
            dw_t = tl.where(keep, dw_t * keep_scale, 0.0)
            dropped_w_t = tl.where(keep, w_t * keep_scale, 0.0)
        else:
            dropped_w_t = w_t
        grad_v += tl.dot(dropped_w_t.to(grad_out.dtype), grad_out, input_precision=DOT_PRECISION)
        # dS = 0 at a padded key, as the reference's masked_fill passes back, even where its v
        # (and so dP) is not finite.
        ds_t = tl.where(key_ok[:, None], w_t * (dw_t - dot[None, :]), 0.0)
        grad_k += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    tl.store(grad_k_ptr + kv_offs, (grad_k * scale).to(grad_k_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(grad_v_ptr + kv_offs, grad_v.to(grad_v_ptr.dtype.element_ty), mask=kv_mask)


@autotune(DQ_TILES, interpret_tile=(16, 16, 4, 1),
          key=["nq_bucket", "l_bucket", "S", "num_splits", "HEAD_DIM", "HAS_ALPHA", "HAS_MASK",
               "HAS_DROPOUT", "DOT_PRECISION"])
@triton.jit
def _dq_kernel(
    q_ptr,  # (B, H, Nq, D) q dtype
    k_ptr,  # (B, H, L, D) q dtype
    v_ptr,  # (B, H, L, D) q dtype
    grad_out_ptr,  # (B, H, Nq, D) q dtype
    centers_ptr,  # (B, H, Nq, S, 2) float32, last axis (x, y)
    precision_ptr,  # (B, H, Nq, S, 2) float32
    alpha_ptr,  # (B, H, Nq, S) float32; read when HAS_ALPHA
    levels_ptr,  # (S, 3) int32 rows (start, height, width)
    mask_ptr,  # (B, L) uint8, 1 = ignore the key; read when HAS_MASK
    lse_ptr,  # (B, H, Nq, S) float32, natural log, +inf for fully masked levels
    dot_ptr,  # (B, H, Nq, S) float32 from _preprocess_kernel
    grad_q_ptr,  # (num_splits, B, H, Nq, D): q dtype if num_splits == 1, else float32 partials
    moments_ptr,  # (num_splits, B, H, Nq, S, NUM_MOMENTS) float32 MOMENTS (partials if num_splits > 1)
    H, Nq, L, S, num_splits,
    scale, dropout_p, seed,
    nq_bucket, l_bucket,  # autotuning key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_ALPHA: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    q_ptr += bh * Nq * HEAD_DIM
    grad_out_ptr += bh * Nq * HEAD_DIM
    k_ptr += bh * L * HEAD_DIM
    v_ptr += bh * L * HEAD_DIM
    centers_ptr += bh * Nq * S * 2
    precision_ptr += bh * Nq * S * 2
    alpha_ptr += bh * Nq * S
    lse_ptr += bh * Nq * S
    dot_ptr += bh * Nq * S
    mask_ptr += (bh // H) * L
    part = split * tl.num_programs(1) + bh  # this split's (batch, head) slice of the outputs
    grad_q_ptr += part * Nq * HEAD_DIM
    moments_ptr += part * Nq * S * NUM_MOMENTS

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    d_ok = offs_d < HEAD_DIM
    q_offs = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)
    grad_out = tl.load(grad_out_ptr + q_offs, mask=q_mask, other=0.0)
    qk_scale = scale * LOG2E
    if HAS_DROPOUT:
        rows = bh * Nq + offs_m  # flat query rows of (B, H, Nq), for the Philox offsets
        keep_scale = 1.0 / (1.0 - dropout_p)

    grad_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(S):
        start = tl.load(levels_ptr + 3 * s)
        width = tl.load(levels_ptr + 3 * s + 2)
        n = tl.load(levels_ptr + 3 * s + 1) * width
        idx = offs_m * S + s
        lse2 = tl.load(lse_ptr + idx, mask=row_ok, other=float("inf")) * LOG2E
        dot = tl.load(dot_ptr + idx, mask=row_ok, other=0.0)
        cx, cy, px, py = load_gaussian(centers_ptr, precision_ptr, idx, row_ok)
        if HAS_ALPHA:
            a = tl.load(alpha_ptr + idx, mask=row_ok, other=0.0)
        tiles_per_split = tl.cdiv(tl.cdiv(n, BLOCK_N), num_splits)
        lo = split * tiles_per_split * BLOCK_N
        hi = tl.minimum(lo + tiles_per_split * BLOCK_N, n)

        # Row sums of dS w and P w for w = x - cx, (x - cx)^2 and the same in y, and of dS.
        ds_dx_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        ds_dx2_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        ds_dy_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        ds_dy2_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        ds_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        p_dx_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        p_dx2_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        p_dy_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        p_dy2_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for j0 in range(lo, hi, BLOCK_N):
            local = j0 + tl.arange(0, BLOCK_N)
            k, v, keys, key_ok, dx, dy, scores = score_tile(
                q, k_ptr, v_ptr, mask_ptr, start, local, hi, width, offs_d, d_ok, cx, cy, px, py, qk_scale,
                HEAD_DIM, HAS_MASK, DOT_PRECISION)
            p = tl.exp2(scores - lse2[:, None])  # P
            w = p
            if HAS_ALPHA:
                w = p * a[:, None]
            dw = tl.dot(grad_out, tl.trans(v), input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                keep = dropout_keep(seed, rows[:, None], keys[None, :], L, dropout_p)
                dw = tl.where(keep, dw * keep_scale, 0.0)
            ds = tl.where(key_ok[None, :], w * (dw - dot[:, None]), 0.0)  # 0 at a padded key
            grad_q += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
            ds_dx = ds * dx
            ds_dy = ds * dy
            p_dx = p * dx
            p_dy = p * dy
            ds_dx_sum += tl.sum(ds_dx, 1)
            ds_dx2_sum += tl.sum(ds_dx * dx, 1)
            ds_dy_sum += tl.sum(ds_dy, 1)
            ds_dy2_sum += tl.sum(ds_dy * dy, 1)
            ds_sum += tl.sum(ds, 1)
            p_dx_sum += tl.sum(p_dx, 1)
            p_dx2_sum += tl.sum(p_dx * dx, 1)
            p_dy_sum += tl.sum(p_dy, 1)
            p_dy2_sum += tl.sum(p_dy * dy, 1)

        row_moments = moments_ptr + NUM_MOMENTS * idx  # in the order of MOMENTS
        tl.store(row_moments, ds_dx_sum, mask=row_ok)
        tl.store(row_moments + 1, ds_dx2_sum, mask=row_ok)
        tl.store(row_moments + 2, ds_dy_sum, mask=row_ok)
        tl.store(row_moments + 3, ds_dy2_sum, mask=row_ok)
        tl.store(row_moments + 4, ds_sum, mask=row_ok)
        tl.store(row_moments + 5, p_dx_sum, mask=row_ok)
        tl.store(row_moments + 6, p_dx2_sum, mask=row_ok)
        tl.store(row_moments + 7, p_dy_sum, mask=row_ok)
        tl.store(row_moments + 8, p_dy2_sum, mask=row_ok)

    tl.store(grad_q_ptr + q_offs, (grad_q * scale).to(grad_q_ptr.dtype.element_ty), mask=q_mask)


def centre_precision_grads(moments: torch.Tensor, precision: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_centers, grad_precision), each (B, H, Nq, S, 2), from the row moments (B, H, Nq, S, NUM_MOMENTS)
    of the dq pass (MOMENTS) and precision (B, H, Nq, S, 2), with the correction of the module
    docstring: sum dS w - e sum P w, e = sum dS."""
    ds_w = moments[..., :4] - moments[..., 4:5] * moments[..., 5:]  # w = dx, dx^2, dy, dy^2
    px, py = precision.unbind(-1)
    grad_centers = torch.stack((2 * px * px * ds_w[..., 0], 2 * py * py * ds_w[..., 2]), dim=-1)
    grad_precision = torch.stack((-2 * px * ds_w[..., 1], -2 * py * ds_w[..., 3]), dim=-1)
    return grad_centers, grad_precision


def coattention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centers: torch.Tensor,
    precision: torch.Tensor,
    alpha: Optional[torch.Tensor],
    out_levels: torch.Tensor,
    lse: torch.Tensor,
    spatial_shapes: List[int],
    key_padding_mask: Optional[torch.Tensor],
    scale: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    *,
    num_splits: Optional[int] = None,
) -> Tuple[torch.Tensor, ...]:
    """The device kernel _coattention_backward:
    returns (grad_q, grad_k, grad_v, grad_centers, grad_precision, grad_alpha).

    grad_out (B, H, Nq, D) q dtype; out_levels (B, H, Nq, S, D) the saved per-level outputs
    (out.unsqueeze(3) when alpha is None); lse (B, H, Nq, S) float32 from the forward; the other
    arguments as in coattention_forward. grad_alpha (B, H, Nq, S) float32, empty when alpha is
    None. num_splits: programs sharing the keys of a query tile in the dq pass; None picks it
    from the GPU's size.
    """
    S = check_args(q, k, v, centers, precision, alpha, spatial_shapes, key_padding_mask, dropout_p)
    seed = dropout_seed(seed, dropout_p)
    B, H, Nq, D = q.shape
    for name, t, shape, dtype in (("grad_out", grad_out, (B, H, Nq, D), q.dtype),
                                  ("out_levels", out_levels, (B, H, Nq, S, D), q.dtype),
                                  ("lse", lse, (B, H, Nq, S), torch.float32)):
        if t.shape != shape or t.dtype != dtype or t.device != q.device:
            raise ValueError(f"{name}: expected shape {shape}, dtype {dtype}, device {q.device}; "
                               f"got {tuple(t.shape)}, {t.dtype}, {t.device}")
    grad_out, q, k, v, centers, precision, out_levels, lse = (
        t.contiguous() for t in (grad_out, q, k, v, centers, precision, out_levels, lse))
    alpha = None if alpha is None else alpha.contiguous()
    L = k.shape[2]
    device = q.device
    if grad_out.numel() == 0:  # no query rows: nothing flows to the keys
        grad_alpha = torch.zeros_like(lse) if alpha is not None else centers.new_empty(0)
        return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                torch.zeros_like(centers), torch.zeros_like(precision), grad_alpha)

    if num_splits is None:
        num_splits = default_num_splits(B * H, Nq, max(level_sizes(spatial_shapes)), device)
    if num_splits < 1:
        raise ValueError(f"num_splits: expected >= 1, got {num_splits}")
    dot = torch.empty((B, H, Nq, S), dtype=torch.float32, device=device)
    _preprocess_kernel[(triton.cdiv(B * H * Nq, _PREPROCESS_BLOCK_R),)](
        grad_out, out_levels, dot, B * H * Nq, S,
        HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_R=_PREPROCESS_BLOCK_R,
    )

    levels = level_table(spatial_shapes, device)
    mask = mask_arg(key_padding_mask, levels)
    alpha_arg = centers if alpha is None else alpha  # unused pointer without alpha
    flags = dict(
        HEAD_DIM=D, BLOCK_D=block_d(D), HAS_ALPHA=alpha is not None,
        HAS_MASK=key_padding_mask is not None, HAS_DROPOUT=dropout_p > 0.0,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    sizes = level_sizes(spatial_shapes)

    grad_k = torch.empty_like(k)
    grad_v = torch.empty_like(v)

    def dkdv_grid(meta):
        return (sum(triton.cdiv(n, meta["BLOCK_N"]) for n in sizes), B * H)

    _dkdv_kernel[dkdv_grid](
        q, k, v, grad_out, centers, precision, alpha_arg, levels, mask, lse, dot,
        grad_k, grad_v,
        H, Nq, L, S, scale, dropout_p, seed, bucket(Nq), bucket(L),
        **flags,
    )

    if num_splits == 1:
        grad_q = torch.empty_like(q)
    else:
        grad_q = torch.empty((num_splits, *q.shape), dtype=torch.float32, device=device)
    moments = torch.empty((num_splits, B, H, Nq, S, NUM_MOMENTS), dtype=torch.float32, device=device)

    def dq_grid(meta):
        return (triton.cdiv(Nq, meta["BLOCK_M"]), B * H, num_splits)

    _dq_kernel[dq_grid](
        q, k, v, grad_out, centers, precision, alpha_arg, levels, mask, lse, dot,
        grad_q, moments,
        H, Nq, L, S, num_splits, scale, dropout_p, seed, bucket(Nq), bucket(L),
        **flags,
    )
    if num_splits > 1:
        grad_q = grad_q.sum(0).to(q.dtype)
    grad_centers, grad_precision = centre_precision_grads(moments.sum(0), precision)

    grad_alpha = dot if alpha is not None else centers.new_empty(0)
    return grad_q, grad_k, grad_v, grad_centers, grad_precision, grad_alpha
