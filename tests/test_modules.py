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
