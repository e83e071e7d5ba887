"""The functional API: argument checks, backend choice, and the torch.library registrations.

Data flow: gaussian_coattention / scale_selective_coattention (checks, backend choice, seed)
-> torch.ops.smca.{gaussian,scale_selective}_coattention (one dispatcher op each, with fake
and autograd registrations; the public functions apply the same autograd formula through a
torch.autograd.Function around the op, which costs less host time) -> the kernel of the chosen
backend:
  "cpu"    C++ CPU kernel (csrc/cpu), "cuda" C++/CUDA kernel (csrc/cuda): both behind the
           device op torch.ops.smca._coattention_forward/_backward, picked by dispatch key;
  "triton" smca_kernels.triton (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1);
  "reference" pure PyTorch (smca_kernels.reference), differentiated by autograd, no op.
"""
import importlib.util
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import reference

try:
    from . import _C  # noqa: F401  (registers the torch.ops.smca schemas and C++ kernels)

    _EXTENSION_ERROR = None
    _CUDA_VERSION = torch.ops.smca._cuda_version()  # 0: built without CUDA
except ImportError as error:  # a source checkout that has not been built
    _EXTENSION_ERROR = f"smca_kernels._C failed to import ({error}); build it with `make install`"
    _CUDA_VERSION = 0
_HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["gaussian_coattention", "scale_selective_coattention", "available_backends"]

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

SpatialShapes = Union[Sequence[Sequence[int]], Tensor]


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------
def _triton_unavailable(device: torch.device) -> Optional[str]:
    """Why backend="triton" cannot run on `device`, or None when it can."""
    if _EXTENSION_ERROR:
        return _EXTENSION_ERROR
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda"):
        return f"Triton does not run on {device.type} tensors"
    if not _HAS_TRITON:
        return "triton is not installed"
    return None


def _unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run tensors on `device`, or None when it can."""
    if backend == "reference":
        return None
    if backend == "triton":
        return _triton_unavailable(device)
    if _EXTENSION_ERROR:
        return _EXTENSION_ERROR
    if backend == "cpu" and device.type != "cpu":
        return f"the C++ CPU kernel takes CPU tensors, got {device.type} tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA kernel takes CUDA tensors, got {device.type} tensors"
        if _CUDA_VERSION == 0:
            return "smca_kernels._C was built without CUDA (rebuild with FORCE_CUDA=1)"
    return None


def available_backends(device: Union[str, torch.device] = "cpu") -> List[str]:
    """The backends that can run tensors on `device`, fastest first ("auto" excluded)."""
    device = torch.device(device)
    order = ("triton", "cuda", "cpu", "reference") if device.type == "cuda" else ("cpu", "triton", "reference")
    return [name for name in order if _unavailable(name, device) is None]


# What each fused kernel takes; the reference takes any floating dtype, head dim and level count.
# Explicitly chosen, a kernel rejects the rest with its own message; "auto" passes it over.
_KERNEL_LIMITS = {
    "cpu": dict(dtypes=(torch.float32, torch.float64), head_dims=None, max_levels=None),
    "triton": dict(dtypes=(torch.float32, torch.float16, torch.bfloat16), head_dims=range(1, 129), max_levels=None),
    "cuda": dict(dtypes=(torch.float32, torch.float16, torch.bfloat16), head_dims=(16, 32, 64, 128), max_levels=32),
}


def _kernel_takes(backend: str, dtype: torch.dtype, head_dim: int, levels: int) -> bool:
    limits = _KERNEL_LIMITS[backend]
    return (dtype in limits["dtypes"]
            and (limits["head_dims"] is None or head_dim in limits["head_dims"])
            and (limits["max_levels"] is None or levels <= limits["max_levels"]))


def _auto_backend(candidates: Sequence[str], dtype: torch.dtype, head_dim: int, levels: int) -> str:
    """The first of `candidates` (fastest first) whose kernel takes the input, else the reference
    (e.g. float64 on a GPU for gradcheck, 16-bit CPU tensors under autocast, head dim 256)."""
    return next((b for b in candidates if _kernel_takes(b, dtype, head_dim, levels)), "reference")


def _resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, levels: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        # The Triton interpreter is for tests, never a CPU default.
        candidates = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
        usable = [b for b in candidates if _unavailable(b, device) is None]
        return _auto_backend(usable, dtype, head_dim, levels)
    why = _unavailable(backend, device)
    if why is not None:
        raise RuntimeError(
            f"backend {backend!r} is not available for {device.type} tensors: {why}. "
            f"Available: {available_backends(device)}"
        )
    return backend


# ----------------------------------------------------------------------------------------------
# Argument checks (clear messages before anything reaches a kernel)
# ----------------------------------------------------------------------------------------------
def _normalise_shapes(spatial_shapes: SpatialShapes, name: str) -> List[Tuple[int, int]]:
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    try:
        shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a sequence of (Hf, Wf) pairs, got {spatial_shapes!r}") from None
    if not shapes or any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"{name}: expected one or more positive (Hf, Wf) pairs, got {shapes}")
    return shapes


def _check_tensor(t: Tensor, name: str, shape: Tuple[int, ...], what: str, like: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {what} = {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (that of q), got {t.device}")


def _check_inputs(q, k, v, centers, precision, alpha, shapes, key_padding_mask, dropout_p, shapes_name):
    """Validates the arguments; returns the coordinate dtype (float64 for float64 q, else float32)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (B, H, N, D), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a floating dtype {_FLOAT_DTYPES}, got {t.dtype}")
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
        raise ValueError(f"{shapes_name}: {shapes} cover {n_keys} keys, but k and v have L = {L}")
    S = len(shapes)
    coord_shape = (B, H, Nq, 2) if shapes_name == "spatial_shape" else (B, H, Nq, S, 2)
    coord_what = "(B, H, Nq, 2)" if shapes_name == "spatial_shape" else "(B, H, Nq, S, 2)"
    for name, t in (("centers", centers), ("precision", precision)):
        _check_tensor(t, name, coord_shape, coord_what, q)
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    if alpha is not None:
        _check_tensor(alpha, "alpha", (B, H, Nq, S), "(B, H, Nq, S)", q)
        if not alpha.is_floating_point():
            raise TypeError(f"alpha: expected a floating dtype, got {alpha.dtype}")
    if key_padding_mask is not None:
        _check_tensor(key_padding_mask, "key_padding_mask", (B, L), "(B, L)", q)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected dtype torch.bool (True = ignore), got {key_padding_mask.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= dropout_p < 1, got {dropout_p}")
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _dropout_seed(dropout_p: float) -> int:
    """A fresh seed from torch's default generator (so torch.manual_seed reproduces it)."""
    if dropout_p == 0.0:
        return 0
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
def gaussian_coattention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    centers: Tensor,
    precision: Tensor,
    spatial_shape: Sequence[int],
    key_padding_mask: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Gaussian-modulated co-attention over one feature map (SPEC 1.1).

    out_i = sum_j softmax_j(scale <q_i, k_j> + logG_ij) v_j with
    logG_ij = -((px_i (x_j - cx_i))^2 + (py_i (y_j - cy_i))^2), key j at cell (j % Wf, j // Wf).

    Args:
        q: (B, H, Nq, D) queries.
        k, v: (B, H, L, D) keys and values, L = Hf * Wf in row-major order.
        centers: (B, H, Nq, 2) Gaussian centres (cx, cy) in grid cells (may be expanded over H).
        precision: (B, H, Nq, 2) (px, py), the bandwidth already folded in.
        spatial_shape: (Hf, Wf).
        key_padding_mask: (B, L) bool, True = ignore the key. A row whose keys are all masked
            gives zeros and zero gradients.
        scale: multiplies q k^T (not logG); default D ** -0.5.
        dropout_p: attention dropout, applied whenever > 0 (pass 0 in eval).
        backend: "auto" (the fastest kernel for the device that takes the input's dtype and
            head dim: CUDA: Triton, then the CUDA kernel; CPU: the C++ kernel for float32/float64;
            else the reference), "reference", "cpu", "triton" or "cuda".
    Returns:
        (B, H, Nq, D) in q's dtype. Gradients flow to q, k, v, centers and precision.
    Coordinates are computed in float32 (float64 for float64 q), whatever the dtype of centers.
    """
    shapes = _normalise_shapes([spatial_shape], "spatial_shape")
    coord_dtype = _check_inputs(q, k, v, centers, precision, None, shapes, key_padding_mask, dropout_p, "spatial_shape")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = _resolve_backend(backend, q.device, q.dtype, q.shape[-1], 1)
    if backend == "reference":
        return reference.gaussian_coattention(
            q, k, v, centers, precision, shapes[0], key_padding_mask, scale=scale, dropout_p=dropout_p
        )
    op = _GaussianFunction.apply if torch.is_grad_enabled() else torch.ops.smca.gaussian_coattention
    out, _ = op(
        q, k, v, centers.to(coord_dtype), precision.to(coord_dtype), list(shapes[0]),
        key_padding_mask, scale, float(dropout_p), _dropout_seed(dropout_p), backend,
    )
    return out


def scale_selective_coattention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    centers: Tensor,
    precision: Tensor,
    alpha: Tensor,
    spatial_shapes: SpatialShapes,
    key_padding_mask: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Scale-selective co-attention over S feature maps (SPEC 1.2).

    out_i = sum_s alpha_is softmax_{j in level s}(scale <q_i, k_j> + logG^s_ij) v_j.

    Args:
        q: (B, H, Nq, D).
        k, v: (B, H, L, D), the S levels concatenated along L, each row-major.
        centers, precision: (B, H, Nq, S, 2), level s in its own grid cells.
        alpha: (B, H, Nq, S) level weights, already normalised by the caller.
        spatial_shapes: [(Hf_0, Wf_0), ...] (or an (S, 2) tensor), sum of Hf * Wf = L.
        key_padding_mask, scale, dropout_p, backend: as in gaussian_coattention.
    Returns:
        (B, H, Nq, D). Gradients flow to q, k, v, centers, precision and alpha.
    """
    shapes = _normalise_shapes(spatial_shapes, "spatial_shapes")
    coord_dtype = _check_inputs(q, k, v, centers, precision, alpha, shapes, key_padding_mask, dropout_p, "spatial_shapes")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = _resolve_backend(backend, q.device, q.dtype, q.shape[-1], len(shapes))
    if backend == "reference":
        return reference.scale_selective_coattention(
            q, k, v, centers, precision, alpha, shapes, key_padding_mask, scale=scale, dropout_p=dropout_p
        )
    op = _ScaleSelectiveFunction.apply if torch.is_grad_enabled() else torch.ops.smca.scale_selective_coattention
    out, _, _ = op(
        q, k, v, centers.to(coord_dtype), precision.to(coord_dtype), alpha.to(coord_dtype),
        [n for shape in shapes for n in shape], key_padding_mask, scale, float(dropout_p),
        _dropout_seed(dropout_p), backend,
    )
    return out


# ----------------------------------------------------------------------------------------------
# Kernels of the public ops: route on `backend` to the device kernel
# ----------------------------------------------------------------------------------------------
def _device_forward(backend, q, k, v, centers, precision, alpha, shapes, mask, scale, dropout_p, seed):
    _check_kernel_backend(backend, q.device)
    if backend == "triton":
        from .triton import coattention_forward

        return coattention_forward(q, k, v, centers, precision, alpha, list(shapes), mask, scale, dropout_p, seed)
    return torch.ops.smca._coattention_forward(q, k, v, centers, precision, alpha, shapes, mask, scale, dropout_p, seed)


def _device_backward(backend, grad_out, q, k, v, centers, precision, alpha, out_levels, lse, shapes, mask, scale, dropout_p, seed):
    _check_kernel_backend(backend, q.device)
    if backend == "triton":
        from .triton import coattention_backward

        return coattention_backward(
            grad_out, q, k, v, centers, precision, alpha, out_levels, lse, list(shapes), mask, scale, dropout_p, seed
        )
    return torch.ops.smca._coattention_backward(
        grad_out, q, k, v, centers, precision, alpha, out_levels, lse, shapes, mask, scale, dropout_p, seed
    )


def _check_kernel_backend(backend: str, device: torch.device) -> None:
    """The ops are public: a direct call with a wrong backend gets the same message as the API."""
    if backend not in ("cpu", "cuda", "triton"):
        raise ValueError(f"backend: the smca ops take 'cpu', 'cuda' or 'triton', got {backend!r}")
    why = _unavailable(backend, device)
    if why is not None:
        raise RuntimeError(f"backend {backend!r} is not available for {device.type} tensors: {why}")


def _gaussian_forward(q, k, v, centers, precision, spatial_shape, key_padding_mask, scale, dropout_p, seed, backend):
    out, _, lse = _device_forward(
        backend, q, k, v, centers.unsqueeze(3), precision.unsqueeze(3), None, spatial_shape,
        key_padding_mask, scale, dropout_p, seed,
    )
    return out, lse.squeeze(3)


def _gaussian_backward(grad_out, q, k, v, centers, precision, out, lse, spatial_shape, key_padding_mask, scale, dropout_p, seed, backend):
    dq, dk, dv, dcenters, dprecision, _ = _device_backward(
        backend, grad_out, q, k, v, centers.unsqueeze(3), precision.unsqueeze(3), None,
        out.unsqueeze(3), lse.unsqueeze(3), spatial_shape, key_padding_mask, scale, dropout_p, seed,
    )
    return dq, dk, dv, dcenters.squeeze(3), dprecision.squeeze(3)


def _scale_selective_forward(q, k, v, centers, precision, alpha, spatial_shapes, key_padding_mask, scale, dropout_p, seed, backend):
    return tuple(
        _device_forward(backend, q, k, v, centers, precision, alpha, spatial_shapes, key_padding_mask, scale, dropout_p, seed)
    )


def _scale_selective_backward(grad_out, q, k, v, centers, precision, alpha, out_levels, lse, spatial_shapes, key_padding_mask, scale, dropout_p, seed, backend):
    return tuple(
        _device_backward(
            backend, grad_out, q, k, v, centers, precision, alpha, out_levels, lse, spatial_shapes,
            key_padding_mask, scale, dropout_p, seed,
        )
    )


# ----------------------------------------------------------------------------------------------
# Fake (shape) functions and autograd
# ----------------------------------------------------------------------------------------------
def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _gaussian_fake(q, k, v, centers, precision, spatial_shape, key_padding_mask, scale, dropout_p, seed, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


def _gaussian_backward_fake(grad_out, q, k, v, centers, precision, out, lse, spatial_shape, key_padding_mask, scale, dropout_p, seed, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, centers, precision))


def _scale_selective_fake(q, k, v, centers, precision, alpha, spatial_shapes, key_padding_mask, scale, dropout_p, seed, backend):
    B, H, Nq, D = q.shape
    S = len(spatial_shapes) // 2
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        q.new_empty((B, H, Nq, S, D)),
        q.new_empty((B, H, Nq, S), dtype=_lse_dtype(q)),
    )


def _scale_selective_backward_fake(grad_out, q, k, v, centers, precision, alpha, out_levels, lse, spatial_shapes, key_padding_mask, scale, dropout_p, seed, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, centers, precision, alpha))


def _gaussian_setup_context(ctx, inputs, output):
    q, k, v, centers, precision, spatial_shape, key_padding_mask, scale, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, centers, precision, out, lse, key_padding_mask)
    ctx.args = (list(spatial_shape), scale, dropout_p, seed, backend)


def _gaussian_autograd(ctx, grad_out, grad_lse):
    q, k, v, centers, precision, out, lse, key_padding_mask = ctx.saved_tensors
    spatial_shape, scale, dropout_p, seed, backend = ctx.args
    grads = torch.ops.smca.gaussian_coattention_backward(
        grad_out.contiguous(), q, k, v, centers, precision, out, lse, spatial_shape,
        key_padding_mask, scale, dropout_p, seed, backend,
    )
    return (*grads, None, None, None, None, None, None)


def _scale_selective_setup_context(ctx, inputs, output):
    q, k, v, centers, precision, alpha, spatial_shapes, key_padding_mask, scale, dropout_p, seed, backend = inputs
    _, out_levels, lse = output
    ctx.save_for_backward(q, k, v, centers, precision, alpha, out_levels, lse, key_padding_mask)
    ctx.args = (list(spatial_shapes), scale, dropout_p, seed, backend)


def _scale_selective_autograd(ctx, grad_out, grad_out_levels, grad_lse):
    q, k, v, centers, precision, alpha, out_levels, lse, key_padding_mask = ctx.saved_tensors
    spatial_shapes, scale, dropout_p, seed, backend = ctx.args
    grads = torch.ops.smca.scale_selective_coattention_backward(
        grad_out.contiguous(), q, k, v, centers, precision, alpha, out_levels, lse, spatial_shapes,
        key_padding_mask, scale, dropout_p, seed, backend,
    )
    return (*grads, None, None, None, None, None, None)


class _GaussianFunction(torch.autograd.Function):
    """torch.ops.smca.gaussian_coattention with the op's own autograd formula, applied outside
    the op: what the public functions call when grad mode is on. torch.library's autograd wrapper
    costs ~35 us more per call on this project's CPU (its fill_defaults is quadratic in the
    schema's 11-12 arguments, pytorch/pytorch#195110); for small batches on a GPU that host time
    is the step time. Called inside forward (grad mode off), the op skips its wrapper. The op
    keeps its registration for direct callers, opcheck and export."""

    @staticmethod
    def forward(ctx, *inputs):  # not a separate setup_context: apply would bind defaults by inspect
        output = torch.ops.smca.gaussian_coattention(*inputs)
        ctx.mark_non_differentiable(output[1])  # lse
        ctx.set_materialize_grads(False)  # no zero gradient for lse: backward ignores it
        _gaussian_setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_gaussian_autograd)


class _ScaleSelectiveFunction(torch.autograd.Function):
    """torch.ops.smca.scale_selective_coattention with its autograd outside the op (see
    _GaussianFunction)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = torch.ops.smca.scale_selective_coattention(*inputs)
        ctx.mark_non_differentiable(output[1], output[2])  # per-level outputs, lse
        ctx.set_materialize_grads(False)
        _scale_selective_setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_scale_selective_autograd)


def _register() -> None:
    """Python kernels of the public ops for CPU and CUDA, fake functions and autograd."""
    for name, kernel, fake in (
        ("gaussian_coattention", _gaussian_forward, _gaussian_fake),
        ("gaussian_coattention_backward", _gaussian_backward, _gaussian_backward_fake),
        ("scale_selective_coattention", _scale_selective_forward, _scale_selective_fake),
        ("scale_selective_coattention_backward", _scale_selective_backward, _scale_selective_backward_fake),
    ):
        qualname = f"smca::{name}"
        torch.library.register_kernel(qualname, ("cpu", "cuda"), kernel)
        torch.library.register_fake(qualname, fake)
    torch.library.register_autograd(
        "smca::gaussian_coattention", _gaussian_autograd, setup_context=_gaussian_setup_context
    )
    torch.library.register_autograd(
        "smca::scale_selective_coattention", _scale_selective_autograd, setup_context=_scale_selective_setup_context
    )


if _EXTENSION_ERROR is None:
    _register()
