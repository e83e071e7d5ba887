"""Hungarian matching of predictions to ground truth (DETR; the focal-loss class cost of SMCA)."""
from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from ..config import CLASSIFIERS
from .postprocess import class_probabilities

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_class * C_class + cost_bbox * L1 + cost_giou * (-GIoU).

    The class cost of the "focal" classifier is the focal loss of the target class as a
    positive minus as a negative (Deformable-DETR, SMCA): with p = sigmoid(logit),
        C_class = alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p));
    the "softmax" classifier's is DETR's C_class = -p with p = softmax(logits) of the target
    class. Queries left unassigned are background.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        classifier: str = "focal",
    ) -> None:
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier: expected one of {CLASSIFIERS}, got {classifier!r}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.classifier = classifier

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """logits (N, C), or (N, C + 1) for "softmax"; boxes (N, 4) cxcywh; tgt_labels (M,),
        tgt_boxes (M, 4) -> cost (N, M)."""
        prob = class_probabilities(logits, self.classifier)
        if self.classifier == "softmax":
            cost_class = -prob[:, tgt_labels]
        else:
            eps = 1e-8
            alpha, gamma = self.focal_alpha, self.focal_gamma
            neg = (1 - alpha) * prob**gamma * -(1 - prob + eps).log()
            pos = alpha * (1 - prob) ** gamma * -(prob + eps).log()
            cost_class = pos[:, tgt_labels] - neg[:, tgt_labels]
        boxes, tgt_boxes = boxes.float(), tgt_boxes.float()
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: pred_logits (B, Nq, C), pred_boxes (B, Nq, 4) cxcywh normalised.
            targets: B dicts with labels (M_b,) int64 and boxes (M_b, 4) cxcywh normalised.
        Returns:
            B pairs (query indices, target indices), int64 CPU tensors of length min(Nq, M_b);
            query i_k is matched to target j_k.
        """
        batch, queries = outputs["pred_logits"].shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        tgt_labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets])
        cost = self.cost_matrix(
            outputs["pred_logits"].flatten(0, 1), outputs["pred_boxes"].flatten(0, 1), tgt_labels, tgt_boxes
        )
        cost = cost.view(batch, queries, -1).cpu()
        indices = [linear_sum_assignment(c[b]) for b, c in enumerate(cost.split(sizes, dim=-1))]
        return [
            (torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices
        ]
