"""Inputs and comparisons shared by the operator tests."""
import contextlib
import zlib
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Largest error allowed, relative to the largest magnitude of the float64 reference. Where the
# problem itself is ill-conditioned in that dtype (a centre far outside the map makes logG
# ~ -1e3, whose float32 rounding alone moves the softmax by ~1e-5), the reference computed in
# the same dtype shows it, and a kernel may err by up to twice what the reference errs.
# 16-bit inputs are judged by that rule alone (at most 2x the 16-bit reference's error;
# docs/kernels.md, Testing), with the float32 tolerance as a floor: the kernels accumulate in
# float32, and where the 16-bit reference happens to be exact (one key: the softmax is exactly 1
# and dS exactly 0) a float32 rounding (~1e-7) must not fail them.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}

# Where the tests run the Triton kernels: the GPU when there is one, else CPU tensors through
# Triton's interpreter (conftest.py switches it on).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The ISA levels of the C++ CPU kernels (csrc/cpu/isa.h), widest first; SMCA_CPU_ISA forces one.
CPU_ISAS = ("avx512", "avx2", "default")


def cpu_isa_params() -> list:
    """pytest params, one per CPU ISA level, skipped where this CPU or build lacks the level."""
    supported = torch.ops.smca._cpu_isas()
    return [
        pytest.param(isa, id=isa, marks=[] if isa in supported else pytest.mark.skip(reason=f"this CPU or build lacks {isa}"))
        for isa in CPU_ISAS
    ]


def cut_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 `t` as TF32 tensor cores read it: the 13 low mantissa bits cleared; NaN stays NaN."""
    cut = (t.view(torch.int32) & ~0x1FFF).view(torch.float32)
    return torch.where(t.isnan(), t, cut)


class TF32Matmuls(TorchDispatchMode):
    """Inside, every float32 matrix product (mm, bmm and their add forms, which matmul and its
    backward lower to) multiplies its operands cut to TF32 (cut_to_tf32), as a GPU does under
    fp32_precision "tf32": the reference "run with the same setting" on the CPU, by which a
    float32 kernel in TF32 is judged (reference_results(..., tf32=True))."""

    PRODUCTS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.bmm.default: (0, 1),
                torch.ops.aten.addmm.default: (1, 2), torch.ops.aten.baddbmm.default: (1, 2)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        operands = self.PRODUCTS.get(func, ())
        args = [cut_to_tf32(a) if i in operands and a.dtype == torch.float32 else a for i, a in enumerate(args)]
        return func(*args, **(kwargs or {}))


def allowed_error(dtype: torch.dtype, reference_error: float) -> float:
    """The error a kernel in `dtype` may have, given the reference's own error in `dtype`."""
    return max(TOLERANCE[dtype], 2.0 * reference_error)


@dataclass
class Case:
    """One operator call: shapes and the kind of input."""

    B: int = 2
    H: int = 2
    Nq: int = 7
    D: int = 16
    shapes: List[Tuple[int, int]] = field(default_factory=lambda: [(3, 5)])
    multi: bool = False  # scale-selective (with alpha) instead of Gaussian
    mask: str = "none"  # none | random | empty_batch (element 1 all masked) | empty_level
    outside: bool = False  # centres outside the map
    layout: str = "contiguous"  # contiguous | strided (q, k, v transposed views, centres expanded over heads)

    @property
    def L(self) -> int:
        return sum(h * w for h, w in self.shapes)

    def __str__(self) -> str:
        kind = "ss" if self.multi else "g"
        maps = "+".join(f"{h}x{w}" for h, w in self.shapes)
        return f"{kind}-B{self.B}H{self.H}Nq{self.Nq}D{self.D}-{maps}-{self.mask}{'-outside' if self.outside else ''}-{self.layout}"


def make_inputs(case: Case, generator: torch.Generator) -> dict:
    """Float64 leaf inputs for `case` on the CPU, drawn from `generator`."""
    B, H, Nq, D, L, S = case.B, case.H, case.Nq, case.D, case.L, len(case.shapes)
    f64 = dict(dtype=torch.float64, generator=generator)

    def heads(n):  # (B, H, n, D), a transposed view when strided
        if case.layout == "strided":
            return torch.randn(B, n, H, D, **f64).transpose(1, 2)
        return torch.randn(B, H, n, D, **f64)

    sizes = torch.tensor([[w, h] for h, w in case.shapes], dtype=torch.float64)  # (S, 2) as (x, y)
    low, high = (-1.0, 2.0) if case.outside else (0.0, 1.0)
    heads_c = 1 if case.layout == "strided" else H  # strided: one head, expanded by `call`
    centers = (low + (high - low) * torch.rand(B, heads_c, Nq, S, 2, **f64)) * sizes
    precision = 0.1 + 0.6 * torch.rand(B, heads_c, Nq, S, 2, **f64)
    mask = None
    if case.mask != "none":
        mask = torch.rand(B, L, generator=generator) < 0.3
        if case.mask == "empty_batch":
            mask[1] = True
        elif case.mask == "empty_level":
            h, w = case.shapes[0]
            mask[1, : h * w] = True
    inputs = dict(q=heads(Nq), k=heads(L), v=heads(L), centers=centers, precision=precision, mask=mask)
    if case.multi:
        inputs["alpha"] = torch.softmax(torch.randn(B, H, Nq, S, **f64), dim=-1)
    else:
        inputs["centers"], inputs["precision"] = centers[:, :, :, 0], precision[:, :, :, 0]
    return inputs


DIFFERENTIABLE = ("q", "k", "v", "centers", "precision", "alpha")  # also the device ops' gradient order


def leaves(inputs: dict, dtype: torch.dtype, device: str) -> dict:
    """Leaf copies of `inputs` in `dtype` on `device` (coordinates float32 unless float64) that
    require grad; transposed q, k, v keep their strides."""
    out = {}
    for name, t in inputs.items():
        if t is None or name == "mask":
            out[name] = None if t is None else t.to(device)
            continue
        target = dtype if name in ("q", "k", "v") or dtype == torch.float64 else torch.float32
        out[name] = t.detach().to(device=device, dtype=target).requires_grad_(True)
    return out


def call(op, case: Case, t: dict, backend: str, **kwargs):
    """Runs the public op of `case` on tensors `t` with `backend`; centres and precision with one
    head are expanded over heads (stride 0), as head-shared SMCA passes them."""
    centers, precision = (x.expand(case.B, case.H, *x.shape[2:]) for x in (t["centers"], t["precision"]))
    if case.multi:
        return op.scale_selective_coattention(
            t["q"], t["k"], t["v"], centers, precision, t["alpha"], case.shapes, t["mask"],
            backend=backend, **kwargs,
        )
    return op.gaussian_coattention(
        t["q"], t["k"], t["v"], centers, precision, case.shapes[0], t["mask"], backend=backend, **kwargs
    )


def device_kernel_results(forward, backward, case: Case, t: dict, grad_out: torch.Tensor,
                          dropout_p: float = 0.0, seed: int = 0):
    """(out, gradients, lse) of a device kernel pair called directly, with the signature of
    smca::_coattention_forward / _coattention_backward (coordinates with a level axis, the
    per-level outputs saved for the backward), on the tensors of `t` (leaves()). The gradients
    are those of `t`'s inputs, summed over heads where centres were expanded, as autograd would."""
    coords = [t[n] if case.multi else t[n].unsqueeze(3) for n in ("centers", "precision")]
    coords = [c.detach().expand(case.B, case.H, *c.shape[2:]) for c in coords]
    alpha = t.get("alpha")
    args = (t["q"].detach(), t["k"].detach(), t["v"].detach(), *coords, None if alpha is None else alpha.detach())
    flat = [n for shape in case.shapes for n in shape]
    scale = case.D**-0.5
    seed = torch.tensor(seed, dtype=torch.int64)  # the ops take the dropout key as a CPU tensor
    out, out_levels, lse = forward(*args, flat, t["mask"], scale, dropout_p, seed)
    saved = out_levels if case.multi else out.unsqueeze(3)
    grad_out = grad_out.to(device=out.device, dtype=out.dtype)
    g = dict(zip(DIFFERENTIABLE, backward(grad_out, *args, saved, lse, flat, t["mask"], scale, dropout_p, seed)))
    if not case.multi:
        del g["alpha"]
        g["centers"], g["precision"] = g["centers"].squeeze(3), g["precision"].squeeze(3)
    for name in ("centers", "precision"):
        if t[name].shape[1] == 1 < case.H:
            g[name] = g[name].sum(1, keepdim=True)
    return out, g, lse


def grads(out: torch.Tensor, t: dict, grad_out: torch.Tensor) -> dict:
    names = [n for n in DIFFERENTIABLE if n in t and t[n] is not None and t[n].requires_grad]
    values = torch.autograd.grad(out, [t[n] for n in names], grad_out, allow_unused=True)
    return dict(zip(names, values))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (absolute when expected is all zeros)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all(), "non-finite values"
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def reference_results(op, case: Case, inputs: dict, grad_out: torch.Tensor, dtype: torch.dtype, device: str,
                      tf32: bool = False):
    """(exact, exact_g, ref, ref_g): the reference's (op: smca_kernels) output and gradients for
    `grad_out` in float64 (the truth) and in `dtype` (what that dtype itself can do on these
    inputs), on `device`; with tf32, `ref` multiplies in TF32 (TF32Matmuls; float32 only)."""
    results = []
    for precision in (torch.float64, dtype):
        t = leaves(inputs, precision, device)
        with TF32Matmuls() if tf32 and precision == torch.float32 else contextlib.nullcontext():
            out = call(op, case, t, "reference")
            results += [out, grads(out, t, grad_out.to(device=device, dtype=precision))]
    return tuple(results)


def assert_within_reference_error(dtype: torch.dtype, actual, actual_g: dict, exact, exact_g: dict, ref, ref_g: dict):
    """A kernel's output and gradients in `dtype` against the float64 `exact` ones, each within
    allowed_error of what `ref` (the same computation in `dtype`) errs."""
    assert relative_error(actual, exact) <= allowed_error(dtype, relative_error(ref, exact)), "output"
    for name, value in exact_g.items():
        allowed = allowed_error(dtype, relative_error(ref_g[name], value))
        assert relative_error(actual_g[name], value) <= allowed, f"grad of {name}"


def check_dropout_against_cpu(op, case: Case, backend: str, device: str, dropout_p: float = 0.4) -> None:
    """`backend` on `device` in float32 with attention dropout against the C++ CPU kernel in
    float64 with the same seed, forward and every gradient. All kernels draw the same Philox
    numbers, so they drop the same weights; the CPU kernel's own float32 error sets the tolerance
    (allowed_error). The CPU kernel's dropout backward is checked by gradcheck in test_ops.py."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"dropout-{case}".encode()))
    inputs = make_inputs(case, generator)
    grad_out = torch.randn(case.B, case.H, case.Nq, case.D, dtype=torch.float64, generator=generator)

    def run(name, dtype, where):
        t = leaves(inputs, dtype, where)
        torch.manual_seed(5)  # the seed of the dropout mask
        out = call(op, case, t, name, dropout_p=dropout_p)
        return out, grads(out, t, grad_out.to(device=where, dtype=dtype))

    exact, exact_g = run("cpu", torch.float64, "cpu")
    ref, ref_g = run("cpu", torch.float32, "cpu")
    actual, actual_g = run(backend, torch.float32, device)
    assert_within_reference_error(torch.float32, actual, actual_g, exact, exact_g, ref, ref_g)


def assert_float32_follows_matmul_precision(op, case: Case, inputs: dict, grad_out: torch.Tensor, run) -> None:
    """A float32 kernel under PyTorch's matmul precision (op: smca_kernels, for the reference):
    run(inputs) -> (out, gradients) is called
    with fp32_precision "ieee" and "tf32"; each result is held to the reference run with the same
    setting (TF32Matmuls for "tf32"), and the TF32 output must move from the IEEE one by far more
    than float32 rounding (TF32 was used)."""
    from smca_kernels.triton._common import matmul_precision

    results = {}
    for precision in ("ieee", "tf32"):
        exact, exact_g, ref, ref_g = reference_results(op, case, inputs, grad_out, torch.float32, "cpu",
                                                       tf32=precision == "tf32")
        with matmul_precision(precision):
            results[precision] = run(inputs)
        assert results[precision][0].dtype == torch.float32
        assert_within_reference_error(torch.float32, *results[precision], exact, exact_g, ref, ref_g)
    assert relative_error(results["tf32"][0], results["ieee"][0]) > 10 * TOLERANCE[torch.float32], "TF32 unused"
