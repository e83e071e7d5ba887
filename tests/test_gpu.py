"""The GPU kernels (C++/CUDA and Triton) against the reference at the benchmark shapes
(docs/kernels.md, Benchmark shapes), with and without splits of the key axis; their attention
dropout against the C++ CPU kernel's; what backend="auto" does with inputs they do not take.

A kernel's error against the float64 reference must be at most twice the error of the reference
itself computed in the kernel's dtype, with 1e-5 relative as the floor (helpers.TOLERANCE). The
small odd cases are in test_ops.py and every Triton autotuning config in test_triton.py, which
run them on the GPU too. Skipped without a GPU; `bash .ci/gpu` runs them.
"""
import zlib

import pytest
import torch

import smca_kernels as sk
from helpers import (
    Case, assert_within_reference_error, call, check_dropout_against_cpu, grads, leaves, make_inputs,
    reference_results,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = [
    Case(B=2, H=8, Nq=300, D=32, shapes=[(25, 38)], mask="random"),
    Case(B=2, H=8, Nq=300, D=32, shapes=[(50, 76), (25, 38), (13, 19)], multi=True, mask="empty_level"),
    Case(B=2, H=8, Nq=300, D=64, shapes=[(25, 38)], mask="empty_batch", layout="strided"),
    Case(B=1, H=2, Nq=1, D=16, shapes=[(1, 1)]),
    Case(B=2, H=2, Nq=7, D=128, shapes=[(3, 5), (2, 2)], multi=True, outside=True),
    # Few query tiles: both kernels split the keys many ways. Batch 8: enough blocks, no split.
    Case(B=1, H=2, Nq=20, D=32, shapes=[(25, 38), (13, 19)], multi=True, mask="random"),
    Case(B=8, H=8, Nq=300, D=32, shapes=[(25, 38)], mask="random"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _backends():
    return [b for b in ("cuda", "triton") if torch.cuda.is_available() and b in sk.available_backends("cuda")]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gpu_matches_reference(backend, dtype, case):
    if backend not in _backends():
        pytest.fail(f"backend {backend} is not available on this GPU machine: {sk.available_backends('cuda')}")
    generator = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    inputs = make_inputs(case, generator)
    grad_out = torch.randn(case.B, case.H, case.Nq, case.D, dtype=torch.float64, generator=generator)
    exact, exact_g, ref, ref_g = reference_results(sk, case, inputs, grad_out, dtype, "cuda")

    kernel_t = leaves(inputs, dtype, "cuda")
    kernel = call(sk, case, kernel_t, backend)
    kernel_g = grads(kernel, kernel_t, grad_out.to(device="cuda", dtype=dtype))
    assert_within_reference_error(dtype, kernel, kernel_g, exact, exact_g, ref, ref_g)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", CASES[:2] + CASES[5:6], ids=str)
def test_gpu_dropout_matches_cpu(backend, case):
    """Attention dropout at the benchmark shapes (key splits included): the same mask as the C++
    CPU kernel for one seed, forward and every gradient."""
    if backend not in _backends():
        pytest.fail(f"backend {backend} is not available on this GPU machine: {sk.available_backends('cuda')}")
    check_dropout_against_cpu(sk, case, backend, "cuda", dropout_p=0.1)


def test_gpu_auto_takes_the_reference_for_float64():
    """float64 (gradcheck) and head dims the GPU kernels lack run on the reference under "auto"."""
    case = Case(B=1, H=2, Nq=5, D=256, shapes=[(3, 4)], mask="random")
    inputs = make_inputs(case, torch.Generator().manual_seed(0))
    for dtype in (torch.float64, torch.float32):
        t = leaves(inputs, dtype, "cuda")
        torch.testing.assert_close(call(sk, case, t, "auto"), call(sk, case, t, "reference"), rtol=0, atol=0)
