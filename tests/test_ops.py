"""The operators: every kernel against the reference, forward and every gradient, plus dropout,
registration (opcheck, torch.compile) and bad input.

The C++ CPU kernel runs always; the Triton kernels run on CPU tensors through the interpreter
(small shapes: it is slow); the GPU cases are in test_gpu.py.
"""
import zlib

import pytest
import torch

import smca_kernels as sk
from helpers import TOLERANCE, Case, allowed_error, call, grads, leaves, make_inputs, relative_error

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
]

PARAMS = [pytest.param("cpu", case, dtype, id=f"cpu-{str(dtype)[6:]}-{case}") for case in CPU_CASES for dtype in (torch.float64, torch.float32)]
PARAMS += [pytest.param("triton", case, torch.float32, id=f"triton-float32-{case}") for case in TRITON_CASES]


@pytest.mark.parametrize("backend,case,dtype", PARAMS)
def test_matches_reference(backend, case, dtype):
    generator = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    inputs = make_inputs(case, generator)
    exact_t = leaves(inputs, torch.float64, "cpu")
    exact = call(sk, case, exact_t, "reference")
    grad_out = torch.randn(exact.shape, dtype=torch.float64, generator=generator)
    exact_g = grads(exact, exact_t, grad_out)
    # The reference in the kernel's dtype: how well that dtype can do on these inputs.
    ref_t = leaves(inputs, dtype, "cpu")
    ref = call(sk, case, ref_t, "reference")
    ref_g = grads(ref, ref_t, grad_out.to(dtype))

    actual_t = leaves(inputs, dtype, "cpu")
    actual = call(sk, case, actual_t, backend)
    assert actual.dtype == dtype and actual.shape == exact.shape
    assert relative_error(actual, exact) <= allowed_error(dtype, relative_error(ref, exact)), "output"
    actual_g = grads(actual, actual_t, grad_out.to(dtype))
    for name, value in exact_g.items():
        assert actual_g[name].dtype == actual_t[name].dtype
        allowed = allowed_error(dtype, relative_error(ref_g[name], value))
        assert relative_error(actual_g[name], value) <= allowed, f"grad of {name}"

    if case.mask == "empty_batch":  # element 1 sees no key: zeros out, zero gradients
        assert actual[1].abs().max() == 0
        for name in ("q", "k", "v"):
            assert actual_g[name][1].abs().max() == 0, name


@pytest.mark.parametrize("multi", [False, True])
def test_triton_split_keys(multi):
    """The key axis split over programs (num_splits > 1, the GPU path for few queries) against
    the reference, forward and every gradient of the device kernels."""
    from smca_kernels.triton import coattention_backward, coattention_forward

    case = Case(Nq=9, D=16, shapes=[(5, 7), (3, 4), (1, 1)] if multi else [(6, 7)], multi=multi, mask="empty_level" if multi else "random")
    generator = torch.Generator().manual_seed(7)
    inputs = make_inputs(case, generator)
    S, flat = len(case.shapes), [n for shape in case.shapes for n in shape]
    exact_t = leaves(inputs, torch.float64, "cpu")
    exact = call(sk, case, exact_t, "reference")
    grad_out = torch.randn(exact.shape, dtype=torch.float64, generator=generator)
    exact_g = grads(exact, exact_t, grad_out)

    t = {n: (None if x is None else x.detach()) for n, x in leaves(inputs, torch.float32, "cpu").items()}
    coords = [t[n] if multi else t[n].unsqueeze(3) for n in ("centers", "precision")]
    args = (t["q"], t["k"], t["v"], *coords, t.get("alpha"))
    out, out_levels, lse = coattention_forward(*args, flat, t["mask"], case.D**-0.5, 0.0, 0, num_splits=3)
    assert relative_error(out, exact) <= TOLERANCE[torch.float32]
    saved = out_levels if multi else out.unsqueeze(3)
    g = coattention_backward(grad_out.float(), *args, saved, lse, flat, t["mask"], case.D**-0.5, 0.0, 0, num_splits=3)
    for name, value in zip(("q", "k", "v", "centers", "precision", "alpha"), g):
        if name in exact_g:
            value = value if multi or name not in ("centers", "precision") else value.squeeze(3)
            assert relative_error(value, exact_g[name]) <= TOLERANCE[torch.float32], name
    assert lse.shape == (case.B, case.H, case.Nq, S)


def _cpu_gradcheck(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("mask", ["none", "random"])
def test_gradcheck_gaussian_cpu(dropout_p, mask):
    case = Case(B=2, H=2, Nq=3, D=4, shapes=[(2, 3)], mask=mask)
    t = leaves(make_inputs(case, torch.Generator().manual_seed(0)), torch.float64, "cpu")

    def fn(q, k, v, centers, precision):  # a fixed seed: the backward must redraw the same mask
        return torch.ops.smca.gaussian_coattention(
            q, k, v, centers, precision, [2, 3], t["mask"], 0.5, dropout_p, 1234, "cpu"
        )[0]

    _cpu_gradcheck(fn, (t["q"], t["k"], t["v"], t["centers"], t["precision"]))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_scale_selective_cpu(dropout_p):
    case = Case(B=2, H=1, Nq=3, D=4, shapes=[(2, 2), (1, 2)], multi=True, mask="empty_level")
    t = leaves(make_inputs(case, torch.Generator().manual_seed(1)), torch.float64, "cpu")

    def fn(q, k, v, centers, precision, alpha):
        return torch.ops.smca.scale_selective_coattention(
            q, k, v, centers, precision, alpha, [2, 2, 1, 2], t["mask"], 0.5, dropout_p, 99, "cpu"
        )[0]

    _cpu_gradcheck(fn, (t["q"], t["k"], t["v"], t["centers"], t["precision"], t["alpha"]))


# ----------------------------------------------------------------------------------------------
# Dropout
# ----------------------------------------------------------------------------------------------
def _dropped_weights(backend, dropout_p, B=2, H=2, Nq=16, shape=(4, 8)):
    """With q = k = 0 and no prior every weight is 1/L; v = I (D = L) makes out the dropped
    weight matrix itself, (B, H, Nq, L)."""
    L = shape[0] * shape[1]
    q = torch.zeros(B, H, Nq, L)
    eye = torch.eye(L).expand(B, H, L, L)
    coords = torch.zeros(B, H, Nq, 2)
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


@pytest.mark.parametrize("multi", [False, True])
def test_triton_dropout_matches_cpu(multi):
    """Both backends draw the same Philox numbers, so for one seed they drop the same weights;
    the CPU backward is checked against finite differences by gradcheck above."""
    case = Case(Nq=7, D=16, shapes=[(3, 4), (2, 3)] if multi else [(3, 5)], multi=multi, mask="random")
    inputs = make_inputs(case, torch.Generator().manual_seed(3))
    results = {}
    for backend in ("cpu", "triton"):
        t = leaves(inputs, torch.float32, "cpu")
        torch.manual_seed(5)
        out = call(sk, case, t, backend, dropout_p=0.4)
        results[backend] = (out, grads(out, t, torch.ones_like(out)))
    out_cpu, g_cpu = results["cpu"]
    out_triton, g_triton = results["triton"]
    assert relative_error(out_triton, out_cpu) <= TOLERANCE[torch.float32]
    for name in g_cpu:
        assert relative_error(g_triton[name], g_cpu[name]) <= TOLERANCE[torch.float32], name


# ----------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# ----------------------------------------------------------------------------------------------
def _op_args(multi, requires_grad=True):
    case = Case(B=2, H=2, Nq=5, D=8, shapes=[(2, 3), (1, 2)] if multi else [(3, 4)], multi=multi, mask="random")
    t = leaves(make_inputs(case, torch.Generator().manual_seed(4)), torch.float32, "cpu")
    for name in ("q", "k", "v", "centers", "precision", "alpha"):
        if t.get(name) is not None:
            t[name].requires_grad_(requires_grad)
    flat = [n for shape in case.shapes for n in shape]
    if multi:
        return (t["q"], t["k"], t["v"], t["centers"], t["precision"], t["alpha"], flat, t["mask"], 0.3, 0.0, 0, "cpu")
    return (t["q"], t["k"], t["v"], t["centers"], t["precision"], flat, t["mask"], 0.3, 0.0, 0, "cpu")


@pytest.mark.parametrize("multi", [False, True])
def test_opcheck(multi):
    name = "scale_selective_coattention" if multi else "gaussian_coattention"
    args = _op_args(multi)
    torch.library.opcheck(getattr(torch.ops.smca, name).default, args)
    # The backward op, on the forward's saved outputs.
    no_grad_args = _op_args(multi, requires_grad=False)
    outputs = getattr(torch.ops.smca, name)(*no_grad_args)
    grad_out = torch.randn_like(outputs[0])
    tensors = no_grad_args[:6] if multi else no_grad_args[:5]
    saved = outputs[1:] if multi else outputs
    rest = no_grad_args[6:] if multi else no_grad_args[5:]
    torch.library.opcheck(getattr(torch.ops.smca, name + "_backward").default, (grad_out, *tensors, *saved, *rest))


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


def test_extension_carries_cuda_when_built_with_it():
    """`make` builds with FORCE_CUDA=1 wherever a CUDA toolkit is found, and says so here."""
    import os

    if os.environ.get("FORCE_CUDA") != "1":
        pytest.skip("built without FORCE_CUDA=1: CUDA kernels are optional")
    assert torch.ops.smca._cuda_version() > 0
    assert "cuda" in sk.available_backends("cuda") or not torch.cuda.is_available()


def test_backends_listed():
    assert sk.available_backends("cpu")[:1] == ["cpu"]
    assert "triton" in sk.available_backends("cpu")  # the interpreter is on in the tests
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
        torch.ops.smca._coattention_forward(q, k, k, coords, coords, None, [2, 2], None, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"centers: expected \(B, H, Nq, S, 2\)"):
        torch.ops.smca._coattention_forward(q, k, k, coords[:, :, :1], coords, None, [2, 3], None, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"alpha: required with 2 levels"):
        torch.ops.smca._coattention_forward(q, k, k, coords.expand(1, 1, 2, 2, 2), coords.expand(1, 1, 2, 2, 2), None, [1, 2, 2, 2], None, 1.0, 0.0, 0)


def test_op_called_with_an_unusable_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    args = _op_args(multi=False, requires_grad=False)
    with pytest.raises(RuntimeError, match=r"backend 'triton' is not available for cpu tensors: .*TRITON_INTERPRET=1"):
        torch.ops.smca.gaussian_coattention(*args[:-1], "triton")
    with pytest.raises(ValueError, match=r"backend: the smca ops take 'cpu', 'cuda' or 'triton', got 'reference'"):
        torch.ops.smca.gaussian_coattention(*args[:-1], "reference")
