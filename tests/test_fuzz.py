"""A property-based fuzz (hypothesis) of every kernel backend that runs here against the reference:
the C++ CPU kernel at every ISA level, the Triton kernels (on the GPU, else under the
interpreter) and the CUDA kernels through the emulation (tests/cuda_emulation.py). Each case
draws shapes (odd and 1-sized, one or several levels), a dtype, key padding (none, random, fully
padded batch elements and levels), head-shared centres, centres outside the map, q, k, v in any
storage order (also every other element), dropout, TF32 and key splits; forward and every
gradient are judged by the rule of helpers.assert_within_reference_error, and padded keys must
get exactly zero gradients, fully padded batch elements exactly zero output and gradients.

Dropout: the C++ CPU kernel's mask for the case's seed (what every kernel must drop: they share
the Philox numbers) is applied to the reference's weights in place of F.dropout's, so that
dropout cases are judged against the reference by the same rule.

CI (make test) runs a few derandomized cases per backend (profile "ci" below); `make fuzz` runs
FUZZ_EXAMPLES per backend from a printed seed (profile "fuzz"). A failure prints the falsifying FuzzCase,
whose `seed` draws every tensor, and the backend (and ISA level) that failed:
`check("cpu", FuzzCase(...), isas=["avx2"])` reproduces it, as does the printed
@reproduce_failure blob.
"""
import functools
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple
from unittest import mock

import pytest
import torch

import smca_kernels as sk
from helpers import (
    TRITON_DEVICE, Case, assert_within_reference_error, call, device_kernel_results, grads, leaves,
    make_inputs, reference_results,
)
from smca_kernels.triton._common import matmul_precision

pytest.importorskip("hypothesis")  # .ci/gpu's python may lack it
from hypothesis import Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

# CI: the same cases on every run, so that it cannot flake, a failure reported as found (shrinking
# an interpreter case takes minutes). make fuzz (FUZZ_EXAMPLES set): drawn from --hypothesis-seed,
# failures shrunk, kept in build/hypothesis and replayed first on the next run. Neither runs the
# explain phase (minutes of reruns to name the lines only failing cases reach).
settings.register_profile("ci", derandomize=True, deadline=None, database=None, print_blob=True,
                          phases=(Phase.explicit, Phase.generate))
settings.register_profile("fuzz", deadline=None, print_blob=True,
                          phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
                          database=DirectoryBasedExampleDatabase(Path(__file__).parents[1] / "build" / "hypothesis"))
FUZZ_EXAMPLES = os.environ.get("FUZZ_EXAMPLES")
settings.load_profile("fuzz" if FUZZ_EXAMPLES else "ci")
# Found by make fuzz and still open (docs/kernels.md, Testing), so left out of CI's cases until
# fixed; make fuzz keeps drawing them:
# - TF32 backward (Triton, CUDA): Delta = rowsum(dO * O) takes dO in full float32 where dP = dO v^T
#   takes it cut to TF32, so dS = P (dP - Delta) is not zero where it should be (one key: 2e-4).
# - the CPU kernel's "default" level (no FMA) errs up to 2.9x the float32 reference (1.2e-5, centres
#   far off the map, D 36), above the 2x rule; avx2 and avx512 stay within it.
CI_LEAVES_OUT = not FUZZ_EXAMPLES


def budget(ci: int):
    """`ci` cases per test in CI; make fuzz runs FUZZ_EXAMPLES."""
    return settings(max_examples=int(FUZZ_EXAMPLES or ci))


@dataclass(frozen=True)
class FuzzCase:
    case: Case  # shapes and levels; outside: centres off the map; layout "strided": head-shared centres
    dtype: torch.dtype
    padding: Optional[Tuple[str, ...]]  # per batch element: "none", "random", "all" or "level<s>"; None: no mask
    layouts: Tuple[str, str, str]  # q, k, v: storage order of the axes ("BHND" contiguous), "/2": every other element
    dropout_p: float
    seed: int  # draws every tensor, and the dropout mask
    tf32: bool = False  # float32 products in TF32 (GPU kernels)
    splits: Optional[int] = None  # Triton: num_splits (None: the public function); emulated CUDA: SM count


# What each backend takes (smca_kernels.checks.KERNEL_LIMITS), in sizes a case runs in tens of
# milliseconds (CPU) or about a second (interpreter, emulation); one case in ten has a level of up
# to `large` x `large` cells (the CPU kernel's tiles are 512 keys, the GPU kernels' 16 to 128).
LIMITS = {
    "cpu": dict(dtypes=(torch.float64, torch.float32), head_dims=st.integers(1, 40), nq=70, side=6, large=24,
                splits=(None,)),
    "triton": dict(dtypes=(torch.float32, torch.float16, torch.bfloat16), head_dims=st.integers(1, 40), nq=24,
                   side=5, large=9, splits=(None, 1, 2, 3)),
    "cuda": dict(dtypes=(torch.float32, torch.float16, torch.bfloat16), head_dims=st.sampled_from((16, 32, 64, 128)),
                 nq=40, side=5, large=12, splits=(2, 64)),
}

layouts = st.tuples(st.permutations("BHND"), st.booleans()).map(lambda x: "".join(x[0]) + ("/2" if x[1] else ""))


@st.composite
def fuzz_cases(draw, backend: str) -> FuzzCase:
    limits = LIMITS[backend]
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    side = st.integers(1, limits["side"])
    shapes = draw(st.lists(st.tuples(side, side), min_size=1, max_size=3))
    if draw(st.integers(0, 9)) == 9:
        large = st.integers(limits["large"] // 2, limits["large"])
        shapes[0] = draw(st.tuples(large, large))
    case = Case(B=B, H=H, Nq=draw(st.integers(1, limits["nq"])), D=draw(limits["head_dims"]), shapes=shapes,
                multi=len(shapes) > 1 or draw(st.booleans()), outside=draw(st.booleans()),
                layout=draw(st.sampled_from(("contiguous", "strided"))))
    kinds = ("none", "random", "all", *(f"level{s}" for s in range(len(shapes))))
    dtype = draw(st.sampled_from(limits["dtypes"]))
    return FuzzCase(
        case=case, dtype=dtype, padding=draw(st.none() | st.tuples(*[st.sampled_from(kinds)] * B)),
        layouts=draw(st.tuples(layouts, layouts, layouts)), dropout_p=draw(st.sampled_from((0.0, 0.3, 0.75))),
        seed=draw(st.integers(0, 2**31 - 1)),
        tf32=backend != "cpu" and dtype == torch.float32 and not CI_LEAVES_OUT and draw(st.booleans()),
        splits=draw(st.sampled_from(limits["splits"])),
    )


def padding_mask(fc: FuzzCase, generator: torch.Generator) -> Optional[torch.Tensor]:
    """(B, L) key_padding_mask of fc.padding; "random" pads each key with a probability drawn per element."""
    if fc.padding is None:
        return None
    mask = torch.zeros(fc.case.B, fc.case.L, dtype=torch.bool)
    starts = torch.tensor([0] + [h * w for h, w in fc.case.shapes]).cumsum(0).tolist()
    for b, kind in enumerate(fc.padding):
        if kind != "none":
            mask[b] = torch.rand(fc.case.L, generator=generator) < torch.rand(1, generator=generator)
        if kind == "all":
            mask[b] = True
        elif kind.startswith("level"):
            s = int(kind[5:])
            mask[b, starts[s]: starts[s + 1]] = True
    return mask


def relaid(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A leaf holding t's values with the axes stored in `layout`'s order ("BHND" is contiguous);
    "/2" stores them at every other element of the innermost storage axis."""
    order, step = layout[:4], 2 if layout.endswith("/2") else 1
    shape = [t.shape["BHND".index(a)] for a in order]
    storage = t.new_empty(*shape[:-1], shape[-1] * step)[..., ::step]
    view = storage.permute([order.index(a) for a in "BHND"])
    with torch.no_grad():
        view.copy_(t)
    return view.requires_grad_(True)


def cpu_ops():
    return torch.ops.smca._coattention_forward, torch.ops.smca._coattention_backward


def dropout_keep(fc: FuzzCase) -> torch.Tensor:
    """(B, H, Nq, L) bool: the weights the C++ CPU kernel keeps for fc.seed. With q = k = 0, no
    prior and v = I, the output is the dropped weights themselves (the mask depends on the
    seed and the element's (b, h, i, j) alone)."""
    B, H, Nq, L = fc.case.B, fc.case.H, fc.case.Nq, fc.case.L
    probe = Case(B=B, H=H, Nq=Nq, D=L, shapes=[(1, L)])
    zeros = functools.partial(torch.zeros, dtype=torch.float64)
    t = dict(q=zeros(B, H, Nq, L), k=zeros(B, H, L, L), v=torch.eye(L, dtype=torch.float64).expand(B, H, L, L),
             centers=zeros(B, H, Nq, 2), precision=zeros(B, H, Nq, 2), mask=None)
    out, _, _ = device_kernel_results(*cpu_ops(), probe, t, zeros(B, H, Nq, L), fc.dropout_p, fc.seed)
    return out != 0


def expected_results(fc: FuzzCase, inputs: dict, grad_out: torch.Tensor):
    """reference_results of the case; with dropout, the reference drops what the kernels drop."""
    if fc.dropout_p == 0.0:
        return reference_results(sk, fc.case, inputs, grad_out, fc.dtype, "cpu", tf32=fc.tf32)
    keep, p = dropout_keep(fc), fc.dropout_p
    op = types.SimpleNamespace(**{name: functools.partial(getattr(sk, name), dropout_p=p)
                                  for name in ("gaussian_coattention", "scale_selective_coattention")})
    with mock.patch.object(sk.reference.F, "dropout", lambda weights, *_: weights * keep.to(weights.dtype) / (1 - p)):
        return reference_results(op, fc.case, inputs, grad_out, fc.dtype, "cpu", tf32=fc.tf32)


def kernel_results(backend: str, fc: FuzzCase, inputs: dict, grad_out: torch.Tensor, kernels=None):
    """The kernel's output and gradients: through the public function where it can, else the
    device ops (a given seed, key splits, the emulated CUDA kernels)."""
    t = leaves(inputs, fc.dtype, TRITON_DEVICE if backend == "triton" else "cpu")
    t.update((name, relaid(t[name], layout)) for name, layout in zip("qkv", fc.layouts))
    if backend != "cuda" and fc.dropout_p == 0.0 and fc.splits is None:
        out = call(sk, fc.case, t, backend)
        return out, grads(out, t, grad_out.to(device=out.device, dtype=out.dtype))
    if backend == "triton":
        from smca_kernels.triton import coattention_backward, coattention_forward

        kernels = (functools.partial(coattention_forward, num_splits=fc.splits),
                   functools.partial(coattention_backward, num_splits=fc.splits))
    out, g, _ = device_kernel_results(*kernels or cpu_ops(), fc.case, t, grad_out, fc.dropout_p, fc.seed)
    return out, g


def check(backend: str, fc: FuzzCase, kernels=None, isas=(None,)) -> None:
    """One case: `backend`'s forward and every gradient against the reference, at each CPU ISA
    level of `isas` (SMCA_CPU_ISA; None: as set); kernels: the emulated CUDA module's forward
    and backward for backend "cuda"."""
    generator = torch.Generator().manual_seed(fc.seed)
    inputs = make_inputs(fc.case, generator)
    inputs["mask"] = padding_mask(fc, generator)
    grad_out = torch.randn(fc.case.B, fc.case.H, fc.case.Nq, fc.case.D, dtype=torch.float64, generator=generator)
    expected = expected_results(fc, inputs, grad_out)
    for isa in isas:
        env = {"SMCA_EMULATED_SMS": str(fc.splits)} if backend == "cuda" else {}
        env.update({"SMCA_CPU_ISA": isa} if isa else {})
        with matmul_precision("tf32" if fc.tf32 else "ieee"), mock.patch.dict(os.environ, env):
            out, g = kernel_results(backend, fc, inputs, grad_out, kernels)
        try:
            judge(fc, inputs["mask"], out, g, *expected)
        except AssertionError as error:
            raise AssertionError(f"{backend}{f' at SMCA_CPU_ISA={isa}' if isa else ''}: {error}") from error


def judge(fc: FuzzCase, mask, out, g, exact, exact_g, ref, ref_g) -> None:
    assert out.dtype == fc.dtype and out.shape == exact.shape
    assert_within_reference_error(fc.dtype, out, g, exact, exact_g, ref, ref_g)
    if mask is not None:  # padded keys take no part; a fully padded batch element sees nothing
        for name in ("k", "v"):
            assert not g[name].cpu().abs().amax(dim=(1, 3))[mask].any(), f"grad of {name} at a padded key"
        empty = mask.all(dim=1)
        assert not out.cpu()[empty].any(), "output of a fully padded batch element"
        for name, value in g.items():
            assert not value.cpu()[empty].any(), f"grad of {name} of a fully padded batch element"


@budget(ci=150)
@given(fc=fuzz_cases("cpu"))
def test_fuzz_cpu(fc):
    """Each case at every ISA level this CPU runs (csrc/cpu/isa.h), against one reference."""
    check("cpu", fc, isas=[isa for isa in torch.ops.smca._cpu_isas() if not (CI_LEAVES_OUT and isa == "default")])


@pytest.mark.skipif("triton" not in sk.available_backends(TRITON_DEVICE), reason="Triton cannot run here")
@budget(ci=8)
@given(fc=fuzz_cases("triton"))
def test_fuzz_triton(fc):
    check("triton", fc)


@budget(ci=6)
@given(fc=fuzz_cases("cuda"))
def test_fuzz_emulated_cuda(emulated_cuda, fc):
    check("cuda", fc, kernels=(emulated_cuda.forward, emulated_cuda.backward))
