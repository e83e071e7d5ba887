"""SMCAAttention: a drop-in for nn.MultiheadAttention whose attention is SMCA co-attention."""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from .checks import check_coattention, coordinate_dtype, normalise_shapes
from .ops import BACKENDS, coattention

__all__ = ["SMCAAttention"]


def _as_level_list(spatial_shapes) -> list:
    """(Hf, Wf) or [(Hf, Wf), ...] or an (S, 2) tensor -> [(Hf, Wf), ...]."""
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    spatial_shapes = list(spatial_shapes)
    if len(spatial_shapes) == 2 and all(isinstance(n, (int, torch.SymInt)) for n in spatial_shapes):
        return [tuple(spatial_shapes)]
    return [tuple(shape) for shape in spatial_shapes]


def _as_bool_padding_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """A key_padding_mask as nn.MultiheadAttention takes it (bool, True = padding; or float,
    added to the scores) -> bool. A float mask must be 0 (keep) or -inf (padding): the fused
    kernels mask keys, they do not add a bias."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"key_padding_mask: expected a bool or float mask, got dtype {mask.dtype}")
    padding = mask == float("-inf")
    if not (padding | (mask == 0)).all():
        raise NotImplementedError(
            "key_padding_mask: a float mask must hold 0 (keep) or -inf (padding); "
            "an additive bias with other values is not implemented"
        )
    return padding


class SMCAAttention(nn.MultiheadAttention):
    """Multi-head co-attention with a Gaussian spatial prior per query (SMCA).

    Same constructor arguments and parameters (in_proj_weight or q/k/v_proj_weight,
    in_proj_bias, out_proj) as nn.MultiheadAttention, so a MultiheadAttention state dict loads,
    and forward takes nn.MultiheadAttention.forward's arguments in its order (attn_mask must be
    None and is_causal False; need_weights defaults to False), the prior as keywords. The keys
    are the cells of one feature map (Gaussian-modulated co-attention) or of several
    concatenated maps (scale-selective co-attention, when `alpha` is given).

    Args:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
            device, dtype: as nn.MultiheadAttention, in its order (add_bias_kv and add_zero_attn
            must be False: a learnt or zero key has no cell on the feature map).
        backend (keyword): kernel backend of the op: "auto", "reference", "cpu", "triton" or "cuda".
    Raises:
        NotImplementedError: add_bias_kv or add_zero_attn True.
        ValueError: an unknown backend.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        for name, value in (("add_bias_kv", add_bias_kv), ("add_zero_attn", add_zero_attn)):
            if value:
                raise NotImplementedError(
                    f"{name}=True: SMCAAttention's keys are feature-map cells, an extra key has no cell "
                    "(pass False)"
                )
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim,
                         batch_first=batch_first, device=device, dtype=dtype)
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, backend={self.backend!r}"

    def _heads(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """(N, B, E_in) (or (B, N, E_in) batch-first) -> (B, H, N, D)."""
        x = F.linear(x, weight, bias)
        if not self.batch_first:
            x = x.transpose(0, 1)
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def _projections(self) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        return w_q, w_k, w_v, b_q, b_k, b_v

    def _expand_coordinates(self, t: Optional[Tensor], name: str, batch: int, queries: int, levels: int, like: Tensor) -> Tensor:
        """(B, H or 1, Nq, [S,] 2) -> (B, H, Nq, S, 2); None -> zeros (no prior)."""
        shape = (batch, self.num_heads, queries, levels, 2)
        if t is None:
            return like.new_zeros((), dtype=torch.float32).expand(shape)
        if t.dim() == 4:
            t = t.unsqueeze(3)
        if t.dim() != 5 or t.shape[1] not in (1, self.num_heads) or (t.shape[0], t.shape[2], t.shape[3], t.shape[4]) != (batch, queries, levels, 2):
            raise ValueError(
                f"{name}: expected (B, H or 1, Nq, 2) or (B, H or 1, Nq, S, 2) with B={batch}, "
                f"H={self.num_heads}, Nq={queries}, S={levels}, got {tuple(t.shape)}"
            )
        return t.expand(shape)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        centers: Optional[Tensor] = None,
        precision: Optional[Tensor] = None,
        spatial_shapes: Union[None, Tuple[int, int], Sequence[Tuple[int, int]], Tensor] = None,
        alpha: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """nn.MultiheadAttention.forward's arguments, in its order, plus the SMCA prior (keywords).

        Args:
            query: (Nq, B, E) ((B, Nq, E) with batch_first), or (Nq, E) unbatched.
            key, value: (L, B, kdim/vdim) ((B, L, .) with batch_first), or (L, kdim/vdim)
                unbatched; L = sum of Hf * Wf.
            key_padding_mask: (B, L) ((L,) unbatched), bool (True = padding) or float (0 = keep,
                -inf = padding, as nn.MultiheadAttention takes it).
            need_weights: also return the attention weights (materialised by the reference, so
                off by default: nn.MultiheadAttention's default is True).
            attn_mask: must be None: a per-query mask is not implemented (NotImplementedError).
            average_attn_weights: average the returned weights over heads.
            is_causal: must be False (NotImplementedError): the keys are feature-map cells.
            centers: (B, H or 1, Nq, 2) for one level or (B, H or 1, Nq, S, 2) (no B axis for
                unbatched input), in each level's grid cells (x, y); a head axis of 1 is shared by
                all heads. None (with precision None) gives plain attention: the DETR baseline on
                the same kernel.
            precision: like centers, the bandwidth already folded in (a / sqrt(beta)).
            spatial_shapes: (Hf, Wf) or [(Hf_0, Wf_0), ...]; required with centers or alpha.
                None: plain attention over the L keys as one level.
            alpha: (B, H or 1, Nq, S) level weights (already a softmax over levels); given, the
                levels are mixed by scale-selective co-attention, else there must be one level.
        Returns:
            (output (Nq, B, E) or (B, Nq, E) ((Nq, E) unbatched), weights (B, Nq, L), or
            (B, H, Nq, L) with average_attn_weights False (no B axis unbatched), or None).
            The weights are those before attention dropout.
        Raises:
            NotImplementedError: attn_mask given, is_causal True, or a float key_padding_mask
                with values other than 0 and -inf.
            ValueError, TypeError: shapes or dtypes that do not fit, naming the argument.

        Where it differs from nn.MultiheadAttention: need_weights defaults to False; the
        weights returned in training are those before dropout; a query whose keys are all
        padding attends to nothing (zero attention output, so out_proj's bias; nn.MultiheadAttention
        gives NaN outside its inference fast path).
        """
        if attn_mask is not None:
            raise NotImplementedError(
                "attn_mask: SMCAAttention masks keys only (key_padding_mask); a per-query attention mask "
                f"(got shape {tuple(attn_mask.shape)}) is not implemented: pass attn_mask=None"
            )
        if is_causal:
            raise NotImplementedError(
                "is_causal=True: causal attention is not implemented (SMCAAttention's keys are feature-map cells)"
            )
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "query, key, value: expected all 3-D (batched) or all 2-D (unbatched), got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        for name, t, size in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != size:
                raise ValueError(f"{name}: expected last dim {size} (the module's {name} embedding size), got shape {tuple(t.shape)}")
        batched = query.dim() == 3
        if not batched:  # a batch of one, removed again from the results
            batch_dim = 0 if self.batch_first else 1
            query, key, value = query.unsqueeze(batch_dim), key.unsqueeze(batch_dim), value.unsqueeze(batch_dim)
            key_padding_mask, centers, precision, alpha = (
                None if t is None else t.unsqueeze(0) for t in (key_padding_mask, centers, precision, alpha)
            )
        key_padding_mask = _as_bool_padding_mask(key_padding_mask)
        if spatial_shapes is None:
            if centers is not None or precision is not None or alpha is not None:
                raise ValueError("spatial_shapes: required with centers, precision or alpha")
            spatial_shapes = (1, key.shape[1 if self.batch_first else 0])
        if (centers is None) != (precision is None):
            raise ValueError("centers and precision: give both (SMCA) or neither (plain attention)")
        shapes = normalise_shapes(_as_level_list(spatial_shapes))
        w_q, w_k, w_v, b_q, b_k, b_v = self._projections()
        q = self._heads(query, w_q, b_q)
        k = self._heads(key, w_k, b_k)
        v = self._heads(value, w_v, b_v)
        batch, _, queries, _ = q.shape
        levels = len(shapes)
        centers = self._expand_coordinates(centers, "centers", batch, queries, levels, q)
        precision = self._expand_coordinates(precision, "precision", batch, queries, levels, q)
        dropout_p = self.dropout if self.training else 0.0
        if alpha is not None:
            if alpha.dim() != 4 or alpha.shape[1] not in (1, self.num_heads):
                raise ValueError(f"alpha: expected (B, H or 1, Nq, S), got {tuple(alpha.shape)}")
            alpha = alpha.expand(batch, self.num_heads, queries, alpha.shape[-1])
        check_coattention(q, k, v, centers, precision, alpha, shapes, key_padding_mask, dropout_p)
        out = coattention(
            q, k, v, centers, precision, alpha, shapes, key_padding_mask, dropout_p=dropout_p, backend=self.backend
        )
        out = out.transpose(1, 2).reshape(batch, queries, self.embed_dim)  # (B, Nq, E)
        out = self.out_proj(out if self.batch_first else out.transpose(0, 1))
        if not batched:
            out = out.squeeze(batch_dim)
        weights = None
        if need_weights:
            coord_dtype = coordinate_dtype(q.dtype)
            weights = reference.attention_weights(
                q, k, centers.to(coord_dtype), precision.to(coord_dtype), shapes, key_padding_mask,
                alpha=alpha,
            )
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights
