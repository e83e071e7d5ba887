"""The CUDA kernels of csrc/cuda, run on the CPU through tests/cuda_emulation.h (a thread per CUDA
thread, so small odd shapes): forward and every gradient against the float64 reference in fp32,
fp16 and bf16 (the rule of helpers.allowed_error), with masked keys, empty levels and batch
elements, centres outside the map, strided inputs and splits of the key axis; dropout against
the C++ CPU kernel with the same seed. test_gpu.py runs the same kernels on a GPU; this runs
everywhere. `python tests/cuda_emulation.py --sanitizer thread|address` runs it under TSan or
ASan + UBSan.
"""
import zlib

import pytest
import torch

import cuda_emulation
import smca_kernels as sk
from helpers import Case, assert_within_reference_error, device_kernel_results, leaves, make_inputs, reference_results

CASES = [
    Case(B=1, H=1, Nq=1, D=16, shapes=[(1, 1)]),
    Case(B=2, H=2, Nq=7, D=16, shapes=[(3, 5)], mask="random"),
    Case(B=2, H=2, Nq=19, D=32, shapes=[(9, 11)], mask="empty_batch", outside=True, layout="strided"),
    Case(B=2, H=2, Nq=7, D=16, shapes=[(5, 7), (3, 4), (1, 1)], multi=True, mask="empty_level"),
    Case(B=1, H=2, Nq=70, D=64, shapes=[(16, 17), (5, 6)], multi=True, mask="random"),
    Case(B=1, H=1, Nq=33, D=128, shapes=[(9, 13), (2, 3)], multi=True, outside=True),
]


def check(kernels, case: Case, dtype: torch.dtype, dropout_p: float = 0.0) -> None:
    generator = torch.Generator().manual_seed(zlib.crc32(f"{case}-{dropout_p}".encode()))
    inputs = make_inputs(case, generator)
    grad_out = torch.randn(case.B, case.H, case.Nq, case.D, dtype=torch.float64, generator=generator)
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
