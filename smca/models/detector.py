"""SMCADETR: backbone -> projection -> encoder -> SMCA decoder -> class and box heads."""
import math
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn
from .backbone import Backbone
from .decoder import MLP, Decoder
from .position_encoding import PositionEmbeddingSine
from ..config import CLASSIFIERS
from .postprocess import PostProcess
from ..utils import unpadded_sizes

__all__ = ["SMCADETR", "resize_mask"]


def _nearest_index(in_size, out_size, device) -> Tensor:
    """The source index of each of out_size cells under nearest resizing from in_size cells, as
    F.interpolate(mode="nearest") computes it: floor(i * s) with s = float32(in) / float32(out)
    in float32, at most in_size - 1 (equal sizes and doubling give i and i // 2 either way)."""
    one = torch.ones((), dtype=torch.float32, device=device)
    scale = (one * in_size) / (one * out_size)
    index = (torch.arange(out_size, dtype=torch.float32, device=device) * scale).floor().long()
    return index.clamp(max=in_size - 1)


def resize_mask(mask: Tensor, size) -> Tensor:
    """(B, H, W) bool -> (B, *size) bool: nearest resizing, the cells that
    F.interpolate(mask[None].float(), size) picks, written with indexing so that the sizes may
    be symbolic (torch.export, ONNX) and the exported graph picks the same cells as eager."""
    rows = _nearest_index(mask.shape[-2], size[0], mask.device)
    cols = _nearest_index(mask.shape[-1], size[1], mask.device)
    return mask.index_select(-2, rows).index_select(-1, cols)


class SMCADETR(nn.Module):
    """SMCA-DETR (single- or multi-scale) and, with a plain decoder, DETR.

    Args:
        backbone: returns the maps used as levels (one: C5; multi-scale: C4, C5).
        input_proj: one module per backbone map, C_l -> d channels.
        extra_level: None, or a module C5 -> d at twice the last stride (multi-scale).
        position_encoding: mask (B, Hf, Wf) -> (B, d, Hf, Wf).
        encoder: (src, pos, mask, spatial_shapes) -> memory, all (B, L, ...).
        decoder: a Decoder whose strides match the levels.
        num_classes, num_queries: object classes, number of queries.
        classifier: "focal" (num_classes sigmoid logits per query, the class bias starting at
            probability 0.01, SMCA) or "softmax" (num_classes + 1 logits, the last "no
            object", DETR).
        aux_loss: also return the predictions of every decoder layer but the last.
        postprocess: the PostProcess of inference on raw images (smca.predict.predict).
        eval_size, max_size: inference on raw images (smca.predict) resizes as evaluation does:
            the shorter side to eval_size, the longer to at most max_size, the cap winning
            (smca.data.transforms.resized_size).
    """

    def __init__(
        self,
        backbone: Backbone,
        input_proj: nn.ModuleList,
        extra_level: Optional[nn.Module],
        position_encoding: PositionEmbeddingSine,
        encoder: nn.Module,
        decoder: Decoder,
        *,
        num_classes: int,
        num_queries: int,
        classifier: str = "focal",
        aux_loss: bool,
        postprocess: PostProcess,
        eval_size: int,
        max_size: int,
    ) -> None:
        super().__init__()
        d_model = decoder.norm.normalized_shape[0]
        self.backbone = backbone
        self.input_proj = input_proj
        self.extra_level = extra_level
        self.position_encoding = position_encoding
        self.encoder = encoder
        self.decoder = decoder
        self.num_levels = len(input_proj) + (extra_level is not None)
        self.level_embed = nn.Parameter(torch.randn(self.num_levels, d_model)) if self.num_levels > 1 else None
        self.query_embed = nn.Embedding(num_queries, d_model)
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier: expected one of {CLASSIFIERS}, got {classifier!r}")
        self.classifier = classifier
        self.class_embed = nn.Linear(d_model, num_classes + (classifier == "softmax"))
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        if classifier == "focal":
            # Every class starts at probability 0.01 so the focal loss of the many negatives is small.
            nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        self.aux_loss = aux_loss
        self.postprocess = postprocess
        self.eval_size = eval_size
        self.max_size = max_size

    def forward(self, images: Tensor, pixel_mask: Tensor, attention_layer: Optional[int] = None) -> Dict:
        """
        Args:
            images: (B, 3, H, W) ImageNet-normalised, padded at the bottom and right.
            pixel_mask: (B, H, W) bool, True = padding.
            attention_layer: also return that decoder layer's cross-attention ("attention").
        Returns:
            pred_logits (B, Nq, num_classes) sigmoid logits, or (B, Nq, num_classes + 1) softmax
            logits with "no object" last (classifier "softmax"); pred_boxes (B, Nq, 4) cxcywh in
            [0, 1] of each image's unpadded size; aux_outputs (with aux_loss) a list of
            dict(pred_logits, pred_boxes) for decoder layers 0 .. L-2.
        """
        features = list(self.backbone(images).values())
        return self.forward_features(features, pixel_mask, attention_layer)

    def forward_features(
        self, features: List[Tensor], pixel_mask: Tensor, attention_layer: Optional[int] = None
    ) -> Dict:
        """Everything after the backbone: features [(B, C_l, Hf_l, Wf_l)] as the backbone returns
        them, pixel_mask (B, H, W) of the input. See forward."""
        srcs = [proj(f) for proj, f in zip(self.input_proj, features)]
        if self.extra_level is not None:
            srcs.append(self.extra_level(features[-1]))
        masks = [resize_mask(pixel_mask, s.shape[-2:]) for s in srcs]
        # The sizes as the shapes give them: ints in eager, symbolic sizes under torch.export
        # (int() would specialise the exported graph to the example's size).
        spatial_shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]

        src_flat, pos_flat, mask_flat = [], [], []
        for level, (src, mask) in enumerate(zip(srcs, masks)):
            # In the parameters' dtype (a .half() or .double() model; under autocast they stay float32).
            pos = self.position_encoding(mask).to(self.query_embed.weight.dtype).flatten(2).transpose(1, 2)  # (B, Hf * Wf, d)
            if self.level_embed is not None:
                pos = pos + self.level_embed[level]
            src_flat.append(src.flatten(2).transpose(1, 2))
            pos_flat.append(pos)
            mask_flat.append(mask.flatten(1))
        src = torch.cat(src_flat, dim=1)  # (B, L, d)
        pos = torch.cat(pos_flat, dim=1)
        mask = torch.cat(mask_flat, dim=1)  # (B, L)

        memory = self.encoder(src, pos, mask, spatial_shapes)
        hs, reference_logits, attention = self.decoder(
            self.query_embed.weight, memory, pos, mask, spatial_shapes, unpadded_sizes(pixel_mask), attention_layer
        )  # hs (layers, B, Nq, d)
        logits = self.class_embed(hs)
        box = self.bbox_embed(hs)
        if reference_logits is not None:
            # The reference point is the prior of the box centre, added before the sigmoid.
            box = torch.cat([box[..., :2] + reference_logits, box[..., 2:]], dim=-1)
        boxes = box.sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        if attention is not None:
            out["attention"] = dict(attention, spatial_shapes=spatial_shapes)
        return out

    def param_groups(self, lr_backbone: float) -> List[Dict]:
        """Trainable parameters for the optimizer: the backbone's at lr_backbone, the rest at the
        optimizer's default lr. Frozen parameters (stem, layer1) are left out."""
        backbone = [p for n, p in self.named_parameters() if n.startswith("backbone.") and p.requires_grad]
        rest = [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        return [{"params": rest}, {"params": backbone, "lr": lr_backbone}]
