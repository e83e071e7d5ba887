"""Faults planted in Triton kernels, each of which benchmarks/gpu_resources.py's check must report;
run by tests/test_gpu_compile.py in a process without TRITON_INTERPRET (it compiles for sm_90).
Prints one line per case: its name, the faults found (' | ' between them) and the configurations
the autotuner keeps (', ' between them), tab-separated."""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_resources  # noqa: E402
from smca_kernels.triton import forward  # noqa: E402
from smca_kernels.triton._common import config  # noqa: E402


@triton.jit
def dot_k8(a_ptr, b_ptr, c_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr):
    """A 16-bit tl.dot with K = 8, which no tensor-core instruction takes."""
    rows, cols, inner = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, K)
    a = tl.load(a_ptr + rows[:, None] * K + inner[None, :])
    b = tl.load(b_ptr + inner[:, None] * BLOCK_N + cols[None, :])
    tl.store(c_ptr + rows[:, None] * BLOCK_N + cols[None, :], tl.dot(a, b))


@triton.jit
def product_without_dot(a_ptr, b_ptr, c_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr):
    """A 16-bit matrix product written as a broadcast and a sum: FMA, no tensor core."""
    rows, cols, inner = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, K)
    a = tl.load(a_ptr + rows[:, None] * K + inner[None, :]).to(tl.float32)
    b = tl.load(b_ptr + inner[:, None] * BLOCK_N + cols[None, :]).to(tl.float32)
    tl.store(c_ptr + rows[:, None] * BLOCK_N + cols[None, :], tl.sum(a[:, :, None] * b[None, :, :], 1))


@triton.jit
def register_hog(a_ptr, b_ptr, c_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr):
    """A (BLOCK_M, BLOCK_N) float32 accumulator far larger than one warp's registers."""
    rows, cols, inner = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(4):
        a = tl.load(a_ptr + step * BLOCK_M * K + rows[:, None] * K + inner[None, :])
        b = tl.load(b_ptr + step * K * BLOCK_N + inner[:, None] * BLOCK_N + cols[None, :])
        acc = tl.dot(a, b, acc)
        acc = tl.exp(acc - tl.max(acc, 1)[:, None])  # keeps every element live between products
    tl.store(c_ptr + rows[:, None] * BLOCK_N + cols[None, :], acc)


def _planted(kernel, num_warps: int = 4, **constexprs):
    args = (torch.bfloat16, torch.bfloat16, torch.float32)
    return gpu_resources.compile_rows(kernel, args, dict(constexprs, num_warps=num_warps), 90, dot_rows="BLOCK_M",
                                      precision="bf16", head_dim=constexprs["K"], flags="planted")


def _forward_with(tiles, prune: bool):
    """The real forward launch (bfloat16, head dim 32, one level) with `tiles` as its autotuning
    list, its prune on or off."""
    [launch] = [l for l in gpu_resources.launches(torch.bfloat16, 32, []) if l[0] is forward._forward_kernel]
    kernel, args, kwargs = launch
    saved = kernel.configs, kernel.early_config_prune
    kernel.configs = [config(t) for t in tiles]
    if not prune:
        kernel.early_config_prune = None
    try:
        return gpu_resources.compile_rows(kernel, args, kwargs, 90, precision="bf16", head_dim=32, flags="planted")
    finally:
        kernel.configs, kernel.early_config_prune = saved


# (BLOCK_M, BLOCK_N, warps, stages): one that fits an H100, and one whose pipelined key and value
# tiles need more than its 227 KB of shared memory.
FITS, TOO_LARGE = (64, 64, 4, 2), (16, 512, 4, 5)
def _cuda_rows_without_hmma():
    """The CUDA extension's 16-bit forward kernel as if its SASS had no HMMA (FFMA products)."""
    return [dict(kernel="forward_kernel", arch="sm_90", precision="bf16", head_dim="32", registers=160,
                 static_shared_bytes=0, local_bytes=0, hgmma=0, hmma=0, ffma=300)]


CASES = {
    "too_large_kept": lambda: _forward_with([FITS, TOO_LARGE], prune=False),
    "too_large_pruned": lambda: _forward_with([FITS, TOO_LARGE], prune=True),
    "dot_k8": lambda: _planted(dot_k8, BLOCK_M=64, BLOCK_N=64, K=8),
    "no_tensor_core": lambda: _planted(product_without_dot, BLOCK_M=64, BLOCK_N=32, K=16),
    "spill": lambda: _planted(register_hog, num_warps=1, BLOCK_M=128, BLOCK_N=256, K=16),
}


def main() -> None:
    names = sys.argv[1:] or [*CASES, "cuda_without_hmma"]
    with gpu_resources.compiling_for(90):
        for name in names:
            if name == "cuda_without_hmma":
                print(name, " | ".join(gpu_resources.cuda_violations(_cuda_rows_without_hmma())), "", sep="\t")
                continue
            rows = CASES[name]()
            kept = ", ".join(row["config"] for row in rows if row.get("kept"))
            print(name, " | ".join(gpu_resources.violations(rows)), kept, sep="\t", flush=True)


if __name__ == "__main__":
    main()
