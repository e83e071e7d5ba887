"""Numerics at the edges of the float range.

16-bit scores: where q k^T overflows float16 but scale q k^T fits, every path (the reference,
so backend="auto" on the CPU and the attention weights SMCAAttention returns, and the kernels)
gives finite results.

Non-finite inputs: a kernel must not hide them. With one NaN, +inf or -inf in q, k, v, a
centre, a precision or alpha (at a padded key, or in a fully padded level, too), every kernel's
output and every gradient are non-finite exactly where the reference's are, so that training's
non-finite check sees what the reference would make it see. (NaN or inf may differ: inf * 0 and
inf - inf make NaN in one order of operations and inf in another.)

The C++ CPU kernel runs at every ISA level; the Triton kernels on the GPU or under the
interpreter; the CUDA kernels on a GPU and through the emulation (tests/cuda_emulation.h).
"""
import zlib

import pytest
import torch

import smca_kernels as sk
from helpers import (
    TRITON_DEVICE, Case, call, cpu_isa_params, device_kernel_results, grads, leaves, make_inputs, relative_error,
)

# The NaN and inf are deliberate: numpy's warnings about them (the Triton interpreter) are noise.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")


def _overflowing_inputs():
    """q, k, v (1, 2, 4, 32), centres and precision, float64, q and k entries of +-60: q.k up to
    32 * 3600 = 115200 > 65504 (row 0 and key 0 are equal, so it happens), scaled by 32 ** -0.5 at
    most 20365."""
    generator = torch.Generator().manual_seed(5)
    signs = torch.randint(0, 2, (2, 1, 2, 4, 32), generator=generator).double() * 2 - 1
    q, k = 60 * signs
    k[:, :, 0] = q[:, :, 0]
    v = torch.randn(1, 2, 4, 32, generator=generator, dtype=torch.float64)
    centers = torch.rand(1, 2, 4, 2, generator=generator, dtype=torch.float64) * 2
    precision = torch.full((1, 2, 4, 2), 0.3, dtype=torch.float64)
    return q, k, v, centers, precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "auto", "triton", "cuda"])
def test_16bit_scores_that_overflow_before_scaling(backend, dtype):
    device = "cuda" if backend == "cuda" else TRITON_DEVICE if backend == "triton" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    q, k, v, centers, precision = _overflowing_inputs()
    exact = sk.gaussian_coattention(q, k, v, centers, precision, (2, 2), backend="reference")
    q16, k16, v16 = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    out = sk.gaussian_coattention(q16, k16, v16, centers.float().to(device), precision.float().to(device), (2, 2),
                                  backend=backend)
    assert torch.isfinite(out).all()
    assert relative_error(out, exact) < 1e-2  # the weights are one-hot: out is a row of v
    weights = sk.reference.attention_weights(q16, k16, centers.float().unsqueeze(-2).to(device),
                                             precision.float().unsqueeze(-2).to(device), [(2, 2)])
    assert torch.isfinite(weights).all()


def test_16bit_scores_that_overflow_before_scaling_emulated_cuda(emulated_cuda):
    q, k, v, centers, precision = _overflowing_inputs()
    exact = sk.gaussian_coattention(q, k, v, centers, precision, (2, 2), backend="reference")
    coords = [t.float().unsqueeze(3) for t in (centers, precision)]
    out, _, lse = emulated_cuda.forward(q.half(), k.half(), v.half(), *coords, None, [2, 2], None, 32**-0.5, 0.0, None)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert relative_error(out, exact) < 1e-2


CASES = [
    Case(B=2, H=2, Nq=5, D=16, shapes=[(3, 4), (2, 3)], multi=True, mask="empty_level"),
    Case(B=2, H=2, Nq=5, D=16, shapes=[(3, 4)], mask="random"),
]
# (input, where): one element set to the value.
PLACES = [("q", "row"), ("k", "key"), ("k", "padded key"), ("v", "key"), ("v", "padded key"),
          ("v", "padded level"), ("centers", "row"), ("precision", "row"), ("alpha", "row")]
VALUES = [float("nan"), float("inf"), float("-inf")]


def _applies(case: Case, place) -> bool:
    """Whether `case` has the element: alpha with several levels, a fully padded level with the
    empty_level mask."""
    name, where = place
    return (name != "alpha" or case.multi) and (where != "padded level" or case.mask == "empty_level")


def _poisoned_inputs(case: Case, place, value) -> dict:
    """make_inputs(case) in float64 with one element of input `name` at `where` set to `value`."""
    name, where = place
    inputs = make_inputs(case, torch.Generator().manual_seed(zlib.crc32(f"{case}-{place}".encode())))
    mask = inputs["mask"]
    if where == "row":  # query 2 of batch 0, head 1
        inputs[name][0, 1, 2].view(-1)[0] = value
    elif where == "padded level":  # batch 1's first level is all padding
        inputs[name][1, 1, 0, 3] = value
    else:
        keys = mask[0] if where == "padded key" else ~mask[0]
        inputs[name][0, 1, int(keys.nonzero()[0]), 3] = value
    return inputs


def _finite_pattern(out: torch.Tensor, g: dict) -> dict:
    return {"out": torch.isfinite(out).cpu(), **{n: torch.isfinite(t).cpu() for n, t in g.items()}}


def _reference_pattern(case: Case, inputs: dict, grad_out: torch.Tensor) -> dict:
    t = leaves(inputs, torch.float64, "cpu")
    out = call(sk, case, t, "reference")
    return _finite_pattern(out, grads(out, t, grad_out.double()))


def _assert_same_pattern(actual: dict, expected: dict) -> None:
    for name, finite in expected.items():
        extra, missing = ~actual[name] & finite, actual[name] & ~finite
        assert not extra.any() and not missing.any(), (
            f"{name}: non-finite where the reference is finite at {extra.nonzero().tolist()[:4]} "
            f"({extra.sum()} in all), finite where it is not at {missing.nonzero().tolist()[:4]} "
            f"({missing.sum()} in all)")


def _check_public(case: Case, inputs: dict, backend: str, device: str) -> None:
    grad_out = torch.randn(case.B, case.H, case.Nq, case.D, generator=torch.Generator().manual_seed(0))
    t = leaves(inputs, torch.float32, device)
    out = call(sk, case, t, backend)
    actual = _finite_pattern(out, grads(out, t, grad_out.to(device)))
    _assert_same_pattern(actual, _reference_pattern(case, inputs, grad_out))


def _params(values):
    return [pytest.param(case, place, value, id=f"{case}-{place[0]}-{place[1].replace(' ', '_')}-{value}")
            for case in CASES for place in PLACES if _applies(case, place) for value in values]


@pytest.mark.parametrize("isa", cpu_isa_params())
@pytest.mark.parametrize("case,place,value", _params(VALUES))
def test_cpu(isa, case, place, value, monkeypatch):
    monkeypatch.setenv("SMCA_CPU_ISA", isa)
    inputs = _poisoned_inputs(case, place, value)
    _check_public(case, inputs, "cpu", "cpu")


# The interpreter is slow: NaN and +inf (-inf goes the same ways as +inf through the kernels).
@pytest.mark.parametrize("case,place,value", _params(VALUES[:2]))
def test_triton(case, place, value):
    inputs = _poisoned_inputs(case, place, value)
    _check_public(case, inputs, "triton", TRITON_DEVICE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case,place,value", _params(VALUES))
def test_cuda(case, place, value):
    inputs = _poisoned_inputs(case, place, value)
    _check_public(case, inputs, "cuda", "cuda")


@pytest.mark.parametrize("case,place,value", _params(VALUES[:2]))
def test_cuda_emulated(emulated_cuda, case, place, value):
    inputs = _poisoned_inputs(case, place, value)
    grad_out = torch.randn(case.B, case.H, case.Nq, case.D, generator=torch.Generator().manual_seed(0))
    out, g, _ = device_kernel_results(emulated_cuda.forward, emulated_cuda.backward, case,
                                      leaves(inputs, torch.float32, "cpu"), grad_out)
    _assert_same_pattern(_finite_pattern(out, g), _reference_pattern(case, inputs, grad_out))
