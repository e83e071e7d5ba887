"""The CUDA kernels of csrc/cuda, run on the CPU through tests/cuda_emulation.h (a thread per CUDA
thread, so small odd shapes): forward and every gradient against the float64 reference in fp32,
fp16 and bf16 (the rule of helpers.allowed_error), with masked keys, empty levels and batch
elements, centres outside the map, strided inputs and splits of the key axis; dropout against
the C++ CPU kernel with the same seed; float32 with TF32 allowed (tensor cores), held to the
rule of the reference run in TF32 (helpers.TF32Matmuls); and that a wrong mma fragment layout in the emulation would be caught. test_gpu.py
runs the same kernels on a GPU; this runs everywhere. `python tests/cuda_emulation.py --sanitizer
thread|address` runs it under TSan or ASan + UBSan.
"""
import math
import zlib

import pytest
import torch

import cuda_emulation
import smca_kernels as sk
from helpers import (Case, allowed_error, assert_float32_follows_matmul_precision, assert_within_reference_error,
                     device_kernel_results, leaves, make_inputs, reference_results, relative_error)
from smca_kernels.triton._common import matmul_precision

CASES = [
    Case(B=1, H=1, Nq=1, D=16, shapes=[(1, 1)]),
    Case(B=2, H=2, Nq=7, D=16, shapes=[(3, 5)], mask="random"),
    Case(B=2, H=2, Nq=19, D=32, shapes=[(9, 11)], mask="empty_batch", outside=True, layout="strided"),
    Case(B=2, H=2, Nq=7, D=16, shapes=[(5, 7), (3, 4), (1, 1)], multi=True, mask="empty_level"),
    Case(B=1, H=2, Nq=70, D=64, shapes=[(16, 17), (5, 6)], multi=True, mask="random"),
    Case(B=1, H=1, Nq=33, D=128, shapes=[(9, 13), (2, 3)], multi=True, outside=True),
]


def inputs_of(case: Case, dropout_p: float = 0.0):
    """The float64 inputs and grad_out of `case`, drawn from a seed of its own."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{case}-{dropout_p}".encode()))
    inputs = make_inputs(case, generator)
    return inputs, torch.randn(case.B, case.H, case.Nq, case.D, dtype=torch.float64, generator=generator)


def check(kernels, case: Case, dtype: torch.dtype, dropout_p: float = 0.0) -> None:
    inputs, grad_out = inputs_of(case, dropout_p)
    if dropout_p == 0.0:
        exact, exact_g, ref, ref_g = reference_results(sk, case, inputs, grad_out, dtype, "cpu")
    else:  # the C++ CPU kernel, which draws the same Philox numbers, in float64 and float32
        ops = (torch.ops.smca._coattention_forward, torch.ops.smca._coattention_backward)
        exact, exact_g, _ = device_kernel_results(*ops, case, leaves(inputs, torch.float64, "cpu"), grad_out, dropout_p, seed=1234)
        ref, ref_g, _ = device_kernel_results(*ops, case, leaves(inputs, torch.float32, "cpu"), grad_out, dropout_p, seed=1234)
    out, g, _ = device_kernel_results(kernels.forward, kernels.backward, case, leaves(inputs, dtype, "cpu"), grad_out,
                                      dropout_p, seed=1234)
    assert out.dtype == dtype
    assert_within_reference_error(dtype, out, g, exact, exact_g, ref, ref_g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_emulated_cuda_matches_reference(emulated_cuda, case, dtype):
    check(emulated_cuda, case, dtype)


# Enough keys for at least four key tiles, so that few query blocks split them.
SPLIT_CASES = [
    Case(B=1, H=1, Nq=5, D=32, shapes=[(12, 23)], mask="random"),
    Case(B=2, H=2, Nq=70, D=64, shapes=[(16, 17), (5, 6)], multi=True, mask="empty_level"),
    Case(B=1, H=1, Nq=33, D=128, shapes=[(9, 13), (2, 3)], multi=True, outside=True, layout="strided"),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
def test_emulated_cuda_key_splits(emulated_cuda, case, monkeypatch):
    """With 64 SMs the few blocks of these cases leave SMs idle, so the kernels split the keys
    (grid.y > 1)."""
    monkeypatch.setenv("SMCA_EMULATED_SMS", "64")
    emulated_cuda.reset_widest_grid_y()
    check(emulated_cuda, case, torch.float32)
    check(emulated_cuda, case, torch.float32, dropout_p=0.3)
    assert emulated_cuda.widest_grid_y() > 1, "no key split"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_emulated_cuda_dropout_matches_cpu(emulated_cuda, case):
    check(emulated_cuda, case, torch.float32, dropout_p=0.3)


def test_emulation_rewrites_every_launch():
    source = cuda_emulation.emulated_source()
    assert "<<<" not in source and "emu::launch(" in source
    assert "TORCH_LIBRARY_IMPL" not in source


def kernel_results(kernels, case: Case, inputs: dict, grad_out: torch.Tensor, dtype: torch.dtype):
    out, g, _ = device_kernel_results(kernels.forward, kernels.backward, case, leaves(inputs, dtype, "cpu"), grad_out)
    return out, g


TF32_CASES = [CASES[1], CASES[2], CASES[3]]  # masks, an empty batch element, centres outside, strided, levels


@pytest.mark.parametrize("case", TF32_CASES, ids=str)
def test_emulated_cuda_tf32(emulated_cuda, case):
    """With TF32 allowed (fp32_precision "tf32", read by the kernels on every call; the emulated
    module shares this process's at::globalContext()) the float32 kernel multiplies on tensor
    cores in TF32: its output and every gradient are held to the rule of the reference run with
    the same setting (helpers.TF32Matmuls), and its output must differ from the IEEE result by
    far more than float32 rounding (TF32 was used); with "ieee" the float32 rule holds."""
    inputs, grad_out = inputs_of(case)
    assert_float32_follows_matmul_precision(
        sk, case, inputs, grad_out, lambda x: kernel_results(emulated_cuda, case, x, grad_out, torch.float32))


def test_emulated_mma_fragment_fault_is_caught(emulated_cuda):
    """A wrong fragment layout in the emulated mma (A's rows groupID and groupID + 8 swapped)
    puts a float16 and a TF32 run far outside their tolerance, forward and backward: the emulated
    tests would catch kernels written for a wrong layout."""
    case = CASES[1]
    inputs, grad_out = inputs_of(case)
    emulated_cuda.set_fragment_fault(True)
    try:
        for dtype, precision in ((torch.float16, "ieee"), (torch.float32, "tf32")):
            exact, exact_g, ref, ref_g = reference_results(sk, case, inputs, grad_out, dtype, "cpu",
                                                           tf32=precision == "tf32")
            with matmul_precision(precision):
                out, g = kernel_results(emulated_cuda, case, inputs, grad_out, dtype)
            for name, actual, expected, reference in [("output", out, exact, ref)] + [
                (f"grad of {n}", g[n], exact_g[n], ref_g[n]) for n in ("q", "k", "v")
            ]:
                allowed = allowed_error(dtype, relative_error(reference, expected))
                assert relative_error(actual, expected) > max(10 * allowed, 0.05), f"{dtype} {name}: fault not seen"
    finally:
        emulated_cuda.set_fragment_fault(False)


def test_emulated_tf32_rounding(emulated_cuda):
    """The emulated cvt.rna.tf32.f32: to nearest with 10 mantissa bits, ties away from zero,
    overflow to infinity, infinities and NaN kept."""
    ulp = 2.0**-10  # of tf32 at 1
    cases = {
        1.0: 1.0, 1 + ulp / 2: 1 + ulp, -(1 + ulp / 2): -(1 + ulp), 1 + ulp / 2 - 2**-23: 1.0,
        1 + 1.5 * ulp: 1 + 2 * ulp, 3 * 2.0**-135: 3 * 2.0**-135, 2.0**-137: 2.0**-136,  # subnormals
        float(torch.finfo(torch.float32).max): float("inf"), float("-inf"): float("-inf"),
    }
    for x, expected in cases.items():
        assert emulated_cuda.to_tf32(x) == expected, x
    assert math.isnan(emulated_cuda.to_tf32(float("nan")))
