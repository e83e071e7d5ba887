"""The GPU kernels compiled for sm_80 and sm_90 without a GPU (benchmarks/gpu_resources.py): the
model's case compiles in every autotuning configuration of every Triton kernel with no fault (no
compile error; nothing kept for a GPU that exceeds its shared memory or spills; tensor-core
instructions in every 16-bit and TF32 product), the CUDA extension's tile kernels neither spill
nor, in 16-bit and TF32, go without HMMA; and a fault of each kind, planted (tests/planted_faults.py),
is reported. Compiling needs Triton without its interpreter, so each check runs in a child process.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import smca_kernels  # noqa: F401  (loads the extension: torch.ops.smca)

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _has_ptxas() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


pytestmark = pytest.mark.skipif(not _has_ptxas(), reason="Triton's NVIDIA backend (ptxas, cuobjdump) is not installed")


def test_model_case_compiles_for_sm80_and_sm90_without_fault(tmp_path):
    """bf16, TF32 and IEEE float32, head dim 32, padding masks, alpha, dropout, with and without key
    splits: every configuration of every kernel, both architectures, and the CUDA extension's
    kernels where it was built with CUDA."""
    result = _run("benchmarks/gpu_resources.py", "--cases", "model", "--check", "--jobs", "2", "--out", str(tmp_path),
                  timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    with open(tmp_path / "triton_resources.csv") as f:
        rows = list(csv.DictReader(f))
    kernels = {"_forward_kernel", "_combine_kernel", "_preprocess_kernel", "_dkdv_kernel", "_dq_kernel"}
    for arch in ("sm_80", "sm_90"):
        for precision in ("bf16", "fp32-tf32", "fp32-ieee"):
            kept = {r["kernel"] for r in rows if (r["arch"], r["precision"], r["kept"]) == (arch, precision, "True")}
            assert kept == kernels, (arch, precision)
    # the sm_90 16-bit products are wgmma where a warpgroup has 64 rows
    forward = [r for r in rows if (r["kernel"], r["arch"], r["precision"]) == ("_forward_kernel", "sm_90", "bf16")]
    assert all(int(r["hgmma"]) > 0 for r in forward if int(r["dot_rows"]) >= 64)
    if torch.ops.smca._cuda_version():  # built with CUDA: its kernels were checked too
        assert (tmp_path / "cuda_resources.csv").exists()


PLANTED = {
    "too_large_kept": "kept for sm_90 but needs",
    "dot_k8": "CompilationError",
    "no_tensor_core": "no tensor-core instruction (HGMMA expected",
    "spill": "kept, and spills",
    "cuda_without_hmma": "CUDA forward_kernel bf16 D32 sm_90: no HMMA",
}


def test_planted_faults_are_reported():
    """A configuration too large for the GPU kept in its list, a tl.dot of a shape no tensor core
    takes, a 16-bit product without tensor cores, a kernel that spills and a 16-bit CUDA kernel
    without HMMA each fail the check; with the prune on, the too-large configuration is left out
    and nothing fails."""
    result = _run("tests/planted_faults.py", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    found = {}
    for line in result.stdout.splitlines():
        name, faults, kept = line.split("\t")
        found[name] = (faults, kept)
    for name, fault in PLANTED.items():
        assert fault in found[name][0], (name, found[name])
    faults, kept = found["too_large_pruned"]
    assert faults == "" and kept == "64x64 w4 s2", found["too_large_pruned"]
