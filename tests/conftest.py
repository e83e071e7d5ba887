"""Test set-up: without a GPU, Triton kernels run on CPU tensors through its interpreter, which
must be switched on before triton is first imported; the CUDA kernels built for the CPU through
the emulation (tests/cuda_emulation.py), once per session."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def emulated_cuda():
    import cuda_emulation

    return cuda_emulation.build(os.environ.get("SMCA_EMULATION_SANITIZER"))
