"""SMCAAttention: nn.MultiheadAttention compatibility and agreement between backends."""
import pytest
import torch
from torch import nn

import smca_kernels as sk


def _pair(batch_first=False, kdim=None, dropout=0.0):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, dropout=dropout, batch_first=batch_first, kdim=kdim, vdim=kdim)
    smca = sk.SMCAAttention(32, 4, dropout=dropout, batch_first=batch_first, kdim=kdim, vdim=kdim, backend="cpu")
    smca.load_state_dict(mha.state_dict())
    return mha, smca


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kdim", [None, 24])
def test_plain_attention_is_multihead_attention(batch_first, kdim):
    """Without centres SMCAAttention is nn.MultiheadAttention, loaded from its state dict."""
    mha, smca = _pair(batch_first, kdim)
    assert smca.state_dict().keys() == mha.state_dict().keys()
    nq, L, B = 5, 12, 2
    query = torch.randn(B, nq, 32) if batch_first else torch.randn(nq, B, 32)
    key = torch.randn(B, L, kdim or 32) if batch_first else torch.randn(L, B, kdim or 32)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[1, 7:] = True
    expected, expected_w = mha(query, key, key, key_padding_mask=mask)
    actual, actual_w = smca(query, key, key, key_padding_mask=mask, spatial_shapes=(3, 4), need_weights=True)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_w, expected_w)


def _module_inputs(levels, head_shared, B=2, nq=6, E=32, H=4):
    L = sum(h * w for h, w in levels)
    g = torch.Generator().manual_seed(1)
    heads = 1 if head_shared else H
    S = len(levels)
    return dict(
        query=torch.randn(nq, B, E, generator=g),
        key=torch.randn(L, B, E, generator=g),
        centers=(torch.rand(B, heads, nq, S, 2, generator=g) * 3).requires_grad_(),
        precision=(0.2 + torch.rand(B, heads, nq, S, 2, generator=g)).requires_grad_(),
        alpha=torch.softmax(torch.randn(B, 1, nq, S, generator=g), -1).requires_grad_() if S > 1 else None,
        mask=torch.rand(B, L, generator=g) < 0.2,
    )


@pytest.mark.parametrize("levels", [[(3, 5)], [(4, 5), (2, 3), (1, 2)]])
@pytest.mark.parametrize("head_shared", [False, True])
def test_backends_agree(levels, head_shared):
    """The fused CPU kernel and the reference give the same outputs and parameter gradients."""
    results = []
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        module = sk.SMCAAttention(32, 4, backend=backend)
        x = _module_inputs(levels, head_shared)
        out, _ = module(
            x["query"], x["key"], x["key"], x["mask"], centers=x["centers"], precision=x["precision"],
            spatial_shapes=levels, alpha=x["alpha"],
        )
        out.square().sum().backward()
        tensors = [x[n] for n in ("centers", "precision", "alpha") if x[n] is not None]
        results.append((out, [p.grad for p in module.parameters()] + [t.grad for t in tensors]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for actual, expected in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_weights():
    module = sk.SMCAAttention(32, 4)
    levels = [(4, 5), (2, 3)]
    x = _module_inputs(levels, head_shared=True)
    _, weights = module(
        x["query"], x["key"], x["key"], centers=x["centers"], precision=x["precision"],
        spatial_shapes=levels, alpha=x["alpha"], need_weights=True, average_attn_weights=False,
    )
    assert weights.shape == (2, 4, 6, 26)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))  # alpha sums to 1 over levels


def test_module_errors():
    module = sk.SMCAAttention(32, 4)
    x = _module_inputs([(3, 5), (1, 2)], head_shared=False)
    with pytest.raises(ValueError, match="alpha: required to mix 2 levels"):
        module(x["query"], x["key"], x["key"], centers=x["centers"], precision=x["precision"], spatial_shapes=[(3, 5), (1, 2)])
    with pytest.raises(ValueError, match="centers and precision: give both"):
        module(x["query"], x["key"], x["key"], centers=x["centers"], spatial_shapes=[(3, 5), (1, 2)])
    with pytest.raises(ValueError, match=r"centers: expected \(B, H or 1, Nq, 2\)"):
        module(x["query"], x["key"], x["key"], centers=x["centers"][:, :, :3], precision=x["precision"], spatial_shapes=[(3, 5), (1, 2)], alpha=x["alpha"])
    with pytest.raises(ValueError, match="backend: expected one of"):
        sk.SMCAAttention(32, 4, backend="fastest")


def _mha_inputs(batch_first, batched=True, B=2, nq=5, L=12, kdim=None):
    g = torch.Generator().manual_seed(3)

    def seq(n, dim):
        if not batched:
            return torch.randn(n, dim, generator=g)
        return torch.randn(B, n, dim, generator=g) if batch_first else torch.randn(n, B, dim, generator=g)

    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[-1, 7:] = True
    return seq(nq, 32), seq(L, kdim or 32), seq(L, kdim or 32), mask if batched else mask[-1]


# nn.MultiheadAttention.forward's signature: (query, key, value, key_padding_mask=None,
# need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False).
CALLS = {
    "positional": lambda m, q, k, v, mask: m(q, k, v, mask, True, None, True, False),
    "keywords": lambda m, q, k, v, mask: m(
        q, k, v, key_padding_mask=mask, need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False
    ),
    "per_head_weights": lambda m, q, k, v, mask: m(q, k, v, mask, True, average_attn_weights=False),
    "float_padding_mask": lambda m, q, k, v, mask: m(
        q, k, v, torch.zeros(mask.shape).masked_fill(mask, float("-inf")), need_weights=True
    ),
    "no_mask_no_weights": lambda m, q, k, v, mask: m(q, k, v, need_weights=False, attn_mask=None),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("batched", [True, False])
def test_multihead_attention_calls(call, batch_first, batched):
    """Every nn.MultiheadAttention.forward argument, positionally or by keyword, batched or not,
    gives nn.MultiheadAttention's output and weights (no spatial_shapes needed without a prior)."""
    mha, smca = _pair(batch_first, kdim=24)
    mha.eval(), smca.eval()
    q, k, v, mask = _mha_inputs(batch_first, batched, kdim=24)
    expected, expected_w = CALLS[call](mha, q, k, v, mask)
    actual, actual_w = CALLS[call](smca, q, k, v, mask)
    torch.testing.assert_close(actual, expected)
    if expected_w is None:
        assert actual_w is None
    else:
        torch.testing.assert_close(actual_w, expected_w)


def test_need_weights_defaults_to_false():
    """The one default that differs from nn.MultiheadAttention (the weights are materialised)."""
    _, smca = _pair()
    q, k, v, _ = _mha_inputs(batch_first=False)
    out, weights = smca(q, k, v)
    assert weights is None and out.shape == q.shape


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(attn_mask=torch.zeros(5, 12, dtype=torch.bool)), NotImplementedError, "attn_mask: .* pass attn_mask=None"),
        (dict(attn_mask=torch.zeros(5, 12)), NotImplementedError, "attn_mask"),
        (dict(attn_mask=torch.zeros(8, 5, 12, dtype=torch.bool)), NotImplementedError, "attn_mask"),
        (dict(attn_mask=torch.zeros(5, 12, dtype=torch.bool), is_causal=True), NotImplementedError, "attn_mask"),
        (dict(is_causal=True), NotImplementedError, "is_causal=True"),
        (dict(key_padding_mask=torch.full((2, 12), -1.0)), NotImplementedError, "key_padding_mask: a float mask"),
        (dict(key_padding_mask=torch.zeros(2, 12, dtype=torch.int64)), TypeError, "key_padding_mask: expected a bool"),
        (dict(centers=torch.zeros(2, 4, 5, 2), precision=torch.ones(2, 4, 5, 2)), ValueError, "spatial_shapes: required"),
    ],
)
def test_unsupported_arguments_are_clear_errors(kwargs, error, message):
    _, smca = _pair()
    q, k, v, _ = _mha_inputs(batch_first=False)
    with pytest.raises(error, match=message):
        smca(q, k, v, **kwargs)


def test_mixed_batched_and_unbatched_inputs_are_an_error():
    _, smca = _pair()
    q, k, v, _ = _mha_inputs(batch_first=False)
    with pytest.raises(ValueError, match="query, key, value: expected all 3-D"):
        smca(q[:, 0], k, v)


def test_unbatched_prior_is_the_batch_of_one():
    """Unbatched input with centres, precision and alpha without their B axis: the batched
    result of a batch of one, without its B axis."""
    module = sk.SMCAAttention(32, 4)
    levels = [(4, 5), (2, 3)]
    x = _module_inputs(levels, head_shared=False, B=1)
    prior = dict(centers=x["centers"], precision=x["precision"], spatial_shapes=levels, alpha=x["alpha"])
    out, weights = module(x["query"], x["key"], x["key"], x["mask"], True, average_attn_weights=False, **prior)
    unbatched = {k: v[0] if isinstance(v, torch.Tensor) else v for k, v in prior.items()}
    out1, weights1 = module(
        x["query"][:, 0], x["key"][:, 0], x["key"][:, 0], x["mask"][0], True, average_attn_weights=False, **unbatched
    )
    torch.testing.assert_close(out1, out[:, 0])
    torch.testing.assert_close(weights1, weights[0])


@pytest.mark.parametrize("batch_first", [False, True])
def test_drop_in_for_torch_transformer_layers(batch_first):
    """Swapped into nn.TransformerEncoderLayer / nn.TransformerDecoderLayer (which pass attn_mask,
    key_padding_mask, need_weights and is_causal by keyword), the layers compute what they did."""
    torch.manual_seed(0)
    kw = dict(dim_feedforward=64, dropout=0.0, batch_first=batch_first)
    layers = [(nn.TransformerEncoderLayer(32, 4, **kw), "self_attn"), (nn.TransformerDecoderLayer(32, 4, **kw), "multihead_attn")]
    x = torch.randn(2, 7, 32) if batch_first else torch.randn(7, 2, 32)
    memory = torch.randn(2, 9, 32) if batch_first else torch.randn(9, 2, 32)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 5:] = True
    run = [lambda layer: layer(x), lambda layer: layer(x, memory, memory_key_padding_mask=mask)]
    for (layer, name), call in zip(layers, run):
        expected = call(layer)  # train mode: no fused fast path, the attention module is called
        swapped = sk.SMCAAttention(32, 4, batch_first=batch_first, backend="cpu")
        swapped.load_state_dict(getattr(layer, name).state_dict())
        setattr(layer, name, swapped)
        torch.testing.assert_close(call(layer), expected)


def test_constructor_takes_multihead_attentions_arguments():
    """nn.MultiheadAttention's constructor arguments, in its order, positionally (as subclasses and
    nn.Transformer*Layer's factory_kwargs pass them)."""
    args = (32, 4, 0.1, False, False, False, 24, 20, True)
    smca, torch_mha = sk.SMCAAttention(*args, device="cpu", dtype=torch.float64), nn.MultiheadAttention(*args)
    assert smca.batch_first and smca.kdim == 24 and smca.vdim == 20 and smca.in_proj_bias is None
    assert smca.q_proj_weight.dtype == torch.float64
    assert smca.state_dict().keys() == torch_mha.state_dict().keys()
    for name in ("add_bias_kv", "add_zero_attn"):
        with pytest.raises(NotImplementedError, match=f"{name}=True"):
            sk.SMCAAttention(32, 4, **{name: True})


def test_embedding_size_is_checked():
    """A query, key or value of another embedding size than the module's is named, not a matmul error."""
    attn = sk.SMCAAttention(32, 4, batch_first=True, kdim=24)
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 6, 24)
    with pytest.raises(ValueError, match=r"query: expected last dim 32 .* got shape \(2, 5, 16\)"):
        attn(torch.randn(2, 5, 16), mem, torch.randn(2, 6, 32))
    with pytest.raises(ValueError, match=r"key: expected last dim 24"):
        attn(x, torch.randn(2, 6, 32), torch.randn(2, 6, 32))
    assert attn(x, mem, torch.randn(2, 6, 32))[0].shape == (2, 5, 32)
