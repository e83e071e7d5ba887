"""Transformer encoders: DETR's (single scale) and SMCA's intra-scale / multi-scale stack.

All tensors are batch-first: tokens (B, L, d), position encodings (B, L, d), key padding
masks (B, L) bool with True = padding.
"""
import copy
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smca_kernels import SMCAAttention

from ..utils import split_levels

__all__ = ["EncoderLayer", "Encoder", "MultiScaleEncoder"]


class EncoderLayer(nn.Module):
    """DETR's post-norm encoder layer: self-attention (position added to queries and keys), FFN.

    The self-attention is SMCAAttention without a prior (nn.MultiheadAttention's parameters):
    its fused kernels keep attention dropout inside the kernel, where SDPA on CPU falls back to
    materialising the L x L weights whenever dropout is on (3 GB a layer at 4997 tokens).
    """

    def __init__(
        self, d_model: int, nheads: int, dim_feedforward: int, dropout: float, backend: str = "auto"
    ) -> None:
        super().__init__()
        self.self_attn = SMCAAttention(d_model, nheads, dropout=dropout, batch_first=True, backend=backend)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor) -> Tensor:
        """src, pos (B, L, d); key_padding_mask (B, L) -> (B, L, d)."""
        q = k = src + pos
        src2 = self.self_attn(q, k, src, key_padding_mask, spatial_shapes=(1, src.shape[1]))[0]
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


def _clones(layer: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(layer) for _ in range(n))


def _xavier(module: nn.Module) -> None:
    """DETR's initialisation of the transformer's matrices (the clones start out different)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class Encoder(nn.Module):
    """A stack of num_layers encoder layers over all tokens (DETR)."""

    def __init__(self, layer: EncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = _clones(layer, num_layers)
        _xavier(self)

    def forward(
        self, src: Tensor, pos: Tensor, key_padding_mask: Tensor, spatial_shapes: Sequence[Tuple[int, int]]
    ) -> Tensor:
        """src, pos (B, L, d); key_padding_mask (B, L) -> (B, L, d). spatial_shapes unused."""
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return src


class MultiScaleEncoder(nn.Module):
    """SMCA's multi-scale encoder: intra-scale layers -> one multi-scale layer -> intra-scale layers.

    An intra-scale layer attends within each level separately, with the same weights for every
    level; the multi-scale layer attends over the tokens of all levels. num_layers = 5 gives
    the paper's 2 + 1 + 2; in general num_layers // 2 intra-scale layers come first, then the
    multi-scale layer, then the rest.
    """

    def __init__(self, layer: EncoderLayer, num_layers: int) -> None:
        super().__init__()
        num_before = num_layers // 2
        self.intra_before = _clones(layer, num_before)
        self.multi_scale: Optional[EncoderLayer] = copy.deepcopy(layer) if num_layers > 0 else None
        self.intra_after = _clones(layer, max(num_layers - num_before - 1, 0))
        _xavier(self)

    @staticmethod
    def _intra_scale(
        layer: EncoderLayer,
        src: Tensor,
        pos: Tensor,
        key_padding_mask: Tensor,
        spatial_shapes: Sequence[Tuple[int, int]],
    ) -> Tensor:
        """Applies `layer` to each level's tokens alone; shapes as forward."""
        outs: List[Tensor] = [
            layer(s, p, m)
            for s, p, m in zip(
                split_levels(src, spatial_shapes),
                split_levels(pos, spatial_shapes),
                split_levels(key_padding_mask, spatial_shapes),
            )
        ]
        return torch.cat(outs, dim=1)

    def forward(
        self, src: Tensor, pos: Tensor, key_padding_mask: Tensor, spatial_shapes: Sequence[Tuple[int, int]]
    ) -> Tensor:
        """src, pos (B, L, d) with the levels concatenated along L; key_padding_mask (B, L);
        spatial_shapes [(Hf_s, Wf_s)] -> (B, L, d)."""
        for layer in self.intra_before:
            src = self._intra_scale(layer, src, pos, key_padding_mask, spatial_shapes)
        if self.multi_scale is not None:
            src = self.multi_scale(src, pos, key_padding_mask)
        for layer in self.intra_after:
            src = self._intra_scale(layer, src, pos, key_padding_mask, spatial_shapes)
        return src
