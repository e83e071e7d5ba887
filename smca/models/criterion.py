"""Set-prediction losses: sigmoid focal loss, L1 and GIoU on matched boxes, auxiliary losses."""
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from .matcher import HungarianMatcher
from ..config import CLASSIFIERS

__all__ = ["SetCriterion"]

Indices = List[Tuple[Tensor, Tensor]]  # per image: (query indices, target indices)
Outputs = Dict[str, Tensor]  # pred_logits (B, Nq, C), pred_boxes (B, Nq, 4)
Targets = List[Dict[str, Tensor]]  # per image: labels (M,), boxes (M, 4)


class SetCriterion(nn.Module):
    """DETR's criterion, with the sigmoid focal loss (SMCA, Deformable-DETR) or DETR's
    cross-entropy as the class loss.

    For each decoder layer's predictions: match them to the targets (Hungarian), then
        loss_ce   = "focal": sum over queries x classes of focal(logit, one-hot of the matched
                    label, all zeros for unmatched queries) / num_boxes;
                    "softmax": the cross-entropy of every query against its matched label or
                    "no object" (index num_classes), weighted 1 per class and eos_coef for
                    "no object", averaged with those weights (DETR, Sec. 3.1),
        loss_bbox = sum of |pred - target| over matched boxes and the 4 cxcywh coordinates / num_boxes,
        loss_giou = sum of (1 - GIoU) over matched boxes / num_boxes,
    with num_boxes the number of target boxes averaged over processes (at least 1).

    Args:
        num_classes: logits per query; target labels must lie in [0, num_classes).
        matcher: a HungarianMatcher.
        weight_dict: weight of "loss_ce", "loss_bbox", "loss_giou" (the same for every layer).
        focal_alpha, focal_gamma: of the focal loss.
        classifier: "focal" (logits (B, Nq, num_classes)) or "softmax" (B, Nq, num_classes + 1).
        eos_coef: weight of the "no object" class in the softmax classifier's cross-entropy.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Dict[str, float],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        classifier: str = "focal",
        eos_coef: float = 0.1,
    ) -> None:
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ValueError(f"classifier: expected one of {CLASSIFIERS}, got {classifier!r}")
        self.num_classes = num_classes
        self.classifier = classifier
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @staticmethod
    def _matched_queries(indices: Indices, device: torch.device) -> Tuple[Tensor, Tensor]:
        """(batch index (M,), query index (M,)) of every matched prediction, on `device`."""
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        query_idx = torch.cat([src for src, _ in indices])
        return batch_idx.to(device), query_idx.to(device)

    @staticmethod
    def _matched_targets(targets: Targets, key: str, indices: Indices, device: torch.device) -> Tensor:
        """targets[b][key] of every matched target (M, ...), in the order of _matched_queries."""
        return torch.cat([t[key][tgt] for t, (_, tgt) in zip(targets, indices)]).to(device)

    def loss_labels(self, outputs: Outputs, targets: Targets, indices: Indices, num_boxes: float) -> Dict[str, Tensor]:
        """Focal loss over all queries and classes, or the softmax classifier's weighted
        cross-entropy -> {"loss_ce"}."""
        logits = outputs["pred_logits"]  # (B, Nq, C), or (B, Nq, C + 1) for "softmax"
        batch_idx, query_idx = self._matched_queries(indices, logits.device)
        labels = self._matched_targets(targets, "labels", indices, logits.device)
        if self.classifier == "softmax":
            target = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
            target[batch_idx, query_idx] = labels
            weight = self.empty_weight.to(logits.device)
            return {"loss_ce": F.cross_entropy(logits.transpose(1, 2).float(), target, weight)}
        one_hot = torch.zeros_like(logits)
        one_hot[batch_idx, query_idx, labels] = 1.0
        loss = sigmoid_focal_loss(logits, one_hot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum")
        return {"loss_ce": loss / num_boxes}

    def loss_boxes(self, outputs: Outputs, targets: Targets, indices: Indices, num_boxes: float) -> Dict[str, Tensor]:
        """L1 and GIoU on matched boxes (cxcywh, normalised) -> {"loss_bbox", "loss_giou"}."""
        boxes = outputs["pred_boxes"]
        pred = boxes[self._matched_queries(indices, boxes.device)]  # (M, 4)
        target = self._matched_targets(targets, "boxes", indices, boxes.device).to(pred.dtype)
        loss_bbox = F.l1_loss(pred, target, reduction="sum")
        giou = generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy"))
        return {"loss_bbox": loss_bbox / num_boxes, "loss_giou": (1 - torch.diag(giou)).sum() / num_boxes}

    @torch.no_grad()
    def logging_metrics(self, outputs: Outputs, targets: Targets, indices: Indices) -> Dict[str, Tensor]:
        """class_error: % of matched queries whose top class is wrong; cardinality_error: mean
        |number of predicted objects - number of targets|, a predicted object being a query
        whose top class probability exceeds 0.5 ("focal") or whose top class is not "no object"
        ("softmax", as DETR). Not differentiable."""
        logits = outputs["pred_logits"]
        matched = logits[self._matched_queries(indices, logits.device)]  # (M, C)
        labels = self._matched_targets(targets, "labels", indices, logits.device)
        if len(labels) > 0:
            class_error = 100.0 - 100.0 * (matched.argmax(-1) == labels).float().mean()
        else:
            class_error = logits.new_zeros(())
        if self.classifier == "softmax":
            predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        else:
            predicted = (logits.sigmoid().amax(-1) > 0.5).sum(1).float()
        counts = torch.as_tensor([float(len(t["labels"])) for t in targets], device=logits.device)
        return {"class_error": class_error, "cardinality_error": F.l1_loss(predicted, counts)}

    def _num_boxes(self, targets: Targets, device: torch.device) -> float:
        num_boxes = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            num_boxes = num_boxes / dist.get_world_size()
        return max(num_boxes.item(), 1.0)

    def _check_labels(self, targets: Targets) -> None:
        labels = torch.cat([t["labels"] for t in targets])
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"target labels must lie in [0, num_classes={self.num_classes}), got "
                f"[{int(labels.min())}, {int(labels.max())}]: set num_classes to the largest category id + 1"
            )

    def forward(self, outputs: Dict, targets: Targets) -> Dict[str, Tensor]:
        """
        Args:
            outputs: the model's dict: pred_logits (B, Nq, C), pred_boxes (B, Nq, 4) and
                optionally aux_outputs, a list of dicts with the same two keys.
            targets: B dicts with labels (M_b,) int64 and boxes (M_b, 4) cxcywh normalised to
                the unpadded image.
        Returns:
            "loss": the weighted total over all layers (the one to back-propagate);
            "loss_ce", "loss_bbox", "loss_giou" of the last layer and "loss_ce_{i}" ... of
            auxiliary layer i, unweighted and detached (for logging);
            "class_error", "cardinality_error" of the last layer (detached).
        """
        self._check_labels(targets)
        num_boxes = self._num_boxes(targets, outputs["pred_logits"].device)
        layers = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(outputs.get("aux_outputs", []))]
        total = outputs["pred_logits"].new_zeros(())
        result: Dict[str, Tensor] = {}
        for suffix, layer_outputs in layers:
            indices = self.matcher(layer_outputs, targets)
            losses = self.loss_labels(layer_outputs, targets, indices, num_boxes)
            losses.update(self.loss_boxes(layer_outputs, targets, indices, num_boxes))
            for name, value in losses.items():
                total = total + self.weight_dict[name] * value
                result[name + suffix] = value.detach()
            if suffix == "":
                result.update(self.logging_metrics(layer_outputs, targets, indices))
        result["loss"] = total
        return result
