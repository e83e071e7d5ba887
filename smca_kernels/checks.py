"""The co-attention's argument contract, checked once per call before any kernel runs.

One checker for the public functions, SMCAAttention and the Triton ops; the C++ ops keep
csrc/checks.cpp for direct calls. Errors name the argument and what was expected: TypeError for
a dtype, ValueError for a shape, a device or a value. Messages are formatted only on failure
(this runs on every call, on the host's time).
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "FLOAT_DTYPES",
    "KERNEL_LIMITS",
    "SpatialShapes",
    "coordinate_dtype",
    "kernel_takes",
    "normalise_shapes",
    "shapes_from_flat",
    "check_coattention",
    "check_kernel_input",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# What each fused kernel takes; the reference takes any floating dtype, head dim and level count.
# "auto" passes over a kernel that does not take the input; chosen explicitly, the kernel's
# check (check_kernel_input) names what it lacks.
KERNEL_LIMITS = {
    "cpu": dict(dtypes=(torch.float32, torch.float64), head_dims=None, max_levels=None),
    "triton": dict(dtypes=(torch.float32, torch.float16, torch.bfloat16), head_dims=range(1, 129), max_levels=None),
    "cuda": dict(dtypes=(torch.float32, torch.float16, torch.bfloat16), head_dims=(16, 32, 64, 128), max_levels=32),
}

SpatialShapes = Union[Sequence[Sequence[int]], Tensor]


def coordinate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype centres, precisions, alpha and lse are computed in: float64 for float64 q,
    float32 for every other dtype (grid coordinates reach ~100 cells, past 16-bit precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_takes(backend: str, dtype: torch.dtype, head_dim: int, levels: int) -> bool:
    """Whether the fused kernel `backend` takes q of this dtype and head dim with this many levels."""
    limits = KERNEL_LIMITS[backend]
    return (
        dtype in limits["dtypes"]
        and (limits["head_dims"] is None or head_dim in limits["head_dims"])
        and (limits["max_levels"] is None or levels <= limits["max_levels"])
    )


def _size(n) -> Union[int, torch.SymInt]:
    """A map size as an int; a symbolic size (torch.export with dynamic shapes) stays symbolic,
    so that the exported graph is not specialised to the example's size."""
    return n if isinstance(n, torch.SymInt) else int(n)


def normalise_shapes(spatial_shapes: SpatialShapes, name: str = "spatial_shapes") -> List[Tuple[int, int]]:
    """[(Hf, Wf), ...] (or an (S, 2) tensor) -> a list of positive int pairs; ValueError otherwise."""
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    try:
        shapes = [(_size(h), _size(w)) for h, w in spatial_shapes]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a sequence of (Hf, Wf) pairs, got {spatial_shapes!r}") from None
    if not shapes or any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"{name}: expected one or more positive (Hf, Wf) pairs, got {shapes}")
    return shapes


def shapes_from_flat(spatial_shapes: Sequence[int]) -> List[Tuple[int, int]]:
    """The device ops' flat [H0, W0, H1, W1, ...] -> [(H0, W0), ...]; ValueError unless it holds
    one or more pairs of positive sizes."""
    flat = list(spatial_shapes)
    if len(flat) < 2 or len(flat) % 2:
        raise ValueError(f"spatial_shapes: expected [H0, W0, H1, W1, ...], got {flat}")
    return normalise_shapes(list(zip(flat[0::2], flat[1::2])))


def _check_tensor(t: Tensor, name: str, shape: Tuple[int, ...], what: str, like: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {what} = {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (that of q), got {t.device}")


def check_coattention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    centers: Tensor,
    precision: Tensor,
    alpha: Optional[Tensor],
    shapes: Sequence[Tuple[int, int]],
    key_padding_mask: Optional[Tensor],
    dropout_p: float,
    *,
    level_axis: bool = True,
    shapes_name: str = "spatial_shapes",
) -> None:
    """The operator contract (docs/operators.md, Shapes and dtypes).

    q (B, H, Nq, D) of a floating dtype; k, v (B, H, L, D) of q's dtype and device, L the keys
    of `shapes` (a list of (Hf, Wf), see normalise_shapes); centers, precision (B, H, Nq, S, 2)
    ((B, H, Nq, 2) with level_axis False: the one-map form), floating; alpha None or
    (B, H, Nq, S) floating (required with more than one level in the level form);
    key_padding_mask None or (B, L) bool; 0 <= dropout_p < 1. shapes_name: the argument the
    caller calls `shapes`, for the messages.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (B, H, N, D), got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a floating dtype {FLOAT_DTYPES}, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    B, H, Nq, D = q.shape
    L = k.shape[2]
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k: expected shape (B, H, L, D) = ({B}, {H}, L, {D}) to match q, got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    n_keys = sum(h * w for h, w in shapes)
    if n_keys != L:
        raise ValueError(f"{shapes_name}: {list(shapes)} cover {n_keys} keys, but k and v have L = {L}")
    S = len(shapes)
    if level_axis:
        coord_shape, coord_what = (B, H, Nq, S, 2), "(B, H, Nq, S, 2)"
    else:
        coord_shape, coord_what = (B, H, Nq, 2), "(B, H, Nq, 2)"
    for name, t in (("centers", centers), ("precision", precision)):
        _check_tensor(t, name, coord_shape, coord_what, q)
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if alpha is not None:
        _check_tensor(alpha, "alpha", (B, H, Nq, S), "(B, H, Nq, S)", q)
        if not alpha.is_floating_point():
            raise TypeError(f"alpha: expected a floating dtype, got {alpha.dtype}")
    elif S != 1:
        raise ValueError(f"alpha: required to mix {S} levels ({shapes_name} {list(shapes)})")
    if key_padding_mask is not None:
        _check_tensor(key_padding_mask, "key_padding_mask", (B, L), "(B, L)", q)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected dtype torch.bool (True = ignore), got {key_padding_mask.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= dropout_p < 1, got {dropout_p}")


def check_kernel_input(
    backend: str, q: Tensor, centers: Tensor, precision: Tensor, alpha: Optional[Tensor], levels: int
) -> None:
    """What a fused kernel takes beyond the operator contract: q's dtype and head dim and the
    level count within KERNEL_LIMITS[backend], coordinates already in coordinate_dtype(q.dtype)
    (the device ops do not convert them)."""
    limits = KERNEL_LIMITS[backend]
    if q.dtype not in limits["dtypes"]:
        raise TypeError(f"q: the {backend!r} kernel takes {limits['dtypes']}, got {q.dtype}")
    head_dims = limits["head_dims"]
    if head_dims is not None and q.shape[-1] not in head_dims:
        shown = f"{head_dims.start}..{head_dims.stop - 1}" if isinstance(head_dims, range) else str(head_dims)
        raise ValueError(f"q: the {backend!r} kernel takes head dims {shown}, got {q.shape[-1]}")
    if limits["max_levels"] is not None and levels > limits["max_levels"]:
        raise ValueError(f"spatial_shapes: the {backend!r} kernel takes at most {limits['max_levels']} levels, got {levels}")
    expected = coordinate_dtype(q.dtype)
    for name, t in (("centers", centers), ("precision", precision), ("alpha", alpha)):
        if t is not None and t.dtype != expected:
            raise TypeError(f"{name}: expected dtype {expected} (for q of {q.dtype}), got {t.dtype}")
