"""Pure-PyTorch co-attention: the single source of truth that kernels, tests and benchmarks use.

It materialises the (B, H, Nq, L) scores and the Gaussian log-prior, so it is slow and
memory-hungry, but plainly correct, differentiable by autograd and usable in float64.
The math: docs/operators.md.

Shapes:
    q (B, H, Nq, D); k, v (B, H, L, D); key_padding_mask (B, L) bool, True = ignore.
    Gaussian:        centers, precision (B, H, Nq, 2), last axis (x, y); one map (Hf, Wf).
    Scale-selective: centers, precision (B, H, Nq, S, 2); alpha (B, H, Nq, S); levels
                     spatial_shapes [(Hf_0, Wf_0), ...] concatenated along L.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gaussian_coattention",
    "scale_selective_coattention",
    "gaussian_log_prior",
    "attention_weights",
]


def gaussian_log_prior(centers: Tensor, precision: Tensor, spatial_shape: Tuple[int, int]) -> Tensor:
    """logG_ij = -((px_i (x_j - cx_i))^2 + (py_i (y_j - cy_i))^2) on an (Hf, Wf) grid.

    centers, precision (..., Nq, 2) -> (..., Nq, Hf * Wf); key j sits at cell
    (x_j, y_j) = (j % Wf, j // Wf).
    """
    height, width = spatial_shape
    ys, xs = torch.meshgrid(
        torch.arange(height, device=centers.device, dtype=centers.dtype),
        torch.arange(width, device=centers.device, dtype=centers.dtype),
        indexing="ij",
    )
    dx = xs.reshape(-1) - centers[..., 0:1]
    dy = ys.reshape(-1) - centers[..., 1:2]
    return -((precision[..., 0:1] * dx) ** 2 + (precision[..., 1:2] * dy) ** 2)


def _level_softmax(scores: Tensor, masked: Optional[Tensor]) -> Tensor:
    """Softmax over the last axis that returns zeros (and zero gradients) where every key is masked.

    scores (B, H, Nq, n); masked (B, n) bool or None.
    """
    if masked is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(masked[:, None, None, :], float("-inf"))
    empty = masked.all(dim=-1)[:, None, None, None]  # (B, 1, 1, 1)
    # A finite row keeps softmax and its gradient free of NaN; the row is zeroed after.
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1)
    return probs.masked_fill(empty, 0.0)


def attention_weights(
    q: Tensor,
    k: Tensor,
    centers: Tensor,
    precision: Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    key_padding_mask: Optional[Tensor] = None,
    alpha: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """The (B, H, Nq, L) weights W with out = W v (before dropout).

    One level without alpha: W = softmax(scale q k^T + logG). Several levels: level s gets
    alpha_s * softmax over its own keys. centers, precision (B, H, Nq, S, 2); alpha (B, H, Nq, S).
    Scores are computed in q's dtype, the prior in the coordinates' dtype. q and k are each
    scaled by sqrt(scale) before their product (as SDPA's math path does), so that in 16 bits a
    q k^T that overflows while scale q k^T fits gives finite scores.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    root = scale**0.5
    scores = torch.matmul(q * root, (k * root).transpose(-1, -2))
    weights, start = [], 0
    for level, (height, width) in enumerate(spatial_shapes):
        end = start + height * width
        prior = gaussian_log_prior(centers[..., level, :], precision[..., level, :], (height, width))
        level_scores = scores[..., start:end] + prior.to(scores.dtype)
        masked = None if key_padding_mask is None else key_padding_mask[:, start:end]
        probs = _level_softmax(level_scores, masked)
        if alpha is not None:
            probs = probs * alpha[..., level : level + 1].to(probs.dtype)
        weights.append(probs)
        start = end
    if start != k.shape[-2]:
        raise ValueError(f"spatial_shapes {list(spatial_shapes)} cover {start} keys, k has {k.shape[-2]}")
    return torch.cat(weights, dim=-1)


def gaussian_coattention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    centers: Tensor,
    precision: Tensor,
    spatial_shape: Tuple[int, int],
    key_padding_mask: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Gaussian-modulated co-attention: softmax(scale q k^T + logG) v -> (B, H, Nq, D).

    docs/operators.md, Gaussian-modulated co-attention.
    centers, precision (B, H, Nq, 2); spatial_shape (Hf, Wf) with Hf * Wf = L.
    Dropout with probability dropout_p is applied to the weights whenever dropout_p > 0.
    """
    weights = attention_weights(
        q, k, centers.unsqueeze(-2), precision.unsqueeze(-2), [tuple(spatial_shape)],
        key_padding_mask, scale=scale,
    )
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return torch.matmul(weights, v)


def scale_selective_coattention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    centers: Tensor,
    precision: Tensor,
    alpha: Tensor,
    spatial_shapes: Sequence[Tuple[int, int]],
    key_padding_mask: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Scale-selective co-attention: sum_s alpha_s softmax_{level s}(S) v -> (B, H, Nq, D).

    docs/operators.md, Scale-selective co-attention.
    centers, precision (B, H, Nq, S, 2) in each level's grid units; alpha (B, H, Nq, S).
    """
    weights = attention_weights(
        q, k, centers, precision, [tuple(s) for s in spatial_shapes], key_padding_mask,
        alpha=alpha, scale=scale,
    )
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return torch.matmul(weights, v)
