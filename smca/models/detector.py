"""SMCADETR: backbone -> projection -> encoder -> SMCA decoder -> class and box heads."""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from smca_kernels.reference import gaussian_log_prior

from ..data.transforms import resized_size
from .backbone import Backbone
from .decoder import MLP, Decoder
from .position_encoding import PositionEmbeddingSine
from ..config import CLASSIFIERS
from .postprocess import PostProcess, class_probabilities
from .utils import boxes_to_pixels, normalize, pad_images, unpadded_sizes

__all__ = ["SMCADETR"]

Images = Union[Tensor, Sequence[Tensor]]


def _resize(maps: Tensor, size: Tuple[int, int]) -> Tensor:
    """(B, K, h, w) -> (B, K, *size), bilinear; unchanged when already that size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


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
        postprocess: PostProcess used by predict.
        eval_size, max_size: predict() resizes as evaluation does: the shorter side to eval_size,
            the longer to at most max_size, the cap winning (smca.data.transforms.resized_size).
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

    # ------------------------------------------------------------------------------------------
    # Training / evaluation forward
    # ------------------------------------------------------------------------------------------
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
        masks = [F.interpolate(pixel_mask[None].float(), size=s.shape[-2:]).to(torch.bool)[0] for s in srcs]
        spatial_shapes = [(int(s.shape[-2]), int(s.shape[-1])) for s in srcs]

        src_flat, pos_flat, mask_flat = [], [], []
        for level, (src, mask) in enumerate(zip(srcs, masks)):
            pos = self.position_encoding(mask).flatten(2).transpose(1, 2)  # (B, Hf * Wf, d)
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

    # ------------------------------------------------------------------------------------------
    # Inference on raw images
    # ------------------------------------------------------------------------------------------
    def prepare_images(self, images: Images) -> Tuple[Tensor, Tensor, Tensor]:
        """Raw images -> model input at the evaluation size.

        Args:
            images: a list of (3, H_b, W_b) tensors or a (B, 3, H, W) batch, float in [0, 1]
                or uint8.
        Returns:
            batch (B, 3, Hm, Wm) normalised and padded, pixel_mask (B, Hm, Wm),
            original_sizes (B, 2) (h, w) of the inputs.
        """
        if isinstance(images, Tensor):
            images = [images] if images.dim() == 3 else list(images.unbind(0))
        device = self.query_embed.weight.device
        resized, sizes = [], []
        for image in images:
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"images: expected (3, H, W) tensors, got shape {tuple(image.shape)}")
            image = image.to(device)
            image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
            sizes.append(image.shape[-2:])
            # the size evaluation resizes to (the cap may win over eval_size)
            image = TF.resize(image, list(resized_size(*sizes[-1], self.eval_size, self.max_size)), antialias=True)
            resized.append(normalize(image))
        batch, pixel_mask = pad_images(resized)
        return batch, pixel_mask, torch.as_tensor([list(s) for s in sizes], device=device)

    @torch.no_grad()
    def _run_eval(self, images: Images, attention_layer: Optional[int] = None) -> Tuple[Dict, Tensor, Tensor]:
        """Runs the model in eval mode (restoring the mode after) -> (outputs, pixel_mask, original_sizes)."""
        batch, pixel_mask, sizes = self.prepare_images(images)
        was_training = self.training
        self.eval()
        try:
            outputs = self(batch, pixel_mask, attention_layer)
        finally:
            self.train(was_training)
        return outputs, pixel_mask, sizes

    @torch.no_grad()
    def predict(self, images: Images, threshold: float = 0.5) -> List[Dict[str, Tensor]]:
        """Detections on raw images; no targets needed.

        Args:
            images: see prepare_images (any sizes; resized to the evaluation size internally).
            threshold: keep detections whose score exceeds it.
        Returns:
            one dict per image: boxes (K, 4) absolute xyxy in the input image's pixels,
            labels (K,) int64, scores (K,), by decreasing score.
        """
        outputs, _, sizes = self._run_eval(images)
        results = self.postprocess(outputs, sizes)
        return [{k: v[r["scores"] > threshold] for k, v in r.items()} for r in results]

    @torch.no_grad()
    def attention_maps(self, images: Images, query_indices: Sequence[int], layer: int = -1) -> Dict:
        """Gaussian prior and cross-attention of chosen queries over the feature map, for pictures.

        With several levels the maps of the coarser levels are resized onto the finest level's
        grid: the attention keeps its mass (it sums to 1 over all levels), the prior is the
        alpha-weighted mixture of the levels' priors.

        Args:
            images: see prepare_images.
            query_indices: K query indices.
            layer: decoder layer (negative counts from the last).
        Returns:
            attention (B, K, Hf, Wf) head-averaged cross-attention weights;
            prior (B, K, Hf, Wf) head-averaged Gaussian weights exp(logG) in [0, 1] (None for DETR);
            feature_size (Hf, Wf) and stride: cell (x, y) covers pixels [stride x, stride (x + 1))
                of the padded input of size padded_size (Hm, Wm);
            image_sizes (B, 2) (h, w) of each resized image in that input (the rest is padding);
            boxes (B, K, 4) the queries' boxes in the original images' pixels (xyxy);
            scores (B, K) their top class probability, labels (B, K) that class.
        """
        outputs, pixel_mask, sizes = self._run_eval(images, attention_layer=layer)
        att = outputs["attention"]
        index = torch.as_tensor(list(query_indices), dtype=torch.long, device=pixel_mask.device)
        shapes = att["spatial_shapes"]
        height, width = shapes[0]
        weights = att["weights"][:, index]  # (B, K, L)

        attention, prior = [], []
        for level, (w_level, (h, w)) in enumerate(zip(weights.split([h * w for h, w in shapes], dim=-1), shapes)):
            w_level = w_level.unflatten(-1, (h, w))  # (B, K, h, w)
            # a coarse level's cell spreads its weight over the finer cells it covers
            attention.append(_resize(w_level, (height, width)) * (h * w) / (height * width))
            if att["centers"] is not None:
                log_prior = gaussian_log_prior(
                    att["centers"][:, :, index, level], att["precision"][:, :, index, level], (h, w)
                )  # (B, H or 1, K, h * w)
                level_prior = log_prior.exp().mean(1).unflatten(-1, (h, w))
                if att["alpha"] is not None:
                    level_prior = level_prior * att["alpha"][:, 0, index, level, None, None]
                prior.append(_resize(level_prior, (height, width)))

        scores, labels = class_probabilities(outputs["pred_logits"][:, index], self.classifier).max(-1)
        return {
            "attention": torch.stack(attention).sum(0),
            "prior": torch.stack(prior).sum(0) if prior else None,
            "feature_size": (height, width),
            "stride": self.decoder.strides[0],
            "padded_size": tuple(pixel_mask.shape[-2:]),
            "image_sizes": unpadded_sizes(pixel_mask).long(),
            "boxes": boxes_to_pixels(outputs["pred_boxes"][:, index], sizes),
            "scores": scores,
            "labels": labels,
        }
