"""The functional API: one path from each public function to a kernel, and the torch.library
registrations.

    gaussian_coattention / scale_selective_coattention / SMCAAttention
      -> checks.check_coattention (the contract, once per call)
      -> coattention (the level form: centers, precision (B, H, Nq, S, 2); resolves the backend)
      -> "reference": smca_kernels.reference, differentiated by autograd; else a device op pair
         through one autograd.Function (_Coattention):
           "cpu", "cuda": torch.ops.smca._coattention_forward / _backward (C++, csrc/; the
                          dispatch key picks the CPU or the CUDA kernel)
           "triton":      torch.ops.smca._triton_coattention_forward / _backward (this module
                          registers smca_kernels.triton's launchers as ops of the same form)
The Function's backward is also each forward op's registered autograd, so a direct op call,
opcheck, torch.compile and torch.export differentiate the same way.
"""
import importlib.util
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import reference
from .checks import (
    SpatialShapes, check_coattention, check_kernel_input, coordinate_dtype, kernel_takes, normalise_shapes, shapes_from_flat,
)

try:
    from . import _C  # noqa: F401  (registers the torch.ops.smca schemas and C++ kernels)

    _EXTENSION_ERROR = None
    _CUDA_VERSION = torch.ops.smca._cuda_version()  # 0: built without CUDA
except ImportError as error:  # a source checkout that has not been built
    _EXTENSION_ERROR = f"smca_kernels._C failed to import ({error}); build it with `make install`"
    _CUDA_VERSION = 0
_HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["gaussian_coattention", "scale_selective_coattention", "coattention", "available_backends"]

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


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


def _auto_backend(candidates: Sequence[str], dtype: torch.dtype, head_dim: int, levels: int) -> str:
    """The first of `candidates` (fastest first) whose kernel takes the input, else the reference
    (e.g. float64 on a GPU for gradcheck, 16-bit CPU tensors under autocast, head dim 256)."""
    return next((b for b in candidates if kernel_takes(b, dtype, head_dim, levels)), "reference")


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
    """Gaussian-modulated co-attention over one feature map (docs/operators.md, Gaussian-modulated co-attention).

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
    Raises:
        TypeError, ValueError: input outside the contract (smca_kernels.checks), naming the argument.
        RuntimeError: a backend that cannot run here.
    Coordinates are computed in float32 (float64 for float64 q), whatever the dtype of centers.
    """
    shapes = normalise_shapes([spatial_shape], "spatial_shape")
    check_coattention(
        q, k, v, centers, precision, None, shapes, key_padding_mask, dropout_p, level_axis=False, shapes_name="spatial_shape"
    )
    return coattention(
        q, k, v, centers.unsqueeze(3), precision.unsqueeze(3), None, shapes, key_padding_mask,
        scale=scale, dropout_p=dropout_p, backend=backend,
    )


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
    """Scale-selective co-attention over S feature maps (docs/operators.md, Scale-selective co-attention).

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
    Raises: as gaussian_coattention.
    """
    shapes = normalise_shapes(spatial_shapes)
    if alpha is None:
        raise TypeError("alpha: expected a Tensor, got NoneType")
    check_coattention(q, k, v, centers, precision, alpha, shapes, key_padding_mask, dropout_p)
    return coattention(
        q, k, v, centers, precision, alpha, shapes, key_padding_mask, scale=scale, dropout_p=dropout_p, backend=backend
    )


def coattention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    centers: Tensor,
    precision: Tensor,
    alpha: Optional[Tensor],
    spatial_shapes: Sequence[Tuple[int, int]],
    key_padding_mask: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Co-attention in the level form, on arguments that passed checks.check_coattention.

    centers, precision (B, H, Nq, S, 2); alpha (B, H, Nq, S), or None for one level (Gaussian
    co-attention); spatial_shapes a list of (Hf, Wf) (normalise_shapes). Resolves the backend,
    converts the coordinates to coordinate_dtype(q.dtype) and calls the reference or the
    backend's op pair. Returns (B, H, Nq, D).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = _resolve_backend(backend, q.device, q.dtype, q.shape[-1], len(spatial_shapes))
    if backend == "reference":
        return _reference(q, k, v, centers, precision, alpha, spatial_shapes, key_padding_mask, scale, dropout_p)
    dtype = coordinate_dtype(q.dtype)
    centers, precision = centers.to(dtype), precision.to(dtype)
    alpha = None if alpha is None else alpha.to(dtype)
    check_kernel_input(backend, q, centers, precision, alpha, len(spatial_shapes))
    forward = _FORWARD_OPS[backend]()
    args = (
        q, k, v, centers, precision, alpha, [n for shape in spatial_shapes for n in shape], key_padding_mask,
        scale, float(dropout_p), _dropout_seed(dropout_p),
    )
    if torch.is_grad_enabled():
        return _Coattention.apply(forward, *args)[0]
    return forward(*args)[0]


def _reference(q, k, v, centers, precision, alpha, spatial_shapes, key_padding_mask, scale, dropout_p) -> Tensor:
    """The reference in the level form (coattention's arguments), differentiated by autograd."""
    if alpha is None:
        return reference.gaussian_coattention(
            q, k, v, centers[:, :, :, 0], precision[:, :, :, 0], spatial_shapes[0], key_padding_mask,
            scale=scale, dropout_p=dropout_p,
        )
    return reference.scale_selective_coattention(
        q, k, v, centers, precision, alpha, spatial_shapes, key_padding_mask, scale=scale, dropout_p=dropout_p
    )


def _dropout_seed(dropout_p: float) -> Optional[Tensor]:
    """The device ops' dropout key: a fresh one-element int64 CPU tensor from torch's default
    generator (so torch.manual_seed reproduces it), None without dropout. A tensor and not an
    int: reading it in Python (.item()) would break torch.compile's graph at every call."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu")


# ----------------------------------------------------------------------------------------------
# The Triton kernels as ops of the device-op form
# ----------------------------------------------------------------------------------------------
def _check_triton_device(device: torch.device) -> None:
    """The Triton ops are public: a call where Triton cannot run says why."""
    why = _triton_unavailable(device)
    if why is not None:
        raise RuntimeError(f"backend 'triton' is not available for {device.type} tensors: {why}")


def _triton_forward(q, k, v, centers, precision, alpha, spatial_shapes, key_padding_mask, scale, dropout_p, seed):
    _check_triton_device(q.device)
    from .triton import coattention_forward

    return coattention_forward(
        q, k, v, centers, precision, alpha, list(spatial_shapes), key_padding_mask, scale, dropout_p, seed
    )


def _triton_backward(grad_out, q, k, v, centers, precision, alpha, out_levels, lse, spatial_shapes, key_padding_mask, scale, dropout_p, seed):
    _check_triton_device(q.device)
    from .triton import coattention_backward

    return coattention_backward(
        grad_out, q, k, v, centers, precision, alpha, out_levels, lse, list(spatial_shapes), key_padding_mask,
        scale, dropout_p, seed,
    )


# ----------------------------------------------------------------------------------------------
# Fake (shape) functions and the one autograd formula
# ----------------------------------------------------------------------------------------------
def _forward_fake(q, k, v, centers, precision, alpha, spatial_shapes, key_padding_mask, scale, dropout_p, seed):
    B, H, Nq, D = q.shape
    S = len(spatial_shapes) // 2
    lse_dtype = coordinate_dtype(q.dtype)
    out_levels = q.new_empty((B, H, Nq, S, D)) if alpha is not None else q.new_empty((0,))
    return torch.empty_like(q, memory_format=torch.contiguous_format), out_levels, q.new_empty((B, H, Nq, S), dtype=lse_dtype)


def _backward_fake(grad_out, q, k, v, centers, precision, alpha, out_levels, lse, spatial_shapes, key_padding_mask, scale, dropout_p, seed):
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, centers, precision)]
    return (*grads, torch.empty_like(alpha, memory_format=torch.contiguous_format) if alpha is not None else q.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    q, k, v, centers, precision, alpha, spatial_shapes, key_padding_mask, scale, dropout_p, seed = inputs
    out, out_levels, lse = output
    # One level: the backward takes out (B, H, Nq, D) as the level's output.
    ctx.save_for_backward(
        q, k, v, centers, precision, alpha, out if alpha is None else out_levels, lse, key_padding_mask, seed
    )
    ctx.args = (list(spatial_shapes), scale, dropout_p)


def _backward_with(backward_op):
    """The autograd formula of a forward op whose backward op is `backward_op` (a device op pair
    shares one contract, so one formula serves every backend)."""

    def backward(ctx, grad_out, grad_out_levels=None, grad_lse=None):
        q, k, v, centers, precision, alpha, out_levels, lse, key_padding_mask, seed = ctx.saved_tensors
        spatial_shapes, scale, dropout_p = ctx.args
        no_grad = (None,) * 5  # spatial_shapes, key_padding_mask, scale, dropout_p, seed
        if grad_out is None:  # out unused (set_materialize_grads(False)): every gradient is zero
            return (None,) * 6 + no_grad
        inputs = (q, k, v, centers, precision, alpha)
        if torch.is_grad_enabled():  # create_graph=True: a gradient that is itself differentiated
            grads = _differentiable_grads(backward_op, grad_out, inputs, spatial_shapes, key_padding_mask, scale, dropout_p)
            return (*grads, *no_grad)
        dq, dk, dv, dcenters, dprecision, dalpha = backward_op(
            grad_out.contiguous(), *inputs, out_levels.unsqueeze(3) if alpha is None else out_levels, lse,
            spatial_shapes, key_padding_mask, scale, dropout_p, seed,
        )
        return (dq, dk, dv, dcenters, dprecision, dalpha if alpha is not None else None, *no_grad)

    return backward


def _differentiable_grads(backward_op, grad_out, inputs, spatial_shapes, key_padding_mask, scale, dropout_p):
    """First-order gradients that autograd can differentiate again (a gradient penalty, a
    Hessian-vector product, gradgradcheck): the backward kernels have no derivative of their own,
    so they come from the reference recomputed on the saved inputs, whose graph reaches back to
    them. The kernel's dropout mask is not the reference's: with dropout it is an error."""
    if dropout_p > 0.0:
        backend = "triton" if backward_op == torch.ops.smca._triton_coattention_backward.default else inputs[0].device.type
        raise RuntimeError(
            f"backend {backend!r}: gradients of gradients (create_graph=True) with dropout_p = {dropout_p} are not "
            "supported: the kernel's dropout mask cannot be replayed by the reference. Use backend='reference' for "
            "higher-order gradients with dropout, or dropout_p=0 (e.g. the model in eval mode)"
        )
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    with torch.enable_grad():
        out = _reference(*inputs, shapes_from_flat(spatial_shapes), key_padding_mask, scale, 0.0)
        found = iter(torch.autograd.grad(out, wanted, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(found) if t is not None and t.requires_grad else None for t in inputs)

    return backward


class _Coattention(torch.autograd.Function):
    """A forward device op with its registered autograd formula, applied outside the op: what
    coattention calls when grad mode is on. torch.library's autograd wrapper costs ~35 us more
    per call on this project's CPU (its fill_defaults is quadratic in the schema's 11 arguments,
    pytorch/pytorch#195110); for small batches on a GPU that host time is the step time. The ops
    keep their registration for direct callers, opcheck and export."""

    @staticmethod
    def forward(ctx, forward_op, *inputs):  # not a separate setup_context: apply would bind defaults by inspect
        output = forward_op(*inputs)
        ctx.mark_non_differentiable(output[1], output[2])  # per-level outputs, lse
        ctx.set_materialize_grads(False)  # no zero gradients for them: backward ignores them
        _setup_context(ctx, inputs, output)
        ctx.backward_op = _BACKWARD_OF[forward_op]
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_out_levels, grad_lse):
        return (None, *_backward_with(ctx.backward_op)(ctx, grad_out))


def _cpp_forward():
    return torch.ops.smca._coattention_forward.default


def _triton_forward_op():
    return torch.ops.smca._triton_coattention_forward.default


# Each backend's forward op (looked up when called: the ops exist once _register has run).
_FORWARD_OPS = {"cpu": _cpp_forward, "cuda": _cpp_forward, "triton": _triton_forward_op}
_BACKWARD_OF = {}


def _register() -> None:
    """The Triton ops, fake functions and the autograd formula of both forward ops."""
    lib = torch.library.Library("smca", "FRAGMENT")  # noqa: the ops live as long as the process
    lib.define(
        "_triton_coattention_forward(Tensor q, Tensor k, Tensor v, Tensor centers, Tensor precision, "
        "Tensor? alpha, SymInt[] spatial_shapes, Tensor? key_padding_mask, float scale, float dropout_p, "
        "Tensor? seed) -> (Tensor out, Tensor out_levels, Tensor lse)"
    )
    lib.define(
        "_triton_coattention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor centers, "
        "Tensor precision, Tensor? alpha, Tensor out_levels, Tensor lse, SymInt[] spatial_shapes, "
        "Tensor? key_padding_mask, float scale, float dropout_p, Tensor? seed) -> (Tensor grad_q, Tensor grad_k, "
        "Tensor grad_v, Tensor grad_centers, Tensor grad_precision, Tensor grad_alpha)"
    )
    _register.library = lib
    torch.library.register_kernel("smca::_triton_coattention_forward", ("cpu", "cuda"), _triton_forward)
    torch.library.register_kernel("smca::_triton_coattention_backward", ("cpu", "cuda"), _triton_backward)
    for prefix in ("smca::_coattention", "smca::_triton_coattention"):
        torch.library.register_fake(f"{prefix}_forward", _forward_fake)
        torch.library.register_fake(f"{prefix}_backward", _backward_fake)
    for forward, backward in (
        (torch.ops.smca._coattention_forward.default, torch.ops.smca._coattention_backward.default),
        (torch.ops.smca._triton_coattention_forward.default, torch.ops.smca._triton_coattention_backward.default),
    ):
        _BACKWARD_OF[forward] = backward
        torch.library.register_autograd(forward, _backward_with(backward), setup_context=_setup_context)


if _EXTENSION_ERROR is None:
    _register()
