"""Model outputs -> detections: scores per class, the top ones, boxes in absolute xyxy."""
from typing import Dict, List

import torch
from torch import Tensor, nn

from ..config import CLASSIFIERS
from ..utils import boxes_to_pixels

__all__ = ["PostProcess", "class_probabilities"]


def class_probabilities(logits: Tensor, classifier: str) -> Tensor:
    """Per-class probabilities (..., C) in float32 from the classifier's logits.

    Args:
        logits: "focal": (..., C) sigmoid logits; "softmax": (..., C + 1), the last one "no
            object" (DETR).
        classifier: "focal" or "softmax".
    Returns:
        "focal": sigmoid(logits); "softmax": softmax(logits) without the no-object column.
    Raises ValueError for another classifier.
    """
    if classifier == "focal":
        return logits.float().sigmoid()
    if classifier == "softmax":
        return logits.float().softmax(-1)[..., :-1]
    raise ValueError(f"classifier: expected one of {CLASSIFIERS}, got {classifier!r}")


class PostProcess(nn.Module):
    """Detections from class probabilities (class_probabilities) and boxes.

    "focal": the topk highest (query, class) scores per image, a query possibly appearing with
    several classes, as Deformable-DETR and SMCA do for sigmoid classifiers. "softmax": each
    query's most probable object class (DETR's PostProcess), then the topk best queries.

    Args:
        topk: detections per image (fewer when Nq * C, or Nq for "softmax", is smaller).
        classifier: "focal" or "softmax", as the model's.
    """

    def __init__(self, topk: int = 300, classifier: str = "focal") -> None:
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier: expected one of {CLASSIFIERS}, got {classifier!r}")
        self.topk = topk
        self.classifier = classifier

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], target_sizes: Tensor) -> List[Dict[str, Tensor]]:
        """
        Args:
            outputs: pred_logits (B, Nq, C or C + 1, see class_probabilities), pred_boxes
                (B, Nq, 4) cxcywh normalised.
            target_sizes: (B, 2) (h, w) in pixels of the images the boxes are wanted for
                (the original images for COCO evaluation).
        Returns:
            B dicts, sorted by decreasing score: scores (K,), labels (K,) int64 class ids,
            boxes (K, 4) absolute (x1, y1, x2, y2).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        if len(logits) != len(target_sizes):
            raise ValueError(f"target_sizes: expected {len(logits)} sizes, got {len(target_sizes)}")
        probs = class_probabilities(logits, self.classifier)  # (B, Nq, C)
        if self.classifier == "softmax":
            probs, best = probs.max(-1, keepdim=True)  # (B, Nq, 1): one class per query
        batch, queries, classes = probs.shape
        scores = probs.flatten(1)  # (B, Nq * C), index = query * C + class
        top_scores, top_index = scores.topk(min(self.topk, queries * classes), dim=1)
        query_index = torch.div(top_index, classes, rounding_mode="floor")
        labels = top_index % classes
        if self.classifier == "softmax":
            labels = torch.gather(best.squeeze(-1), 1, query_index)

        xyxy = boxes_to_pixels(boxes, target_sizes)
        xyxy = torch.gather(xyxy, 1, query_index.unsqueeze(-1).expand(-1, -1, 4))  # (B, K, 4)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(top_scores, labels, xyxy)]
