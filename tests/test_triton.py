"""The Triton launchers (smca_kernels.triton) called directly: key splits, every autotuning
configuration, the interpreter's arithmetic, and their argument checks.

On the GPU when there is one, else on CPU tensors through Triton's interpreter (conftest.py
switches it on); small shapes. The operator-level Triton cases (against the reference through
the public functions, opcheck of the Triton ops) are in test_ops.py; the GPU cases at the
benchmark shapes in test_gpu.py.
"""
import functools

import pytest
import torch

import smca_kernels as sk
from smca_kernels.triton import backward as triton_backward
from smca_kernels.triton import forward as triton_forward
from smca_kernels.triton._common import matmul_precision
from helpers import (
    TOLERANCE, TRITON_DEVICE, Case, assert_float32_follows_matmul_precision, assert_within_reference_error,
    cut_to_tf32, device_kernel_results, leaves, make_inputs, reference_results, relative_error,
)

if "triton" not in sk.available_backends(TRITON_DEVICE):
    pytest.skip("Triton cannot run here", allow_module_level=True)


def _triton_kernels(num_splits: int):
    """The Triton device kernels with `num_splits` key splits, for device_kernel_results."""
    from smca_kernels.triton import coattention_backward, coattention_forward

    return (functools.partial(coattention_forward, num_splits=num_splits),
            functools.partial(coattention_backward, num_splits=num_splits))


def _check_triton_kernels(case: Case, num_splits: int, seed: int, dtype: torch.dtype = torch.float32) -> None:
    """The Triton device kernels called directly with `num_splits` against the float64 reference,
    forward and every gradient, on TRITON_DEVICE in `dtype` (the 2x rule of
    assert_within_reference_error)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = make_inputs(case, generator)
    grad_out = torch.randn(case.B, case.H, case.Nq, case.D, dtype=torch.float64, generator=generator)
    exact, exact_g, ref, ref_g = reference_results(sk, case, inputs, grad_out, dtype, "cpu")

    t = leaves(inputs, dtype, TRITON_DEVICE)
    out, g, lse = device_kernel_results(*_triton_kernels(num_splits), case, t, grad_out)
    assert out.dtype == dtype and lse.shape == (case.B, case.H, case.Nq, len(case.shapes))
    assert_within_reference_error(dtype, out, g, exact, exact_g, ref, ref_g)


def _split_case(multi: bool) -> Case:
    if multi:
        return Case(Nq=9, D=16, shapes=[(5, 7), (3, 4), (1, 1)], multi=True, mask="empty_level")
    return Case(Nq=9, D=16, shapes=[(6, 7)], mask="random")


@pytest.mark.parametrize("multi", [False, True])
def test_triton_split_keys(multi):
    """The key axis split over programs (num_splits > 1, the GPU path for few queries) against
    the reference, forward and every gradient of the device kernels, in every dtype (the combine
    step rounds once, at the end); with dropout, the split kernels drop what the unsplit ones drop."""
    case = _split_case(multi)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        _check_triton_kernels(case, num_splits=3, seed=7, dtype=dtype)

    generator = torch.Generator().manual_seed(10)
    t = leaves(make_inputs(case, generator), torch.float32, TRITON_DEVICE)
    grad_out = torch.randn(case.B, case.H, case.Nq, case.D, generator=generator)
    (whole, whole_g, whole_lse), (split, split_g, split_lse) = (
        device_kernel_results(*_triton_kernels(n), case, t, grad_out, dropout_p=0.3, seed=1234) for n in (1, 3))
    assert relative_error(split, whole) <= TOLERANCE[torch.float32], "out with dropout"
    finite = whole_lse.isfinite()  # +inf for empty levels
    assert torch.equal(finite, split_lse.isfinite())
    assert relative_error(split_lse[finite], whole_lse[finite]) <= TOLERANCE[torch.float32], "lse with dropout"
    for name, value in whole_g.items():
        assert relative_error(split_g[name], value) <= TOLERANCE[torch.float32], f"grad of {name} with dropout"


@pytest.mark.parametrize("index", range(max(len(triton_forward.FORWARD_TILES), len(triton_backward.DKDV_TILES),
                                            len(triton_backward.DQ_TILES))))
def test_triton_every_tuning_config(index, monkeypatch):
    """On a GPU the autotuner may pick any of its tile configurations for a shape, so each must be
    right: config `index` of every kernel (modulo its count) is forced, the multi-level case runs
    with one and with two key splits. Under the interpreter this checks the GPU tile sizes' masking
    (the interpreter ignores warps and stages)."""
    import triton
    from smca_kernels.triton._common import config

    for kernel, tiles in ((triton_forward._forward_kernel, triton_forward.FORWARD_TILES),
                          (triton_backward._dkdv_kernel, triton_backward.DKDV_TILES),
                          (triton_backward._dq_kernel, triton_backward.DQ_TILES)):
        monkeypatch.setattr(kernel, "configs", [config(tiles[index % len(tiles)])])
    try:
        _check_triton_kernels(_split_case(multi=False), num_splits=1, seed=8)
        for num_splits in (1, 2):
            _check_triton_kernels(_split_case(multi=True), num_splits=num_splits, seed=9)
    except triton.runtime.errors.OutOfResources as error:  # pruned from this GPU's list
        pytest.skip(f"config {index} does not fit this GPU: {error}")


TF32_CASES = [_split_case(multi=False), _split_case(multi=True),
              Case(B=2, H=2, Nq=20, D=32, shapes=[(9, 11)], mask="empty_batch", outside=True, layout="strided")]


@pytest.mark.parametrize("case", TF32_CASES, ids=str)
def test_triton_float32_follows_the_matmul_precision(case):
    """float32 products follow PyTorch's setting (smca_kernels.triton._common.allow_tf32): with
    fp32_precision "tf32" the kernels multiply in TF32, judged by the reference run in TF32
    (helpers.TF32Matmuls), forward and every gradient, and their output moves from the IEEE one by
    far more than float32 rounding (TF32 was used); with "ieee" they are float32-exact (the float32
    rule). Under the interpreter TF32 is the GPU's operand cut (interpreter_fixes)."""
    generator = torch.Generator().manual_seed(21)
    inputs = make_inputs(case, generator)
    grad_out = torch.randn(case.B, case.H, case.Nq, case.D, dtype=torch.float64, generator=generator)
    assert_float32_follows_matmul_precision(
        sk, case, inputs, grad_out,
        lambda x: device_kernel_results(*_triton_kernels(1), case, leaves(x, torch.float32, TRITON_DEVICE), grad_out)[:2])


def test_triton_dot_precision_reads_the_setting():
    from smca_kernels.triton._common import allow_tf32, dot_precision

    for setting, tf32 in (("ieee", False), ("tf32", True)):
        with matmul_precision(setting):
            assert allow_tf32() is tf32
            assert dot_precision(torch.float32) == ("tf32" if tf32 else "ieee")
            assert dot_precision(torch.bfloat16) == dot_precision(torch.float16) == "tf32"  # ignored by 16-bit
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert dot_precision(torch.float32) == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="the Triton interpreter's arithmetic")
def test_interpreter_bfloat16_arithmetic_is_the_gpus():
    """smca_kernels.triton.interpreter_fixes: under the interpreter a bfloat16 tl.dot is the
    float32 product of the operands and a float32 -> bfloat16 cast rounds to nearest even, bit for
    bit as torch does (ties, subnormals, inf and NaN included)."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast_and_dot(x_ptr, y_ptr, a_ptr, b_ptr, c_ptr, n, BLOCK: tl.constexpr, M: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(y_ptr + offs, x.to(tl.bfloat16), mask=offs < n)
        tile = tl.arange(0, M)[:, None] * M + tl.arange(0, M)[None, :]
        tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile).to(tl.bfloat16)))

    generator = torch.Generator().manual_seed(0)
    ulp = 2.0**-8  # of a bfloat16 in [1, 2)
    x = torch.cat([
        torch.randn(900, generator=generator),
        torch.randn(50, generator=generator) * 1e-39,  # float32 and bfloat16 subnormals
        torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), 3.3961e38, 1e-45, -0.0,
                      float("inf"), -float("inf"), float("nan")]),  # ties to even, overflow
    ])
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    a = torch.randn(16, 16, generator=generator).bfloat16()
    b = torch.randn(16, 16, generator=generator)
    c = torch.empty(16, 16)
    cast_and_dot[(1,)](x, y, a, b, c, x.numel(), BLOCK=1024, M=16)

    expected = x.bfloat16()
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y[~y.isnan()].view(torch.int16), expected[~expected.isnan()].view(torch.int16))
    torch.testing.assert_close(c, a.float() @ b.bfloat16().float(), rtol=1e-6, atol=1e-5)


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="the Triton interpreter's arithmetic")
def test_interpreter_tf32_dot_is_the_gpus():
    """Under the interpreter a float32 tl.dot with input_precision="tf32" multiplies the operands
    cut to TF32 (the 13 low mantissa bits cleared), and "ieee" multiplies them as they are."""
    import triton
    import triton.language as tl

    @triton.jit
    def dot(a_ptr, b_ptr, c_ptr, M: tl.constexpr, PRECISION: tl.constexpr):
        tile = tl.arange(0, M)[:, None] * M + tl.arange(0, M)[None, :]
        tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile), input_precision=PRECISION))

    generator = torch.Generator().manual_seed(1)
    a, b = (torch.randn(16, 16, generator=generator) for _ in range(2))
    a[0, :3] = torch.tensor([float("inf"), float("nan"), 1 + 2.0**-11 + 2.0**-20])
    a_cut, b_cut = cut_to_tf32(a), cut_to_tf32(b)
    assert a_cut[0, 2].item() == 1.0  # cut toward zero
    results = {}
    for precision, (x, y) in (("tf32", (a_cut, b_cut)), ("ieee", (a, b))):
        results[precision] = torch.empty(16, 16)
        dot[(1,)](a, b, results[precision], M=16, PRECISION=precision)
        expected = (x.double() @ y.double()).float()
        torch.testing.assert_close(results[precision], expected, rtol=1e-6, atol=1e-5, equal_nan=True)
    assert relative_error(results["tf32"][1:], results["ieee"][1:]) > 1e-5  # the cut is visible


def _triton_args(**changes):
    """Good arguments of the Triton device kernels (two levels), with `changes`."""
    B, H, Nq, L, D = 1, 2, 3, 10, 8
    args = dict(
        q=torch.randn(B, H, Nq, D), k=torch.randn(B, H, L, D), v=torch.randn(B, H, L, D),
        centers=torch.rand(B, H, Nq, 2, 2), precision=torch.rand(B, H, Nq, 2, 2), alpha=torch.rand(B, H, Nq, 2),
        spatial_shapes=[2, 3, 2, 2], key_padding_mask=torch.zeros(B, L, dtype=torch.bool), dropout_p=0.0,
    )
    args.update(changes)
    return {n: t.to(TRITON_DEVICE) if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t
            for n, t in args.items()}


BAD_TRITON = [
    (dict(q=torch.randn(2, 3, 8)), r"q: expected 4 dims \(B, H, N, D\)"),
    (dict(k=torch.randn(1, 2, 10, 4)), r"k: expected shape \(B, H, L, D\) = \(1, 2, L, 8\)"),
    (dict(v=torch.randn(1, 2, 9, 8)), r"v: expected the shape of k"),
    (dict(q=torch.randn(1, 2, 3, 8).double(), k=torch.randn(1, 2, 10, 8).double(), v=torch.randn(1, 2, 10, 8).double()),
     r"q: the 'triton' kernel takes \(torch.float32, torch.float16, torch.bfloat16\), got torch.float64"),
    (dict(v=torch.randn(1, 2, 10, 8).half()), r"q, k, v: expected one dtype"),
    (dict(q=torch.randn(1, 2, 3, 256), k=torch.randn(1, 2, 10, 256), v=torch.randn(1, 2, 10, 256)),
     r"q: the 'triton' kernel takes head dims 1\.\.128, got 256"),
    (dict(spatial_shapes=[2, 3, 2]), r"spatial_shapes: expected \[H0, W0, H1, W1, \.\.\.\]"),
    (dict(spatial_shapes=[2, 5, 0, 2]), r"spatial_shapes: expected one or more positive \(Hf, Wf\) pairs"),
    (dict(spatial_shapes=[2, 3, 1, 2]), r"spatial_shapes: \[\(2, 3\), \(1, 2\)\] cover 8 keys, but k and v have L = 10"),
    (dict(centers=torch.rand(1, 2, 3, 2)), r"centers: expected shape \(B, H, Nq, S, 2\) = \(1, 2, 3, 2, 2\)"),
    (dict(precision=torch.rand(1, 2, 3, 2, 2).double()), r"precision: expected dtype torch.float32 \(for q of torch.float32\)"),
    (dict(alpha=torch.rand(1, 2, 3, 1)), r"alpha: expected shape \(B, H, Nq, S\) = \(1, 2, 3, 2\)"),
    (dict(alpha=torch.rand(1, 2, 3, 2).half()), r"alpha: expected dtype torch.float32"),
    (dict(alpha=None), r"alpha: required to mix 2 levels"),
    (dict(key_padding_mask=torch.zeros(1, 9, dtype=torch.bool)), r"key_padding_mask: expected shape \(B, L\) = \(1, 10\)"),
    (dict(key_padding_mask=torch.zeros(1, 10)), r"key_padding_mask: expected dtype torch.bool"),
    (dict(v=torch.randn(1, 2, 10, 8, device="meta")), r"q, k, v: expected one device"),
    (dict(dropout_p=1.0), r"dropout_p: expected 0 <= dropout_p < 1"),
]


@pytest.mark.parametrize("changes,message", BAD_TRITON)
def test_triton_kernels_check_their_input(changes, message):
    """The Triton device kernels are callable directly (and by a custom op): bad input raises a
    message that names the argument, before any launch."""
    from smca_kernels.triton import coattention_backward, coattention_forward

    a = _triton_args(**changes)
    args = (a["q"], a["k"], a["v"], a["centers"], a["precision"], a["alpha"])
    rest = (a["spatial_shapes"], a["key_padding_mask"], 0.5, a["dropout_p"], 0)
    with pytest.raises((ValueError, TypeError), match=message):
        coattention_forward(*args, *rest)
    good = _triton_args()
    out, out_levels, lse = coattention_forward(*(good[n] for n in ("q", "k", "v", "centers", "precision", "alpha")),
                                               good["spatial_shapes"], good["key_padding_mask"], 0.5, 0.0, 0)
    with pytest.raises((ValueError, TypeError), match=message):
        coattention_backward(torch.ones_like(out), *args, out_levels, lse, *rest)


def test_triton_backward_checks_the_saved_tensors():
    from smca_kernels.triton import coattention_backward, coattention_forward

    a = _triton_args()
    args = (a["q"], a["k"], a["v"], a["centers"], a["precision"], a["alpha"])
    rest = (a["spatial_shapes"], a["key_padding_mask"], 0.5, 0.0, 0)
    out, out_levels, lse = coattention_forward(*args, *rest)
    for bad, message in ((dict(grad_out=out[:, :1]), r"grad_out: expected shape \(1, 2, 3, 8\)"),
                         (dict(out_levels=out_levels.half()), r"out_levels: expected shape .* dtype torch.float32"),
                         (dict(lse=lse[..., :1]), r"lse: expected shape \(1, 2, 3, 2\)")):
        saved = {"grad_out": torch.ones_like(out), "out_levels": out_levels, "lse": lse, **bad}
        with pytest.raises(ValueError, match=message):
            coattention_backward(saved["grad_out"], *args, saved["out_levels"], saved["lse"], *rest)
