"""SMCA's decoder: DETR's post-norm decoder whose cross-attention is spatially modulated.

Every layer l computes u = LayerNorm(t + query_pos) from its input. Layer 0's u gives the
reference point r = sigmoid(MLP(u)) in normalised image coordinates (x, y); every layer's u
gives per-head (or head-shared) offsets and scales, so that the Gaussian prior of query i is
centred at r in grid cells plus the offset, with precision = scale / sqrt(beta) (docs/model.md,
Decoder and the modulation). The scale is one of the paper's code's `--dynamic_scale` types:
"type1" a constant 1, "type2" one per head (both axes), "type3" one per head and axis. With
several feature levels each level has its own offsets and scales, and alpha = softmax over
levels of a linear layer of u mixes them (scale-selective co-attention). With `gaussian=False`
the same layers are plain DETR.

All tensors are batch-first: queries (B, Nq, d), memory (B, L, d), masks (B, L) True = padding.
"""
import copy
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smca_kernels import SMCAAttention

from ..config import DYNAMIC_SCALES

__all__ = ["MLP", "DecoderLayer", "Decoder", "SCALE_AXES", "coordinates"]

# Scales the Gaussian head predicts per head and level, by dynamic_scale (type1: none, scale 1).
SCALE_AXES = dict(zip(DYNAMIC_SCALES, (0, 1, 2)))


def coordinates(x: Tensor) -> Tensor:
    """Grid coordinates and their modulation reach ~100 cells, so 16-bit values (autocast) are
    computed in float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class MLP(nn.Module):
    """num_layers linear layers with ReLU between them (DETR's box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        """(..., input_dim) -> (..., output_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DecoderLayer(nn.Module):
    """Self-attention, SMCA co-attention, FFN; post-norm.

    Args:
        d_model, nheads, dim_feedforward, dropout: as DETR.
        gaussian: modulate the cross-attention (SMCA); False gives DETR's plain attention.
        head_shared: one offset and scale for all heads instead of one per head.
        dynamic_scale: "type1" (scale 1, no scale head), "type2" (one scale per head) or
            "type3" (one per head and axis).
        num_levels: feature levels of the memory; > 1 mixes them by alpha (scale selection).
        beta: Gaussian bandwidth; precision = scale / sqrt(beta).
        backend: smca_kernels backend of the cross-attention.
    """

    def __init__(
        self,
        d_model: int,
        nheads: int,
        dim_feedforward: int,
        dropout: float,
        *,
        gaussian: bool = True,
        head_shared: bool = False,
        dynamic_scale: str = "type3",
        num_levels: int = 1,
        beta: float = 8.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nheads, dropout=dropout, batch_first=True)
        self.cross_attn = SMCAAttention(d_model, nheads, dropout=dropout, batch_first=True, backend=backend)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

        self.gaussian = gaussian
        self.num_levels = num_levels
        self.modulated_heads = 1 if head_shared else nheads
        if dynamic_scale not in SCALE_AXES:
            raise ValueError(f"dynamic_scale: expected one of {sorted(SCALE_AXES)}, got {dynamic_scale!r}")
        self.scale_axes = SCALE_AXES[dynamic_scale]
        self.beta = beta
        self.norm_modulation: Optional[nn.LayerNorm] = None
        self.offsets: Optional[nn.Linear] = None
        self.scales: Optional[nn.Linear] = None
        self.level_weights: Optional[nn.Linear] = None
        if gaussian or num_levels > 1:
            self.norm_modulation = nn.LayerNorm(d_model)
        if gaussian:
            self.offsets = nn.Linear(d_model, 2 * num_levels * self.modulated_heads)
            if self.scale_axes:
                self.scales = nn.Linear(d_model, self.scale_axes * num_levels * self.modulated_heads)
        if num_levels > 1:
            self.level_weights = nn.Linear(d_model, num_levels)

    def reset_modulation(self) -> None:
        """Scales start at 1 for every query (weight 0, bias 1), as the reference."""
        if self.scales is not None:
            nn.init.zeros_(self.scales.weight)
            nn.init.ones_(self.scales.bias)

    def modulation_input(self, tgt: Tensor, query_pos: Tensor) -> Optional[Tensor]:
        """u = LayerNorm(tgt + query_pos) (B, Nq, d), or None for plain single-level attention."""
        if self.norm_modulation is None:
            return None
        return self.norm_modulation(tgt + query_pos)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        u: Optional[Tensor],
        key: Tensor,
        memory: Tensor,
        memory_mask: Tensor,
        spatial_shapes: Sequence[Tuple[int, int]],
        reference_grid: Optional[Tensor],
        need_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Dict[str, Optional[Tensor]]]]:
        """
        Args:
            tgt (B, Nq, d) decoder state; query_pos (B, Nq, d) learned query embedding;
            u (B, Nq, d) from modulation_input (None when not modulated);
            key (B, L, d) memory + position encoding; memory (B, L, d); memory_mask (B, L);
            spatial_shapes [(Hf_s, Wf_s)] of the S levels concatenated in the memory;
            reference_grid (B, Nq, S, 2) reference point (x, y) in each level's grid cells,
                float32 (float64 in a float64 model; None when not gaussian).
            need_weights: also return the cross-attention weights and the Gaussian parameters.
        Returns:
            tgt (B, Nq, d) and, with need_weights, dict(weights (B, Nq, L) head-averaged,
            centers, precision (B, H or 1, Nq, S, 2) or None, alpha (B, 1, Nq, S) or None).
        """
        q = k = tgt + query_pos
        tgt2 = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))

        batch, queries, _ = tgt.shape
        centers = precision = alpha = None
        if self.gaussian:
            shape = (batch, queries, self.modulated_heads, self.num_levels, -1)
            offsets = coordinates(self.offsets(u)).view(shape).permute(0, 2, 1, 3, 4)  # (B, H or 1, Nq, S, 2)
            centers = reference_grid.unsqueeze(1) + offsets
            if self.scales is None:
                precision = torch.full_like(offsets, 1 / math.sqrt(self.beta))
            else:
                # type2's one scale per head applies to both axes
                scales = coordinates(self.scales(u)).view(shape).permute(0, 2, 1, 3, 4)
                precision = scales.expand_as(offsets) / math.sqrt(self.beta)
        if self.level_weights is not None:
            alpha = coordinates(self.level_weights(u)).softmax(dim=-1).unsqueeze(1)  # (B, 1, Nq, S)
        tgt2, weights = self.cross_attn(
            tgt + query_pos,
            key,
            memory,
            key_padding_mask=memory_mask,
            centers=centers,
            precision=precision,
            spatial_shapes=list(spatial_shapes),
            alpha=alpha,
            need_weights=need_weights,
        )
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        tgt = self.norm3(tgt + self.dropout3(tgt2))
        if not need_weights:
            return tgt, None
        return tgt, {"weights": weights, "centers": centers, "precision": precision, "alpha": alpha}


class Decoder(nn.Module):
    """num_layers decoder layers, the reference-point head, and the shared output LayerNorm.

    Args:
        layer: a DecoderLayer, cloned num_layers times.
        num_layers: decoder depth.
        strides: stride in pixels of each memory level (converts r to grid cells).
    """

    def __init__(self, layer: DecoderLayer, num_layers: int, strides: Sequence[int]) -> None:
        super().__init__()
        d_model = layer.norm1.normalized_shape[0]
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.strides = list(strides)
        self.reference_point: Optional[MLP] = MLP(d_model, d_model, 2, 3) if layer.gaussian else None
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for dec_layer in self.layers:
            dec_layer.reset_modulation()

    def forward(
        self,
        query_embed: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        memory_mask: Tensor,
        spatial_shapes: Sequence[Tuple[int, int]],
        image_sizes: Tensor,
        attention_layer: Optional[int] = None,
    ) -> Tuple[Tensor, Optional[Tensor], Optional[Dict[str, Optional[Tensor]]]]:
        """
        Args:
            query_embed (Nq, d) learned queries; memory, memory_pos (B, L, d); memory_mask (B, L);
            spatial_shapes [(Hf_s, Wf_s)]; image_sizes (B, 2) float unpadded (h, w) in pixels;
            attention_layer: index of the layer whose cross-attention to return (None: none).
        Returns:
            hs (num_layers, B, Nq, d) normalised outputs of every layer;
            reference_logits (B, Nq, 2) pre-sigmoid reference point (x, y), None for DETR;
            attention: the chosen layer's dict (see DecoderLayer.forward), or None.
        """
        batch = memory.shape[0]
        query_pos = query_embed.unsqueeze(0).expand(batch, -1, -1)
        tgt = torch.zeros_like(query_pos)
        key = memory + memory_pos
        if attention_layer is not None:
            attention_layer = range(len(self.layers))[attention_layer]  # negative indices too

        reference_logits = reference_grid = attention = None
        hs = []
        for index, layer in enumerate(self.layers):
            u = layer.modulation_input(tgt, query_pos)
            if index == 0 and self.reference_point is not None:
                reference_logits = self.reference_point(u)
                grid_sizes = torch.stack(
                    [image_sizes.flip(-1) / stride for stride in self.strides], dim=1
                )  # (B, S, 2): unpadded (w, h) in each level's cells
                reference_grid = coordinates(reference_logits).sigmoid().unsqueeze(2) * grid_sizes.unsqueeze(1)
            need_weights = index == attention_layer
            tgt, info = layer(
                tgt, query_pos, u, key, memory, memory_mask, spatial_shapes, reference_grid, need_weights
            )
            if need_weights:
                attention = info
            hs.append(self.norm(tgt))
        return torch.stack(hs), reference_logits, attention
