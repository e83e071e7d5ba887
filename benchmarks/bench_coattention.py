"""Operator benchmark: smca's co-attention kernels against what a user would write instead.

Run:  python benchmarks/bench_coattention.py [--device cpu|cuda] [--dtype bfloat16] [--batch 2 8]
          [--shapes 25x38 50x76 50x76+25x38+13x19] [--providers naive flex smca ...]
          [--modes fwd fwd_bwd] [--repeats N] [--warmup N] [--padding-mask] [--quick] [--out DIR]

A shape "HxW" is a Gaussian co-attention case; "H0xW0+H1xW1+..." a scale-selective case over
those levels (docs/operators.md). Defaults are the shapes of docs/kernels.md, Benchmark shapes:
batch 2, 8 heads, 300 queries, head dim 32, 25x38 and 50x76 (Gaussian), 50x76+25x38+13x19 = 4997
keys (scale-selective); float32 on CPU, bfloat16 on CUDA. Without --padding-mask no key padding
mask is used (the default).

Providers (one setup function each; all get the same inputs and compute the same function,
except the floor):
  naive        smca_kernels.reference (backend="reference"): materialises the (B, H, Nq, L)
               scores and logG; autograd backward.
  sdpa_mask    F.scaled_dot_product_attention with the materialised float bias (logG, -inf at
               padded keys) as attn_mask; the bias is built from centers/precision in the call,
               so the gradient reaches them (on CUDA: the memory-efficient backend).
  sdpa_folded  the bias is rank 4 once the per-query constant is dropped (docs/operators.md,
               The rank-4 bias):
               q' = [scale q, -px^2, 2 px^2 cx, -py^2, 2 py^2 cy], k' = [k, x^2, x, y^2, y];
               q', k' and v zero-padded to a multiple of 8 (32 + 4 -> 40) so that SDPA keeps its
               fast path, SDPA with scale=1, output sliced back to D. A padding mask can only be
               a boolean attn_mask here.
  flex         FlexAttention with a score_mod that computes logG from the key index and captured
               per-(b, h, query) centres and precisions; the whole call is torch.compile'd
               (dynamic=True on CUDA). Its CPU backward is not supported by PyTorch: those rows
               are reported as skipped with PyTorch's message.
  sdpa_nobias  plain SDPA with no bias over all L keys (one call, also for scale-selective):
               the floor a fused kernel should approach.
  smca-<b>     our kernels, gaussian_coattention / scale_selective_coattention(backend=b):
               "cpu" on CPU; "triton" and "cuda" on CUDA.
For scale-selective cases sdpa_mask, sdpa_folded and flex make one attention call per level and
mix the outputs by alpha, as a user would.

Modes:
  fwd      inference: inputs without requires_grad, under torch.no_grad.
  fwd_bwd  forward, then torch.autograd.grad of the output (with a fixed random grad_out) to
           q, k, v, centers, precision and alpha (sdpa_nobias: q, k, v).

Metrics:
  median_ms  median over --repeats rounds after --warmup rounds (plus one checked call that also
             compiles); a round calls every provider once, in turn, the first one rotating, so
             that a change in the machine's speed during the run affects all providers alike.
             CPU: time.perf_counter around each call. CUDA: a torch.cuda.Event pair around each
             call, synchronised after all of them.
  peak_mib   peak extra memory of one call: the most memory the call holds at once above what was
             allocated before it (its own outputs included), in MiB.
             CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus
             torch.cuda.memory_allocated before the call.
             CPU: the call runs once under torch.profiler(profile_memory=True); the allocation and
             free events of c10's CPU allocator, in time order, are summed and the peak of the
             running sum is taken. This counts tensor memory exactly as the CUDA figure does. It
             does not count memory a kernel takes outside c10's allocator (e.g. malloc inside an
             OpenMP region). ru_maxrss was not used: it is the high-water mark of the whole process
             (allocator cache, compiler, earlier calls), so it would need a fresh process per
             measurement and would still include the interpreter's own growth.
  x_naive    naive time / provider time (speed-up over naive).
  x_floor    provider time / sdpa_nobias time (1.0 = the Gaussian costs nothing).
  GFLOP/s    attention's matrix products per second: 4 B H Nq L D flops forward (q k^T, P v),
             14 forward + backward (five more products backward), whatever a provider computes.
  of peak    GFLOP/s / the float32 FMA peak of the threads used (CPU): measured by a loop of
             independent FMAs at the ISA level smca's C++ kernels run at, so at the clock the cores
             really reach; the nominal figure (cores x the clock in /proc/cpuinfo x FMA width) is
             printed beside it. The header also prints the CPU model, its vector ISA, and the ISA
             levels of smca's kernels (SMCA_CPU_ISA), of ATen (ATEN_CPU_CAPABILITY) and of oneDNN and
             MKL (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS): set all four to time an AVX2 machine
             on an AVX-512 one.
  err        max |out - ref| of the forward output, ref = the naive operator in float64 on the
             same inputs. naive's own err shows the rounding level of the dtype.
  grad_err   (fwd_bwd) max over the inputs of max |g - g_ref| / max |g_ref|, same reference.
             sdpa_nobias computes another function: it is not checked.
A provider that fails (unsupported, out of memory, ...) is reported as skipped with the reason.
Outputs: a table on stdout and coattention_cuda_<dtype>.csv / .png, or
coattention_cpu_<smca-cpu ISA level>_<dtype>.csv / .png, in --out (runs/bench by default, so that
a partial run does not replace the committed tables: make bench writes those, to benchmarks/results).
"""
import argparse
import dataclasses
import gc
import itertools
import math
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from common import cpu_description, device_name, write_csv  # this folder: the scripts' shared helpers
from smca_kernels import available_backends, gaussian_coattention, reference, scale_selective_coattention

Shape = Tuple[int, int]
DEFAULT_SHAPES = ["25x38", "50x76", "50x76+25x38+13x19"]
QUICK_SHAPES = ["5x7", "9x11", "6x8+3x4+2x2"]
BASELINES = ["naive", "sdpa_mask", "sdpa_folded", "flex", "sdpa_nobias"]
MODES = ["fwd", "fwd_bwd"]


# ----------------------------------------------------------------------------------------------
# Cases and inputs
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    shapes: List[Shape]  # one (Hf, Wf) per level; one level = a Gaussian case
    batch: int
    heads: int
    queries: int
    dim: int

    @property
    def op(self) -> str:
        return "gaussian" if len(self.shapes) == 1 else "scale_selective"

    @property
    def shape_name(self) -> str:
        return "+".join(f"{h}x{w}" for h, w in self.shapes)


@dataclasses.dataclass
class Inputs:
    q: Tensor  # (B, H, Nq, D)
    k: Tensor  # (B, H, L, D)
    v: Tensor  # (B, H, L, D)
    centers: Tensor  # (B, H, Nq, 2) Gaussian, (B, H, Nq, S, 2) scale-selective; float32
    precision: Tensor  # same shape as centers
    alpha: Optional[Tensor]  # (B, H, Nq, S) scale-selective, None for Gaussian
    shapes: List[Shape]
    mask: Optional[Tensor]  # (B, L) bool, True = ignore the key
    scale: float

    def leaves(self) -> Dict[str, Tensor]:
        names = ["q", "k", "v", "centers", "precision"] + (["alpha"] if self.alpha is not None else [])
        return {name: getattr(self, name) for name in names}

    def levels(self):
        """(level index, (Hf, Wf), first key, end key) for each level."""
        starts = itertools.accumulate((h * w for h, w in self.shapes), initial=0)
        for s, (shape, start) in enumerate(zip(self.shapes, starts)):
            yield s, shape, start, start + shape[0] * shape[1]

    def level_coords(self) -> Tuple[Tensor, Tensor]:
        """centers, precision with a level axis: (B, H, Nq, S, 2)."""
        if self.alpha is None:
            return self.centers.unsqueeze(3), self.precision.unsqueeze(3)
        return self.centers, self.precision


def make_inputs(case: Case, dtype: torch.dtype, device: torch.device, padding_mask: bool,
                requires_grad: bool, seed: int = 0) -> Inputs:
    """Random inputs, the same for a given case and seed whatever the dtype, device and mode."""
    gen = torch.Generator().manual_seed(seed)
    B, H, Nq, D, S = case.batch, case.heads, case.queries, case.dim, len(case.shapes)
    L = sum(h * w for h, w in case.shapes)
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for n in (Nq, L, L))
    size = torch.tensor([[w, h] for h, w in case.shapes], dtype=torch.float32)  # (S, 2) as (x, y)
    centers = torch.rand(B, H, Nq, S, 2, generator=gen) * size  # anywhere on each map
    precision = (0.5 + torch.rand(B, H, Nq, S, 2, generator=gen)) / math.sqrt(8.0)  # a / sqrt(beta)
    alpha = torch.softmax(torch.randn(B, H, Nq, S, generator=gen), dim=-1)
    mask = None
    if padding_mask:
        # The second half of the batch holds narrower images: the right quarter of every
        # level's columns is padding.
        mask = torch.cat([(torch.arange(w) >= w - w // 4).repeat(h) for h, w in case.shapes])  # (L,)
        mask = mask & (torch.arange(B) >= B // 2)[:, None]  # (B, L)
        mask = mask.to(device)
    if S == 1:
        centers, precision, alpha = centers.squeeze(3), precision.squeeze(3), None

    def leaf(t: Tensor, to_dtype: torch.dtype) -> Tensor:
        return t.to(device=device, dtype=to_dtype).requires_grad_(requires_grad)

    coord = torch.float64 if dtype == torch.float64 else torch.float32
    return Inputs(
        q=leaf(q, dtype), k=leaf(k, dtype), v=leaf(v, dtype),
        centers=leaf(centers, coord), precision=leaf(precision, coord),
        alpha=None if alpha is None else leaf(alpha, coord),
        shapes=list(case.shapes), mask=mask, scale=D ** -0.5,
    )


# ----------------------------------------------------------------------------------------------
# Providers: setup(inputs) -> a callable that runs the forward and returns (B, H, Nq, D)
# ----------------------------------------------------------------------------------------------
def setup_smca(backend: str) -> Callable[[Inputs], Callable[[], Tensor]]:
    """naive (backend="reference") and our kernels: the public functional API."""

    def setup(inp: Inputs) -> Callable[[], Tensor]:
        if inp.alpha is None:
            return lambda: gaussian_coattention(
                inp.q, inp.k, inp.v, inp.centers, inp.precision, inp.shapes[0], inp.mask,
                scale=inp.scale, backend=backend,
            )
        return lambda: scale_selective_coattention(
            inp.q, inp.k, inp.v, inp.centers, inp.precision, inp.alpha, inp.shapes, inp.mask,
            scale=inp.scale, backend=backend,
        )

    return setup


def _mix_levels(inp: Inputs, attend) -> Tensor:
    """sum_s alpha_s attend(s, (Hf, Wf), k_s, v_s, mask_s); just attend(0, ...) without alpha.

    k_s, v_s (B, H, n_s, D) and mask_s (B, n_s) bool or None are level s's slices.
    """
    outs = []
    for s, shape, start, end in inp.levels():
        mask = None if inp.mask is None else inp.mask[:, start:end]
        outs.append(attend(s, shape, inp.k[:, :, start:end], inp.v[:, :, start:end], mask))
    if inp.alpha is None:
        return outs[0]
    return sum(inp.alpha[..., s, None].to(out.dtype) * out for s, out in enumerate(outs))


def _sdpa_keep(mask: Optional[Tensor]) -> Optional[Tensor]:
    """(B, n) True = ignore -> SDPA's boolean attn_mask (B, 1, 1, n), True = take part."""
    return None if mask is None else ~mask[:, None, None, :]


def setup_sdpa_mask(inp: Inputs) -> Callable[[], Tensor]:
    """SDPA with logG materialised as a float attn_mask (B, H, Nq, n_s), -inf at padded keys."""
    centers, precision = inp.level_coords()

    def attend(s, shape, k, v, mask):
        bias = reference.gaussian_log_prior(centers[..., s, :], precision[..., s, :], shape).to(inp.q.dtype)
        if mask is not None:
            bias = bias.masked_fill(mask[:, None, None, :], float("-inf"))
        return F.scaled_dot_product_attention(inp.q, k, v, attn_mask=bias, scale=inp.scale)

    return lambda: _mix_levels(inp, attend)


def _grid_features(shape: Shape, device: torch.device) -> Tensor:
    """(n, 4) key features [x^2, x, y^2, y] of an (Hf, Wf) map in row-major key order."""
    height, width = shape
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    x, y = xs.reshape(-1), ys.reshape(-1)
    return torch.stack([x * x, x, y * y, y], dim=-1)


def setup_sdpa_folded(inp: Inputs) -> Callable[[], Tensor]:
    """SDPA on q' = [scale q, qbias], k' = [k, kfeat]: q' k'^T = scale q k^T + logG + const(i)."""
    centers, precision = inp.level_coords()
    B, H, Nq, D = inp.q.shape
    dtype = inp.q.dtype
    folded_dim = -(-(D + 4) // 8) * 8  # the next multiple of 8, SDPA's fast head dims

    def attend(s, shape, k, v, mask):
        px2 = precision[..., s, :] ** 2  # (B, H, Nq, 2) as (px^2, py^2)
        c = centers[..., s, :]  # (B, H, Nq, 2)
        qbias = torch.stack([-px2[..., 0], 2 * px2[..., 0] * c[..., 0], -px2[..., 1], 2 * px2[..., 1] * c[..., 1]], -1)
        kfeat = _grid_features(shape, k.device).to(dtype).expand(B, H, -1, 4)  # (B, H, n_s, 4)
        q2 = F.pad(torch.cat([inp.q * inp.scale, qbias.to(dtype)], -1), (0, folded_dim - D - 4))
        k2 = F.pad(torch.cat([k, kfeat], -1), (0, folded_dim - D - 4))
        v2 = F.pad(v, (0, folded_dim - D))
        out = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=_sdpa_keep(mask), scale=1.0)
        return out[..., :D]

    return lambda: _mix_levels(inp, attend)


def _gaussian_score_mod(centers: Tensor, precision: Tensor, width: int, mask: Optional[Tensor]):
    """score_mod adding logG of one level; centers, precision (B, H, Nq, 2) contiguous float32,
    mask (B, n_s) bool or None. (A factory, so that each level's closure keeps its own tensors.)"""
    cx, cy = centers[..., 0].contiguous(), centers[..., 1].contiguous()  # (B, H, Nq) each
    px, py = precision[..., 0].contiguous(), precision[..., 1].contiguous()

    def score_mod(score, b, h, i, j):
        dx = (j % width).to(torch.float32) - cx[b, h, i]
        dy = (j // width).to(torch.float32) - cy[b, h, i]
        score = score - (px[b, h, i] * dx) ** 2 - (py[b, h, i] * dy) ** 2
        if mask is not None:
            score = torch.where(mask[b, j], float("-inf"), score)
        return score

    return score_mod


def setup_flex(inp: Inputs) -> Callable[[], Tensor]:
    """FlexAttention compiled, score_mod = + logG, one call per level.

    Only flex_attention itself is compiled, as PyTorch recommends: Inductor's CPU template
    wants the captured tensors as graph inputs, not computed inside the graph.
    """
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()  # a fresh compile per case, clear of the recompile limit
    flex = torch.compile(flex_attention, dynamic=inp.q.is_cuda)
    centers, precision = inp.level_coords()

    def attend(s, shape, k, v, mask):
        mask = None if mask is None else mask.contiguous()
        score_mod = _gaussian_score_mod(centers[..., s, :], precision[..., s, :], shape[1], mask)
        return flex(inp.q, k, v, score_mod=score_mod, scale=inp.scale)

    return lambda: _mix_levels(inp, attend)


def setup_sdpa_nobias(inp: Inputs) -> Callable[[], Tensor]:
    """The floor: one plain SDPA over all L keys, no Gaussian."""
    return lambda: F.scaled_dot_product_attention(inp.q, inp.k, inp.v, attn_mask=_sdpa_keep(inp.mask), scale=inp.scale)


def smca_backends(device: torch.device) -> List[str]:
    """Our kernels for `device`, built or not (one that is not is reported as skipped with the
    reason). Not "triton" on CPU: its interpreter (TRITON_INTERPRET=1) is a test tool."""
    return ["cpu"] if device.type == "cpu" else ["triton", "cuda"]


def provider_setups(device: torch.device) -> Dict[str, Callable[[Inputs], Callable[[], Tensor]]]:
    setups = {
        "naive": setup_smca("reference"),
        "sdpa_mask": setup_sdpa_mask,
        "sdpa_folded": setup_sdpa_folded,
        "flex": setup_flex,
        "sdpa_nobias": setup_sdpa_nobias,
    }
    setups.update({f"smca-{b}": setup_smca(b) for b in smca_backends(device)})
    return setups


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------
def make_step(forward: Callable[[], Tensor], leaves: Sequence[Tensor], mode: str, grad_out: Tensor):
    """The timed call: fwd returns (out, ()), fwd_bwd returns (out, grads of the leaves)."""
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return forward(), ()

        return step

    def step():
        out = forward()
        return out, torch.autograd.grad(out, leaves, grad_out)

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median_ms(steps: Dict[str, Callable], device: torch.device, warmup: int, repeats: int) -> Dict[str, float]:
    """Median time of each step over `repeats` rounds that call every step once, in turn (the
    first one rotating), after `warmup` such rounds: a change of the machine's speed during the
    run (another tenant, the clock) slows every provider alike, so that their ratios hold."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    _sync(device)
    calls = [name for r in range(repeats) for name in names[r % len(names):] + names[: r % len(names)]]
    if device.type == "cuda":
        events = {name: [] for name in names}
        for name in calls:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            steps[name]()
            end.record()
            events[name].append((start, end))
        torch.cuda.synchronize(device)
        return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) for name, pairs in events.items()}
    times = {name: [] for name in names}
    for name in calls:
        start = time.perf_counter()
        steps[name]()
        times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _cpu_peak_bytes(step) -> int:
    """Peak of the running sum of c10 CPU allocations and frees during one call (profiler)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    allocations = []  # (time ns, +bytes allocated / -bytes freed)
    todo = list(prof.profiler.kineto_results.experimental_event_tree())
    while todo:
        event = todo.pop()
        todo.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            allocations.append((event.start_time_ns, event.extra_fields.alloc_size))
    allocations.sort()
    return max(itertools.accumulate((size for _, size in allocations), initial=0))


def peak_mib(step, device: torch.device) -> float:
    gc.collect()
    if device.type != "cuda":
        return _cpu_peak_bytes(step) / 2**20
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def reference_results(case: Case, device: torch.device, padding_mask: bool, dtype: torch.dtype, grad_out: Tensor):
    """The naive operator in float64 on the benchmark's inputs: out and {leaf name: gradient}."""
    inp = make_inputs(case, dtype, device, padding_mask, requires_grad=False)
    inp64 = dataclasses.replace(inp, **{name: t.double().requires_grad_() for name, t in inp.leaves().items()})
    out = setup_smca("reference")(inp64)()
    grads = torch.autograd.grad(out, list(inp64.leaves().values()), grad_out.double())
    return out.detach(), dict(zip(inp64.leaves(), grads))


def check(out: Tensor, grads: Dict[str, Tensor], ref_out: Tensor, ref_grads: Dict[str, Tensor]) -> Tuple[float, float]:
    """(max abs error of out, max relative-to-max error over the gradients; nan if none)."""
    err = (out.double() - ref_out).abs().max().item()
    grad_err = float("nan")
    for name, grad in grads.items():
        ref = ref_grads[name]
        rel = ((grad.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        grad_err = rel if math.isnan(grad_err) else max(grad_err, rel)
    return err, grad_err


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:120]}"


def attention_gflop(case: Case, mode: str) -> float:
    """The products of attention, 2 B H Nq L D flops each: two forward (q k^T, P v), five more
    backward (recomputed q k^T, dO v^T, P^T dO, dS k, dS^T q)."""
    L = sum(h * w for h, w in case.shapes)
    return (4 if mode == "fwd" else 14) * case.batch * case.heads * case.queries * L * case.dim / 1e9


def run_case(case: Case, mode: str, providers: Dict[str, Callable], args, device, dtype, grad_out, ref,
             peak_gflops: Optional[float]) -> List[dict]:
    """One row per provider for one case and mode; grad_out (B, H, Nq, D) float32, ref from
    reference_results; peak_gflops: the FMA peak the achieved GFLOP/s is a fraction of."""
    ref_out, ref_grads = ref
    rows, steps = {}, {}
    for name, setup in providers.items():
        row = dict(provider=name, op=case.op, shape=case.shape_name, batch=case.batch, mode=mode,
                   median_ms=None, peak_mib=None, err=None, grad_err=None, status="ok")
        rows[name] = row
        try:
            inp = make_inputs(case, dtype, device, args.padding_mask, requires_grad=mode == "fwd_bwd")
            leaves = inp.leaves()
            if name == "sdpa_nobias":  # no Gaussian: no centers, precision, alpha
                leaves = {n: leaves[n] for n in ("q", "k", "v")}
            step = make_step(setup(inp), list(leaves.values()), mode, grad_out.to(dtype))
            out, grads = step()  # the first call also compiles (flex) and warms up
            if name != "sdpa_nobias":
                row["err"], row["grad_err"] = check(out, dict(zip(leaves, grads)), ref_out, ref_grads)
            del out, grads
            row["peak_mib"] = peak_mib(step, device)
            steps[name] = step
        except Exception as error:  # reported in the table as skipped, with the reason
            row.update(median_ms=None, peak_mib=None, status="skipped: " + _reason(error))
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    try:
        for name, ms in interleaved_median_ms(steps, device, args.warmup, args.repeats).items():
            rows[name]["median_ms"] = ms
    finally:
        steps.clear()
        gc.collect()
    # Ratios against naive and the floor on the same case and mode, and the rate of the products.
    times = {name: row["median_ms"] for name, row in rows.items()}
    for row in rows.values():
        t = row["median_ms"]
        row["x_naive"] = times["naive"] / t if t and times.get("naive") else None
        row["x_floor"] = t / times["sdpa_nobias"] if t and times.get("sdpa_nobias") else None
        row["gflops"] = attention_gflop(case, mode) / (t / 1e3) if t else None
        row["x_peak"] = row["gflops"] / peak_gflops if row["gflops"] and peak_gflops else None
    return list(rows.values())


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------
COLUMNS = [  # (key, header, format)
    ("provider", "provider", "{}"), ("op", "op", "{}"), ("shape", "shape", "{}"), ("batch", "B", "{}"),
    ("mode", "mode", "{}"), ("median_ms", "median ms", "{:.3f}"), ("peak_mib", "peak MiB", "{:.1f}"),
    ("x_naive", "x naive", "{:.2f}"), ("x_floor", "x floor", "{:.2f}"), ("gflops", "GFLOP/s", "{:.0f}"),
    ("x_peak", "of peak", "{:.0%}"), ("err", "err", "{:.1e}"),
    ("grad_err", "grad err", "{:.1e}"), ("status", "status", "{}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def print_table(rows: List[dict]) -> None:
    cells = [[header for _, header, _ in COLUMNS]] + [[_cell(r, key, fmt) for key, _, fmt in COLUMNS] for r in rows]
    widths = [max(len(line[c]) for line in cells) for c in range(len(COLUMNS))]
    for n, line in enumerate(cells):
        print("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * width for width in widths))


def print_triton_choices() -> None:
    """The tile configuration Triton's autotuner chose for each kernel and tuning key, so that a
    GPU run shows which of the candidates matter (keys: size buckets, flags, dtypes)."""
    from smca_kernels.triton import backward, forward

    print("Triton autotuning choices (BLOCK_M, BLOCK_N, warps, stages):")
    for name, kernel in (("forward", forward._forward_kernel), ("dkdv", backward._dkdv_kernel),
                         ("dq", backward._dq_kernel)):
        for key, config in kernel.cache.items():
            tile = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
            print(f"  {name:8s} {tile}  key {key}")


def plot(path: Path, rows: List[dict], title: str) -> None:
    """Grouped bars: time (top) and peak memory (bottom) per provider for each case and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return
    groups = list(dict.fromkeys((r["shape"], r["batch"], r["mode"]) for r in ok))
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    value = {(r["shape"], r["batch"], r["mode"], r["provider"]): r for r in ok}
    width = 0.8 / len(providers)
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 2.2 * len(groups)), 8), sharex=True)
    panels = ((axes[0], "median_ms", "median time (ms)"), (axes[1], "peak_mib", "peak extra memory (MiB)"))
    for ax, key, label in panels:
        values = []
        for n, provider in enumerate(providers):
            heights = [value[g + (provider,)][key] if g + (provider,) in value else 0.0 for g in groups]
            offset = (n - (len(providers) - 1) / 2) * width
            ax.bar([x + offset for x in range(len(groups))], heights, width, label=provider)
            values += [h for h in heights if h > 0]
        if values and max(values) / min(values) > 30:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_title(title)
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    axes[1].set_xticks(range(len(groups)))
    axes[1].set_xticklabels([f"{s}\nB={b} {m}" for s, b, m in groups], fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_shape(text: str) -> List[Shape]:
    try:
        shapes = [tuple(int(n) for n in level.split("x")) for level in text.split("+")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW or H0xW0+H1xW1+..., got {text!r}") from None
    if any(len(s) != 2 or min(s) <= 0 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected positive HxW levels, got {text!r}")
    return shapes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"],
                   help="q, k, v dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default 2; --quick 1)")
    p.add_argument("--heads", type=int, help="default 8 (--quick 2)")
    p.add_argument("--queries", type=int, help="default 300 (--quick 20)")
    p.add_argument("--dim", type=int, default=32, help="head dim (default 32)")
    p.add_argument("--shapes", type=parse_shape, nargs="+", help=f"default {' '.join(DEFAULT_SHAPES)}")
    p.add_argument("--providers", nargs="+",
                   help=f"subset of {BASELINES} and smca (all our backends) or smca-<backend> (default all)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    p.add_argument("--padding-mask", action="store_true",
                   help="mask the right quarter of each level for the second half of the batch")
    p.add_argument("--repeats", type=int, help="timed calls (default 5 on CPU, 50 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (default 1 on CPU, 10 on CUDA)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch.set_num_threads (default all cores)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: tiny shapes {' '.join(QUICK_SHAPES)}")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "bench",
                   help="where the CSV and plot go (default runs/bench; make bench: benchmarks/results, the "
                   "committed tables)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.batch = args.batch or ([1] if args.quick else [2])
    args.heads = args.heads or (2 if args.quick else 8)
    args.queries = args.queries or (20 if args.quick else 300)
    args.shapes = args.shapes or [parse_shape(s) for s in (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)]
    args.repeats = args.repeats or (3 if args.quick else 50 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick or not cuda else 10)
    return args


def select_providers(names: Optional[List[str]], device: torch.device) -> Dict[str, Callable]:
    setups = provider_setups(device)
    if not names:
        return setups
    chosen = []
    for name in names:
        matches = [n for n in setups if n == name or (name == "smca" and n.startswith("smca-"))]
        if not matches:
            raise SystemExit(f"unknown provider {name!r}; choose from {list(setups)} or smca")
        chosen += matches
    return {n: setups[n] for n in dict.fromkeys(chosen)}


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    providers = select_providers(args.providers, device)
    meta = dict(device_kind=device.type, device=device_name(device), torch=torch.__version__,
                dtype=args.dtype, threads=torch.get_num_threads(), heads=args.heads,
                queries=args.queries, dim=args.dim, padding_mask=args.padding_mask,
                load_avg_1min=round(os.getloadavg()[0], 2))
    print(f"device: {meta['device']} ({device.type}); torch {torch.__version__}; dtype {args.dtype}; "
          f"threads {torch.get_num_threads()}")
    print(f"H {args.heads}, Nq {args.queries}, D {args.dim}; batch {args.batch}; "
          f"key padding mask: {'yes' if args.padding_mask else 'none'}; warmup {args.warmup}, repeats {args.repeats}")
    peak_gflops = None
    if device.type == "cpu":  # the cores may be shared: say how busy they were
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"load average (1, 5, 15 min): {load} on {os.cpu_count()} cores")
        try:
            cpu = cpu_description(torch.get_num_threads())
        except ValueError as error:  # SMCA_CPU_ISA names no level this CPU runs
            raise SystemExit(f"bench_coattention.py: {error}") from None
        meta.update(cpu)
        peak_gflops = cpu["fma_peak_gflops"]
        forced = f"SMCA_CPU_ISA={os.environ['SMCA_CPU_ISA']}" if os.environ.get("SMCA_CPU_ISA") else "the widest"
        print(f"CPU ISA: {cpu['cpu_isa']}; smca-cpu kernels: {cpu['smca_cpu_isa']} ({forced}); ATen: "
              f"{cpu['aten_capability']}; ONEDNN_MAX_CPU_ISA={cpu['onednn_max_cpu_isa'] or '-'}, "
              f"MKL_ENABLE_INSTRUCTIONS={cpu['mkl_enable_instructions'] or '-'}")
        print(f"float32 FMA peak of {torch.get_num_threads()} threads at the kernels' ISA: {cpu['fma_peak_gflops']} "
              f"GFLOP/s measured (the 'of peak' column); {cpu['nominal_peak_gflops']} GFLOP/s nominal "
              "(the clock in /proc/cpuinfo, 2 FMA units)")
    print(f"available smca backends: {available_backends(device)}; providers: {list(providers)}")
    print("err: max |out - naive in float64|; grad err: max_input max|g - g_ref| / max|g_ref|; "
          "x naive: speed-up over naive; x floor: time / sdpa_nobias time; GFLOP/s: attention's "
          "products (4 B H Nq L D flops forward, 14 forward + backward) per second\n")

    rows = []
    for shapes, batch in itertools.product(args.shapes, args.batch):
        case = Case(shapes, batch, args.heads, args.queries, args.dim)
        out_shape = (batch, args.heads, args.queries, args.dim)
        grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(device)
        ref = reference_results(case, device, args.padding_mask, dtype, grad_out)
        for mode in args.modes:
            case_rows = run_case(case, mode, providers, args, device, dtype, grad_out, ref, peak_gflops)
            print_table(case_rows)
            print()
            rows += case_rows
        del ref

    if device.type == "cuda" and "smca-triton" in providers:
        print_triton_choices()
    args.out.mkdir(parents=True, exist_ok=True)
    level = f"_{meta['smca_cpu_isa']}" if device.type == "cpu" else ""
    stem = args.out / f"coattention_{device.type}{level}_{args.dtype}{'_quick' if args.quick else ''}"
    write_csv(stem.with_suffix(".csv"), rows, [key for key, _, _ in COLUMNS], meta)
    isa = f", kernels {meta['smca_cpu_isa']}, ATen {meta['aten_capability']}" if device.type == "cpu" else ""
    title = (f"smca co-attention, {meta['device']} ({device.type}{isa}), {args.dtype}, "
             f"H {args.heads}, Nq {args.queries}, D {args.dim}")
    plot(stem.with_suffix(".png"), rows, title)
    print(f"\nwrote {stem}.csv and {stem}.png")


if __name__ == "__main__":
    main()
