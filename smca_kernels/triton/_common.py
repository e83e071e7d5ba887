"""Pieces shared by the forward and backward Triton kernels: the Gaussian log-prior, the dropout
mask, the level table, the argument check and launch heuristics.

Conventions of every kernel in this package:
- Every tensor is contiguous. A program works on one (batch, head) pair `bh = b * H + h` and
  first moves each pointer to that pair's slice (int64 arithmetic); offsets inside the slice are
  then int32. The dropout offset of query row i is taken from `row = bh * Nq + i` in int64.
- Scores are kept in base 2 (multiplied by log2(e)) so that the softmax uses exp2; the saved
  lse is in natural units, as the operator contract says.
- Coordinates, centres, precisions and alpha are float32; matrix products accumulate in float32.
"""
import contextlib
import functools
import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..checks import check_coattention, check_kernel_input, shapes_from_flat

# Globals read inside kernels must be constexpr.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# The interpreter executes every block operation in numpy: one small configuration keeps the
# CPU tests fast. Triton itself decides interpretation when a kernel is decorated, so this
# module-level read agrees with it.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRET:
    from . import interpreter_fixes

    interpreter_fixes.apply()

# Query tile assumed by the split heuristic (the autotuned BLOCK_M may differ).
NOMINAL_BLOCK_M = 64
# A split should own at least this many keys of the largest level, or the combine step costs
# more than the extra parallelism gains.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 16


def config(tile: Tuple[int, int, int, int]) -> triton.Config:
    """The launch configuration of a (BLOCK_M, BLOCK_N, num_warps, num_stages) tuple."""
    m, n, w, s = tile
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


def configs(cuda_tiles: Sequence[tuple], interpret_tile: tuple) -> List[triton.Config]:
    """Autotuning candidates: the GPU tiles, or the one small tile under the interpreter."""
    return [config(tile) for tile in ([interpret_tile] if INTERPRET else cuda_tiles)]


@triton.jit
def log_prior(dx, dy, px, py):
    """logG = -((px dx)^2 + (py dy)^2) with dx = x_j - cx_i, dy = y_j - cy_i, elementwise."""
    tx = px * dx
    ty = py * dy
    return -(tx * tx + ty * ty)


@triton.jit
def load_gaussian(centers_ptr, precision_ptr, idx, row_ok):
    """(cx, cy, px, py) for the (query row, level) pairs idx = row * S + s, 0 past the last row.

    centers_ptr, precision_ptr: (B, H, Nq, S, 2) float32, last axis (x, y).
    """
    cx = tl.load(centers_ptr + 2 * idx, mask=row_ok, other=0.0)
    cy = tl.load(centers_ptr + 2 * idx + 1, mask=row_ok, other=0.0)
    px = tl.load(precision_ptr + 2 * idx, mask=row_ok, other=0.0)
    py = tl.load(precision_ptr + 2 * idx + 1, mask=row_ok, other=0.0)
    return cx, cy, px, py


@triton.jit
def valid_keys(mask_ptr, keys, key_ok, HAS_MASK: tl.constexpr):
    """key_ok without the keys that key_padding_mask ignores.

    mask_ptr: (L,) uint8 row of the batch element, 1 = ignore; keys: global key indices.
    """
    if HAS_MASK:
        ignored = tl.load(mask_ptr + keys, mask=key_ok, other=1)
        key_ok = key_ok & (ignored == 0)
    return key_ok


@triton.jit
def dropout_keep(seed, rows, keys, L, dropout_p):
    """True where attention element (row, key) survives dropout; rows, keys broadcast to the tile.

    The Philox offset ((b * H + h) * Nq + i) * L + j is taken in int64, as in csrc/philox.h.
    """
    offset = rows.to(tl.int64) * L + keys
    return tl.rand(seed, offset) >= dropout_p


@triton.jit
def score_tile(q, k_ptr, v_ptr, mask_ptr, start, local, hi, width, offs_d, d_ok,
               cx, cy, px, py, qk_scale, HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """One key tile of a level against a query tile, as the forward and the dq pass see it.

    q (BLOCK_M, BLOCK_D); local (BLOCK_N,) key indices within the level, those >= hi past its
    end (or this split's share); start: the level's first key; cx .. py (BLOCK_M,) the rows'
    Gaussians. Returns k, v (BLOCK_N, BLOCK_D) tiles, keys (global indices), key_ok (the keys
    in range and unmasked), dx, dy (BLOCK_M, BLOCK_N) offsets from the centres in cells, and
    the base-2 scores scale q k^T log2(e) + logG log2(e), -inf at keys not ok.
    """
    key_ok = local < hi
    keys = start + local
    kv_offs = keys[:, None] * HEAD_DIM + offs_d[None, :]
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
    dx = (local % width).to(tl.float32)[None, :] - cx[:, None]
    dy = (local // width).to(tl.float32)[None, :] - cy[:, None]
    scores = (tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
              + log_prior(dx, dy, px[:, None], py[:, None]) * LOG2E)
    key_ok = valid_keys(mask_ptr, keys, key_ok, HAS_MASK)
    scores = tl.where(key_ok[None, :], scores, float("-inf"))
    return k, v, keys, key_ok, dx, dy, scores


@functools.lru_cache(maxsize=128)
def _level_table(spatial_shapes: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    rows, start = [], 0
    for height, width in zip(spatial_shapes[0::2], spatial_shapes[1::2]):
        rows.append((start, height, width))
        start += height * width
    return torch.tensor(rows, dtype=torch.int32, device=device)


def level_table(spatial_shapes: Sequence[int], device: torch.device) -> torch.Tensor:
    """(S, 3) int32 rows (start, height, width). Kernels read it at run time, so a new image size
    recompiles nothing; it is cached so that repeated shapes copy nothing to the device (which
    also keeps the launch capturable in a CUDA graph after the first call). Read-only."""
    return _level_table(tuple(int(n) for n in spatial_shapes), device)


def level_sizes(spatial_shapes: Sequence[int]) -> List[int]:
    return [h * w for h, w in zip(spatial_shapes[0::2], spatial_shapes[1::2])]


def bucket(n: int) -> int:
    """Autotuning key for a size: the next power of two, so that the many image sizes of
    detection training share a few tuning results instead of re-tuning on every new size."""
    return triton.next_power_of_2(max(int(n), 1))


def block_d(head_dim: int) -> int:
    # tl.dot needs every dimension >= 16; the head dim is padded to a power of two and masked.
    return max(16, triton.next_power_of_2(head_dim))


def allow_tf32() -> bool:
    """Whether float32 matrix products may use TF32 tensor cores: PyTorch's own CUDA matmul
    setting, torch.backends.cuda.matmul.fp32_precision == "tf32", which
    torch.set_float32_matmul_precision("high" or "medium") and the older
    torch.backends.cuda.matmul.allow_tf32 = True also set. PyTorch's default ("highest") is IEEE
    float32. The C++/CUDA kernel reads the same setting (csrc/cuda)."""
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except AttributeError:  # torch < 2.9 has only the older flag
        return bool(matmul.allow_tf32)


@contextlib.contextmanager
def matmul_precision(precision: str):
    """torch.backends.cuda.matmul.fp32_precision set to `precision` ("tf32" or "ieee") inside."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = before


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for q's dtype: float32 products are TF32 (operands cut to 10
    mantissa bits, about 1e-3 relative error per product) only where PyTorch's matmuls would be
    (allow_tf32), else exact IEEE float32; 16-bit operands ignore the setting."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if allow_tf32() else "ieee"


def autotune(tiles: Sequence[tuple], interpret_tile: tuple, key: List[str]):
    """triton.autotune over the GPU `tiles` (or the one interpreter tile) that first leaves out
    the configurations this GPU cannot run well: those that need more shared memory than it has
    (they would fail at launch) and those whose registers spill to local memory where another
    configuration does not spill (register use depends on the dtype, head dim and flags, so a
    static list cannot know). Both are known once a configuration is compiled and loaded, so the
    prune compiles each candidate, which the autotuner would do anyway (the kernels are cached
    for its runs). benchmarks/gpu_resources.py shows what it keeps per GPU."""
    def decorate(fn):
        if INTERPRET:
            return triton.autotune(configs=configs(tiles, interpret_tile), key=key)(fn)

        def usable(candidates, named_args, **kwargs):
            # named_args: the positional arguments in order; kwargs: the launch's keywords, with
            # the autotuner's own grid and warmup
            constexprs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            loaded, refused = [], None
            for candidate in candidates:
                compiled = fn.warmup(*named_args.values(), **constexprs, **candidate.all_kwargs(), grid=(1,))
                try:
                    compiled._init_handles()  # loads it: OutOfResources where it does not fit
                except OutOfResources as error:
                    refused = error
                    continue
                loaded.append((compiled.n_spills, candidate))
            if not loaded:
                raise refused
            fewest = min(spills for spills, _ in loaded)
            return [candidate for spills, candidate in loaded if spills == fewest]

        return triton.autotune(configs=configs(tiles, interpret_tile), key=key,
                               prune_configs_by={"early_config_prune": usable})(fn)
    return decorate


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(batch_heads: int, num_queries: int, largest_level: int,
                       device: torch.device) -> int:
    """How many programs share the keys of one query tile.

    DETR has few queries (300) and many keys (1k-5k), so B * H * ceil(Nq / BLOCK_M) programs may
    not fill the GPU; the key axis is then split until about two programs per SM exist. Off CUDA
    (the interpreter) one split; tests force more with the launchers' num_splits argument.
    """
    if device.type != "cuda":
        return 1
    programs = batch_heads * triton.cdiv(num_queries, NOMINAL_BLOCK_M)
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs),
                      triton.cdiv(largest_level, MIN_KEYS_PER_SPLIT), MAX_SPLITS))


def check_args(q, k, v, centers, precision, alpha, spatial_shapes, key_padding_mask,
               dropout_p) -> int:
    """The operator contract (smca_kernels.checks) in the device ops' form, and what the Triton
    kernels take, so a direct call with bad input raises instead of reading out of bounds.
    spatial_shapes: [H0, W0, H1, W1, ...]. Returns S."""
    shapes = shapes_from_flat(spatial_shapes)
    check_coattention(q, k, v, centers, precision, alpha, shapes, key_padding_mask, dropout_p)
    check_kernel_input("triton", q, centers, precision, alpha, len(shapes))
    return len(shapes)


def dropout_seed(seed: Optional[torch.Tensor], dropout_p: float) -> int:
    """The kernels' Philox key from the ops' `seed` argument (as csrc/checks.cpp reads it): 0
    without dropout, else the value of a one-element int64 CPU tensor; ValueError otherwise."""
    if dropout_p == 0.0:
        return 0
    if not isinstance(seed, torch.Tensor) or seed.device.type != "cpu" or seed.dtype != torch.int64 or seed.numel() != 1:
        got = "None" if seed is None else f"{type(seed).__name__} {getattr(seed, 'dtype', '')} {getattr(seed, 'device', '')}"
        raise ValueError(f"seed: expected a one-element int64 CPU tensor when dropout_p > 0 ({dropout_p}), got {got}")
    return int(seed.item())


def mask_arg(key_padding_mask: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    """The (B, L) mask as uint8 (1 = ignore), or a dummy pointer when there is none."""
    if key_padding_mask is None:
        return dummy
    return key_padding_mask.contiguous().view(torch.uint8)


def live_levels(key_padding_mask: Optional[torch.Tensor], levels: torch.Tensor) -> torch.Tensor:
    """(B, S) uint8, 1 where level s of batch element b has an unpadded key, or `levels` (the
    level_table) as a dummy pointer without a mask, where every level is live. A level with none
    gets out_s = 0 and lse = +inf; a live level whose scores are all -inf (an infinite precision,
    say) gets NaN, as softmax gives. Device ops only (no copy from the host)."""
    if key_padding_mask is None:
        return levels
    ends = (levels[:, 0] + levels[:, 1] * levels[:, 2]).long()  # (S,) one past each level's keys
    unpadded = (~key_padding_mask).to(torch.int32).cumsum(1)[:, ends - 1]  # (B, S) up to each end
    per_level = torch.diff(unpadded, dim=1, prepend=torch.zeros_like(unpadded[:, :1]))
    return (per_level > 0).to(torch.uint8)
