"""Model outputs -> detections: top-k over query x class, boxes in absolute xyxy."""
from typing import Dict, List

import torch
from torch import Tensor, nn

from .utils import boxes_to_pixels

__all__ = ["PostProcess"]


class PostProcess(nn.Module):
    """Keeps the topk highest (query, class) scores per image (a query may appear with several
    classes), as Deformable-DETR / SMCA do for sigmoid classifiers.

    Args:
        topk: detections per image (fewer when Nq * C is smaller).
    """

    def __init__(self, topk: int = 300) -> None:
        super().__init__()
        self.topk = topk

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """
        Args:
            outputs: pred_logits (B, Nq, C), pred_boxes (B, Nq, 4) cxcywh normalised.
            target_sizes: (B, 2) (h, w) in pixels of the images the boxes are wanted for
                (the original images for COCO evaluation).
        Returns:
            B dicts, sorted by decreasing score: scores (K,), labels (K,) int64 class ids,
            boxes (K, 4) absolute (x1, y1, x2, y2).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes):
            raise ValueError(f"target_sizes: expected {len(logits)} sizes, got {len(target_sizes)}")
        batch, queries, classes = logits.shape
        scores = logits.float().sigmoid().flatten(1)  # (B, Nq * C), index = query * C + class
        top_scores, top_index = scores.topk(min(self.topk, queries * classes), dim=1)
        query_index = torch.div(top_index, classes, rounding_mode="floor")
        labels = top_index % classes

        xyxy = boxes_to_pixels(boxes, target_sizes)
        xyxy = torch.gather(xyxy, 1, query_index.unsqueeze(-1).expand(-1, -1, 4))  # (B, K, 4)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(top_scores, labels, xyxy)]
