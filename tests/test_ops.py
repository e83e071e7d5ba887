"""The operators: every kernel against the reference, forward and every gradient, plus dropout,
registration (opcheck, torch.compile) and bad input.

The C++ CPU kernel runs always; the Triton kernels run on the GPU when there is one, else on CPU
tensors through the interpreter (small shapes: it is slow); the GPU cases at the benchmark shapes
(docs/kernels.md, Benchmark shapes) are in test_gpu.py.
"""
import zlib

import pytest
import torch

import smca_kernels as sk
from helpers import (
    TOLERANCE, TRITON_DEVICE, Case, assert_within_reference_error, call, check_dropout_against_cpu,
    cpu_isa_params, device_kernel_results, grads, leaves, make_inputs, reference_results, relative_error,
)

CPU_CASES = [
    Case(B=1, H=1, Nq=1, D=8, shapes=[(1, 1)]),
    Case(Nq=7, D=16, shapes=[(3, 5)], mask="random"),
    Case(Nq=7, D=16, shapes=[(3, 5)], outside=True, layout="strided"),
    Case(Nq=300, D=32, shapes=[(25, 38)], mask="empty_batch"),
    Case(Nq=7, D=32, shapes=[(25, 38)], mask="random", outside=True, layout="strided"),
    Case(Nq=1, D=8, shapes=[(1, 1), (2, 3)], multi=True, outside=True),
    Case(Nq=7, D=16, shapes=[(5, 7), (3, 4), (2, 2)], multi=True, mask="empty_level"),
    Case(Nq=300, D=32, shapes=[(25, 38), (13, 19), (7, 10)], multi=True, mask="empty_batch", layout="strided"),
]

# The interpreter executes every program in Python: a few small, odd cases.
TRITON_CASES = [
    Case(B=1, H=1, Nq=1, D=16, shapes=[(1, 1)]),
    Case(Nq=7, D=16, shapes=[(3, 5)], mask="random"),
    Case(Nq=19, D=32, shapes=[(5, 7)], mask="empty_batch", outside=True, layout="strided"),
    Case(Nq=7, D=16, shapes=[(3, 4), (2, 3), (1, 1)], multi=True, mask="empty_level"),
    Case(Nq=5, D=24, shapes=[(3, 4), (2, 3)], multi=True, mask="random", layout="strided"),  # D padded to 32
]

# The CPU cases at every ISA level of the C++ kernels (SMCA_CPU_ISA), each its own code.
PARAMS = [
    pytest.param("cpu", isa.values[0], case, dtype, id=f"cpu-{isa.id}-{str(dtype)[6:]}-{case}", marks=isa.marks)
    for isa in cpu_isa_params() for case in CPU_CASES for dtype in (torch.float64, torch.float32)
]
PARAMS += [
    pytest.param("triton", None, case, dtype, id=f"triton-{str(dtype)[6:]}-{case}")
    for case in TRITON_CASES for dtype in (torch.float32, torch.float16, torch.bfloat16)
]


@pytest.mark.parametrize("backend,isa,case,dtype", PARAMS)
def test_matches_reference(backend, isa, case, dtype, monkeypatch):
    if isa is not None:
        monkeypatch.setenv("SMCA_CPU_ISA", isa)
    generator = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    inputs = make_inputs(case, generator)
    grad_out = torch.randn(case.B, case.H, case.Nq, case.D, dtype=torch.float64, generator=generator)
    exact, exact_g, ref, ref_g = reference_results(sk, case, inputs, grad_out, dtype, "cpu")

    actual_t = leaves(inputs, dtype, TRITON_DEVICE if backend == "triton" else "cpu")
    actual = call(sk, case, actual_t, backend)
    assert actual.dtype == dtype and actual.shape == exact.shape
    actual_g = grads(actual, actual_t, grad_out.to(device=actual.device, dtype=dtype))
    for name in exact_g:
        assert actual_g[name].dtype == actual_t[name].dtype
    assert_within_reference_error(dtype, actual, actual_g, exact, exact_g, ref, ref_g)

    if case.mask == "empty_batch":  # element 1 sees no key: zeros out, zero gradients
        assert actual[1].abs().max() == 0
        for name in ("q", "k", "v"):
            assert actual_g[name][1].abs().max() == 0, name


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("empty", ["no_queries", "no_batch"])
def test_empty_input(backend, multi, empty):
    """No query rows (or an empty batch): an empty output and zero gradients, no launch."""
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    B, Nq = (2, 0) if empty == "no_queries" else (0, 3)
    case = Case(B=B, Nq=Nq, D=16, shapes=[(3, 4), (2, 2)] if multi else [(3, 4)], multi=multi, mask="random")
    t = leaves(make_inputs(case, torch.Generator().manual_seed(3)), torch.float32,
               TRITON_DEVICE if backend == "triton" else backend)
    out = call(sk, case, t, backend)
    assert out.shape == (B, case.H, Nq, case.D)
    grad_out = torch.ones(out.shape, device=out.device)
    for name, grad in grads(out, t, grad_out).items():
        assert grad.shape == t[name].shape and not grad.any(), name


def _cpu_gradcheck(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("mask", ["none", "random"])
def test_gradcheck_gaussian_cpu(dropout_p, mask):
    case = Case(B=2, H=2, Nq=3, D=4, shapes=[(2, 3)], mask=mask)
    t = leaves(make_inputs(case, torch.Generator().manual_seed(0)), torch.float64, "cpu")

    def fn(q, k, v, centers, precision):  # a fixed seed: the backward must redraw the same mask
        return torch.ops.smca._coattention_forward(
            q, k, v, centers.unsqueeze(3), precision.unsqueeze(3), None, [2, 3], t["mask"], 0.5, dropout_p, torch.tensor(1234)
        )[0]

    _cpu_gradcheck(fn, (t["q"], t["k"], t["v"], t["centers"], t["precision"]))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_scale_selective_cpu(dropout_p):
    case = Case(B=2, H=1, Nq=3, D=4, shapes=[(2, 2), (1, 2)], multi=True, mask="empty_level")
    t = leaves(make_inputs(case, torch.Generator().manual_seed(1)), torch.float64, "cpu")

    def fn(q, k, v, centers, precision, alpha):
        return torch.ops.smca._coattention_forward(
            q, k, v, centers, precision, alpha, [2, 2, 1, 2], t["mask"], 0.5, dropout_p, torch.tensor(99)
        )[0]

    _cpu_gradcheck(fn, (t["q"], t["k"], t["v"], t["centers"], t["precision"], t["alpha"]))


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------
def _dropped_weights(backend, dropout_p, B=2, H=2, Nq=16, shape=(4, 8)):
    """With q = k = 0 and no prior every weight is 1/L; v = I (D = L) makes out the dropped
    weight matrix itself, (B, H, Nq, L)."""
    L = shape[0] * shape[1]
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    q = torch.zeros(B, H, Nq, L, device=device)
    eye = torch.eye(L, device=device).expand(B, H, L, L)
    coords = torch.zeros(B, H, Nq, 2, device=device)
    return sk.gaussian_coattention(q, q.new_zeros(B, H, L, L), eye, coords, coords, shape, dropout_p=dropout_p, backend=backend), L


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_dropout_statistics(backend):
    p = 0.3
    torch.manual_seed(0)
    out, L = _dropped_weights(backend, p)
    kept = out != 0
    # Kept weights are scaled by 1 / (1 - p); the dropped fraction is p within 5 sigma.
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1.0 / (L * (1 - p))))
    sigma = (p * (1 - p) / out.numel()) ** 0.5
    assert abs((~kept).float().mean().item() - p) < 5 * sigma
    torch.manual_seed(0)
    assert torch.equal(_dropped_weights(backend, p)[0], out), "same seed, same mask"
    assert not torch.equal(_dropped_weights(backend, p)[0], out), "a new seed, a new mask"


def test_dropout_zero_is_no_dropout():
    case = Case(Nq=7, D=16, shapes=[(3, 5)], mask="random")
    t = leaves(make_inputs(case, torch.Generator().manual_seed(2)), torch.float32, "cpu")
    # p = 1e-12 takes the random path but drops (almost surely) nothing.
    tiny = call(sk, case, t, "cpu", dropout_p=1e-12)
    torch.testing.assert_close(tiny, call(sk, case, t, "cpu", dropout_p=0.0), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("multi", [False, True])
def test_dropout_matches_cpu(backend, multi):
    """The device kernels drop the weights that the C++ CPU kernel drops for the same seed. 272
    keys in 5 tiles of 64 let the CUDA kernel split them (few query blocks)."""
    if backend == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    case = Case(Nq=7, D=16, shapes=[(16, 17), (2, 3)] if multi else [(16, 17)], multi=multi, mask="random")
    check_dropout_against_cpu(sk, case, backend, TRITON_DEVICE if backend == "triton" else "cuda")


# ----------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# ----------------------------------------------------------------------------------------------
def _op_args(multi, requires_grad=True, device="cpu", dtype=torch.float32):
    """Arguments of a device op (the level form): one level without alpha, or two with it."""
    case = Case(B=2, H=2, Nq=5, D=8, shapes=[(2, 3), (1, 2)] if multi else [(3, 4)], multi=multi, mask="random")
    t = leaves(make_inputs(case, torch.Generator().manual_seed(4)), dtype, device)
    for name in ("q", "k", "v", "centers", "precision", "alpha"):
        if t.get(name) is not None:
            t[name].requires_grad_(requires_grad)
    coords = (t["centers"], t["precision"]) if multi else (t["centers"].unsqueeze(3), t["precision"].unsqueeze(3))
    flat = [n for shape in case.shapes for n in shape]
    return (t["q"], t["k"], t["v"], *coords, t.get("alpha"), flat, t["mask"], 0.3, 0.0, None)


# the device ops of each kernel backend: the C++ pair (CPU here) and the Triton pair
DEVICE_OPS = {
    "cpu": ("_coattention_forward", "_coattention_backward"),
    "triton": ("_triton_coattention_forward", "_triton_coattention_backward"),
}


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("backend", sorted(DEVICE_OPS))
def test_opcheck(multi, backend):
    if backend not in sk.available_backends(TRITON_DEVICE if backend == "triton" else "cpu"):
        pytest.skip(f"backend {backend!r} is not available here")
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    forward, backward = (getattr(torch.ops.smca, name).default for name in DEVICE_OPS[backend])
    torch.library.opcheck(forward, _op_args(multi, device=device))
    # The backward op, on the forward's saved outputs (out as the one level's output without alpha).
    args = _op_args(multi, requires_grad=False, device=device)
    out, out_levels, lse = forward(*args)
    saved = (out_levels if multi else out.unsqueeze(3), lse)
    torch.library.opcheck(backward, (torch.randn_like(out), *args[:6], *saved, *args[6:]))


@pytest.mark.parametrize("multi", [False, True])
def test_op_autograd_matches_the_public_function(multi):
    """The public functions differentiate through an autograd.Function around the device op (less
    host time); a direct op call through the op's registered autograd. Both give the same gradients."""
    args = _op_args(multi)
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    forward = torch.ops.smca._coattention_forward.default
    results = []
    for call_op in (forward, lambda *a: sk.ops._Coattention.apply(forward, *a)):
        out = call_op(*args)[0]
        results.append((out, torch.autograd.grad(out, tensors, torch.ones_like(out))))
    assert torch.equal(results[0][0], results[1][0])
    for direct, function in zip(results[0][1], results[1][1]):
        assert torch.equal(direct, function)


def test_torch_export_carries_the_device_op():
    """torch.export sees one device op per call (smca._coattention_forward, the dispatch key then
    picks the CPU or CUDA kernel), and the exported program computes what eager does."""

    class Attend(torch.nn.Module):
        def forward(self, q, k, v, centers, precision, alpha, mask):
            return sk.scale_selective_coattention(q, k, v, centers, precision, alpha, [(3, 4), (2, 3)], mask, backend="cpu")

    case = Case(Nq=5, D=16, shapes=[(3, 4), (2, 3)], multi=True, mask="random")
    t = leaves(make_inputs(case, torch.Generator().manual_seed(8)), torch.float32, "cpu")
    args = tuple(t[n].detach() for n in ("q", "k", "v", "centers", "precision", "alpha")) + (t["mask"],)
    program = torch.export.export(Attend(), args)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("smca._coattention_forward.default") == 1
    assert torch.equal(program.module()(*args), Attend()(*args))


def test_torch_compile_fullgraph_matches_eager():
    case = Case(Nq=7, D=16, shapes=[(3, 4), (2, 3)], multi=True, mask="random")
    inputs = make_inputs(case, torch.Generator().manual_seed(6))

    def fn(q, k, v, centers, precision, alpha, mask):
        out = sk.scale_selective_coattention(q, k, v, centers, precision, alpha, [(3, 4), (2, 3)], mask, backend="cpu")
        return (out.sin() * 2).sum(dim=-1)

    compiled = torch.compile(fn, fullgraph=True)
    names = ("q", "k", "v", "centers", "precision", "alpha")
    results = []
    for f in (fn, compiled):
        t = leaves(inputs, torch.float32, "cpu")
        out = f(*(t[n] for n in names), t["mask"])
        results.append((out, torch.autograd.grad(out.sum(), [t[n] for n in names])))
    torch.testing.assert_close(results[1][0], results[0][0])
    for actual, expected in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(actual, expected)


# ----------------------------------------------------------------------------------------------
# Autograd's contract: gradcheck, gradients of gradients, torch.compile
# ----------------------------------------------------------------------------------------------
# Every backend that runs float64 here, through the public functions (gradcheck's own settings).
GRADCHECK_BACKENDS = ["reference", "cpu", "auto"]
AUTOGRAD_CASES = {
    "gaussian": Case(B=2, H=2, Nq=3, D=4, shapes=[(2, 3)], mask="empty_batch"),
    "scale_selective": Case(B=2, H=1, Nq=3, D=4, shapes=[(2, 2), (1, 2)], multi=True, mask="empty_level"),
}


def _public(case, backend, **kwargs):
    """The public op of `case` as a function of its differentiable inputs, and those inputs (float64)."""
    t = leaves(make_inputs(case, torch.Generator().manual_seed(len(case.shapes))), torch.float64, "cpu")
    names = ("q", "k", "v", "centers", "precision") + (("alpha",) if case.multi else ())

    def fn(*inputs):
        return call(sk, case, dict(t, **dict(zip(names, inputs))), backend, **kwargs)

    return fn, tuple(t[n] for n in names)


@pytest.mark.parametrize("case", sorted(AUTOGRAD_CASES))
@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_gradcheck_and_gradgradcheck_with_default_settings(backend, case):
    """gradcheck as users call it (undefined output gradients included), and gradients of
    gradients (gradient penalties, Hessian-vector products): the fused kernels' backward has no
    derivative of its own, so a differentiable backward recomputes through the reference."""
    fn, inputs = _public(AUTOGRAD_CASES[case], backend)
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("multi", [False, True])
def test_gradgradcheck_of_the_device_op(multi):
    """The op's registered autograd (a direct call, torch.compile, export) is twice differentiable too."""
    args = list(_op_args(multi, dtype=torch.float64))
    differentiable = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    for i in differentiable:
        args[i] = args[i].detach().requires_grad_()

    def fn(*inputs):
        for i, x in zip(differentiable, inputs):
            args[i] = x
        return torch.ops.smca._coattention_forward(*args)[0]

    assert torch.autograd.gradgradcheck(fn, [args[i] for i in differentiable])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_undefined_output_gradient(backend):
    """An output that reaches the loss without a gradient (gradcheck's check_undefined_grad,
    set_materialize_grads(False)) gives no gradient, not a crash."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    if backend not in sk.available_backends(device):
        pytest.skip(f"backend {backend!r} is not available here")
    case = AUTOGRAD_CASES["scale_selective"]
    t = leaves(make_inputs(case, torch.Generator().manual_seed(3)), torch.float32, device)
    out = call(sk, case, t, backend)
    torch._C._functions.UndefinedGrad()(out).sum().backward()
    assert all(t[n].grad is None or not t[n].grad.any() for n in ("q", "k", "v", "centers", "precision", "alpha"))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_second_order_matches_the_reference(backend):
    """A gradient penalty through each fused backend in float32 (the dtype every one takes) against
    the float64 reference: the penalty's value and its gradient to every input, each within the
    float32 reference's own error (the 2x rule)."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    if backend not in sk.available_backends(device):
        pytest.skip(f"backend {backend!r} is not available here")
    case = Case(Nq=5, D=16, shapes=[(3, 4), (2, 3)], multi=True, mask="random")
    inputs = make_inputs(case, torch.Generator().manual_seed(5))
    names = ("q", "k", "v", "centers", "precision", "alpha")

    def run(name, dtype, where):
        t = leaves(inputs, dtype, where)
        out = call(sk, case, t, name)
        first = torch.autograd.grad(out.square().sum(), [t[n] for n in names], create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        second = torch.autograd.grad(penalty, [t[n] for n in names])
        return penalty, {n: g.cpu() for n, g in zip(names, second)}

    exact, exact_g = run("reference", torch.float64, "cpu")
    ref, ref_g = run("reference", torch.float32, device)
    actual, actual_g = run(backend, torch.float32, device)
    assert all(g.abs().max() > 0 for g in actual_g.values())
    assert_within_reference_error(torch.float32, actual.cpu(), actual_g, exact, exact_g, ref.cpu(), ref_g)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_second_order_with_dropout_says_what_to_use(backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    if backend not in sk.available_backends(device):
        pytest.skip(f"backend {backend!r} is not available here")
    case = AUTOGRAD_CASES["gaussian"]
    t = leaves(make_inputs(case, torch.Generator().manual_seed(4)), torch.float32, device)
    out = call(sk, case, t, backend, dropout_p=0.2)
    with pytest.raises(RuntimeError, match=rf"backend '{backend}': gradients of gradients .* dropout_p = 0.2 .* "
                                            r"backend='reference'"):
        torch.autograd.grad(out.sum(), [t["q"]], create_graph=True)
    (grad_q,) = torch.autograd.grad(call(sk, case, t, backend, dropout_p=0.2).sum(), [t["q"]])  # first order
    assert torch.isfinite(grad_q).all() and grad_q.any()


def test_extension_carries_cuda_when_built_with_it():
    """`make` builds with FORCE_CUDA=1 wherever a CUDA toolkit is found, and says so here."""
    import os

    if os.environ.get("FORCE_CUDA") != "1":
        pytest.skip("built without FORCE_CUDA=1: CUDA kernels are optional")
    assert torch.ops.smca._cuda_version() > 0
    assert "cuda" in sk.available_backends("cuda") or not torch.cuda.is_available()


def test_auto_picks_a_kernel_that_takes_the_input():
    from smca_kernels.ops import _auto_backend

    gpu = ["triton", "cuda"]
    assert _auto_backend(gpu, torch.bfloat16, 32, 3) == "triton"
    assert _auto_backend(gpu, torch.float32, 24, 1) == "triton"
    assert _auto_backend(["cuda"], torch.float16, 64, 3) == "cuda"
    assert _auto_backend(gpu, torch.float64, 32, 1) == "reference"  # gradcheck on a GPU
    assert _auto_backend(gpu, torch.float32, 256, 1) == "reference"
    assert _auto_backend(["cuda"], torch.float32, 24, 1) == "reference"
    assert _auto_backend(["cuda"], torch.float32, 32, 33) == "reference"
    assert _auto_backend(["cpu"], torch.bfloat16, 32, 1) == "reference"  # CPU autocast
    assert _auto_backend(["cpu"], torch.float64, 300, 40) == "cpu"


def test_backends_listed():
    assert sk.available_backends("cpu")[:1] == ["cpu"]
    # Without a GPU the tests switch the interpreter on, which lets Triton take CPU tensors.
    assert ("triton" in sk.available_backends("cpu")) == (TRITON_DEVICE == "cpu")
    assert "reference" in sk.available_backends("cpu")


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error that names the argument
# ----------------------------------------------------------------------------------------------
def _good():
    B, H, Nq, L, D = 2, 2, 3, 12, 8
    return dict(
        q=torch.randn(B, H, Nq, D), k=torch.randn(B, H, L, D), v=torch.randn(B, H, L, D),
        centers=torch.rand(B, H, Nq, 2), precision=torch.rand(B, H, Nq, 2),
        spatial_shape=(3, 4), key_padding_mask=torch.zeros(B, L, dtype=torch.bool),
    )


def _bad(**changes):
    args = _good()
    args.update(changes)
    return args


BAD_GAUSSIAN = [
    (_bad(q=torch.randn(2, 3, 8)), ValueError, r"q: expected 4 dims"),
    (_bad(spatial_shape=(3, 5)), ValueError, r"spatial_shape: \[\(3, 5\)\] cover 15 keys, but k and v have L = 12"),
    (_bad(spatial_shape=(3,)), ValueError, r"spatial_shape"),
    (_bad(k=torch.randn(2, 2, 12, 4)), ValueError, r"k: expected shape \(B, H, L, D\) = \(2, 2, L, 8\)"),
    (_bad(v=torch.randn(2, 2, 12, 4)), ValueError, r"v: expected the shape of k"),
    (_bad(k=torch.randn(2, 2, 12, 8, dtype=torch.float64)), TypeError, r"q, k, v: expected one dtype"),
    (_bad(q=torch.randint(0, 3, (2, 2, 3, 8))), TypeError, r"q: expected a floating dtype"),
    (_bad(k=torch.randn(2, 2, 12, 8, device="meta")), ValueError, r"q, k, v: expected one device"),
    (_bad(centers=torch.rand(2, 2, 3)), ValueError, r"centers: expected shape \(B, H, Nq, 2\) = \(2, 2, 3, 2\), got \(2, 2, 3\)"),
    (_bad(precision=torch.rand(2, 1, 3, 2)), ValueError, r"precision: expected shape"),
    (_bad(key_padding_mask=torch.zeros(2, 11, dtype=torch.bool)), ValueError, r"key_padding_mask: expected shape \(B, L\) = \(2, 12\), got \(2, 11\)"),
    (_bad(key_padding_mask=torch.zeros(2, 12)), TypeError, r"key_padding_mask: expected dtype torch.bool"),
]


@pytest.mark.parametrize("args,error,message", BAD_GAUSSIAN)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_input_gaussian(args, error, message, backend):
    with pytest.raises(error, match=message):
        sk.gaussian_coattention(**args, backend=backend)


def test_bad_arguments():
    args = _good()
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        sk.gaussian_coattention(**args, backend="fast")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available for cpu tensors.*Available: \['cpu'"):
        sk.gaussian_coattention(**args, backend="cuda")
    with pytest.raises(ValueError, match=r"dropout_p: expected 0 <= dropout_p < 1, got 1.0"):
        sk.gaussian_coattention(**args, dropout_p=1.0)


def test_bad_input_scale_selective():
    B, H, Nq, D = 2, 2, 3, 8
    shapes = [(3, 4), (1, 2)]
    q, k = torch.randn(B, H, Nq, D), torch.randn(B, H, 14, D)
    coords = torch.rand(B, H, Nq, 2, 2)
    alpha = torch.rand(B, H, Nq, 2)
    with pytest.raises(ValueError, match=r"spatial_shapes: \[\(3, 4\), \(2, 2\)\] cover 16 keys, but k and v have L = 14"):
        sk.scale_selective_coattention(q, k, k, coords, coords, alpha, [(3, 4), (2, 2)])
    with pytest.raises(ValueError, match=r"alpha: expected shape \(B, H, Nq, S\) = \(2, 2, 3, 2\), got \(2, 2, 3\)"):
        sk.scale_selective_coattention(q, k, k, coords, coords, alpha[..., 0], shapes)
    with pytest.raises(ValueError, match=r"centers: expected shape \(B, H, Nq, S, 2\)"):
        sk.scale_selective_coattention(q, k, k, coords[..., 0, :], coords, alpha, shapes)
    with pytest.raises(ValueError, match=r"spatial_shapes: expected one or more positive"):
        sk.scale_selective_coattention(q, k, k, coords, coords, alpha, [(3, 4), (0, 2)])


def test_direct_op_call_is_checked_in_cpp():
    """The device ops are reachable from Python: bad shapes raise, never read out of bounds."""
    q, k = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 6, 4)
    coords = torch.rand(1, 1, 2, 1, 2)
    with pytest.raises(RuntimeError, match=r"k: expected L = sum of H\*W over spatial_shapes"):
        torch.ops.smca._coattention_forward(q, k, k, coords, coords, None, [2, 2], None, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"centers: expected \(B, H, Nq, S, 2\)"):
        torch.ops.smca._coattention_forward(q, k, k, coords[:, :, :1], coords, None, [2, 3], None, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"alpha: required with 2 levels"):
        torch.ops.smca._coattention_forward(q, k, k, coords.expand(1, 1, 2, 2, 2), coords.expand(1, 1, 2, 2, 2), None, [1, 2, 2, 2], None, 1.0, 0.0, None)


def test_triton_op_without_the_interpreter_on_cpu(monkeypatch):
    """The Triton ops are public: called on CPU tensors without TRITON_INTERPRET=1 they say so."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = _op_args(multi=False, requires_grad=False)
    with pytest.raises(RuntimeError, match=r"backend 'triton' is not available for cpu tensors: .*TRITON_INTERPRET=1"):
        torch.ops.smca._triton_coattention_forward(*args)
