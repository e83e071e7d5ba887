"""Losses on hand-checked cases: focal, L1, GIoU, their weights, auxiliary layers, bad labels."""
import math

import pytest
import torch

from smca.models.criterion import SetCriterion
from smca.models.matcher import HungarianMatcher

LN2 = math.log(2)
WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def make_criterion(num_classes: int = 2) -> SetCriterion:
    return SetCriterion(num_classes, HungarianMatcher(2, 5, 2), WEIGHTS, focal_alpha=0.25, focal_gamma=2.0)


def hand_case():
    """One image, 2 queries, 2 classes, all logits 0 (p = 1/2); one target of class 1.

    Query 0 is at L1 distance 0.1 of the target, query 1 far away, so query 0 is matched.
    Focal loss: the positive (query 0, class 1) costs 0.25 * (1/2)^2 * ln 2 = 0.0625 ln 2, each of
    the 3 negatives 0.75 * (1/2)^2 * ln 2 = 0.1875 ln 2: loss_ce = 0.625 ln 2 (num_boxes = 1).
    L1: 0.1. Boxes [0.4, 0.6]^2 and [0.5, 0.7] x [0.4, 0.6]: IoU = 0.02 / 0.06, the enclosing
    box has area 0.06 = the union, GIoU = 1/3, loss_giou = 2/3.
    """
    logits = torch.zeros(1, 2, 2, requires_grad=True)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]], requires_grad=True)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2]])}]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets


def test_each_loss_on_hand_case():
    outputs, targets = hand_case()
    losses = make_criterion()(outputs, targets)
    assert losses["loss_ce"].item() == pytest.approx(0.625 * LN2, rel=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0.1, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(2 / 3, rel=1e-5)
    assert losses["loss"].item() == pytest.approx(2 * 0.625 * LN2 + 5 * 0.1 + 2 * 2 / 3, rel=1e-5)
    # argmax of the tie [0, 0] is the first class, 0; the target is 1
    assert losses["class_error"].item() == 100.0
    assert losses["cardinality_error"].item() == 1.0  # no score above 0.5, one target


def test_total_backpropagates_and_components_are_detached():
    outputs, targets = hand_case()
    losses = make_criterion()(outputs, targets)
    assert all(not v.requires_grad for k, v in losses.items() if k != "loss")
    losses["loss"].backward()
    # only query 0 is matched: query 1's box gets no gradient, its logits push down (negatives)
    assert outputs["pred_boxes"].grad[0, 1].abs().sum() == 0
    assert outputs["pred_boxes"].grad[0, 0].abs().sum() > 0
    assert (outputs["pred_logits"].grad[0, 1] > 0).all()
    assert outputs["pred_logits"].grad[0, 0, 1] < 0  # the matched class is pushed up


def test_aux_losses_and_normalisation_by_boxes():
    outputs, targets = hand_case()
    # an empty second image changes nothing: num_boxes is still 1
    outputs = {k: torch.cat([v.detach(), v.detach()]) for k, v in outputs.items()}
    targets = targets + [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    outputs["aux_outputs"] = [{"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}]
    losses = make_criterion()(outputs, targets)
    # image 2 has no target: its 4 (query, class) pairs are negatives, 0.1875 ln 2 each
    loss_ce = (0.625 + 4 * 0.1875) * LN2
    assert losses["loss_ce"].item() == pytest.approx(loss_ce, rel=1e-6)
    assert losses["loss_ce_0"].item() == pytest.approx(loss_ce, rel=1e-6)
    assert losses["loss_bbox_0"].item() == pytest.approx(0.1, rel=1e-5)
    assert losses["loss_giou_0"].item() == pytest.approx(2 / 3, rel=1e-5)
    one_layer = 2 * loss_ce + 5 * 0.1 + 2 * 2 / 3
    assert losses["loss"].item() == pytest.approx(2 * one_layer, rel=1e-5)


def test_no_targets_at_all():
    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": torch.full((1, 3, 4), 0.5)}
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    losses = make_criterion()(outputs, targets)
    assert losses["loss_ce"].item() == pytest.approx(6 * 0.1875 * LN2, rel=1e-6)  # num_boxes clamps to 1
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0


def test_labels_out_of_range_are_rejected():
    outputs, targets = hand_case()
    targets[0]["labels"] = torch.tensor([2])
    with pytest.raises(ValueError, match="num_classes"):
        make_criterion(num_classes=2)(outputs, targets)


def test_softmax_cross_entropy_on_hand_case():
    """DETR's classifier: logits (B, Nq, C + 1), the last column "no object" weighted eos_coef.

    The hand case's 2 queries with 3 logits [0, 0, 0] (p = 1/3 each): query 0 matched to class 1,
    query 1 "no object" (index 2): loss = (1 ln 3 + eos ln 3) / (1 + eos) = ln 3 for any eos.
    With query 1's logits [0, 0, ln 4] its "no object" probability is 4/6: loss =
    (ln 3 + eos ln 1.5) / (1 + eos).
    """
    outputs, targets = hand_case()
    eos = 0.1
    criterion = SetCriterion(2, HungarianMatcher(1, 5, 2, classifier="softmax"), WEIGHTS, classifier="softmax", eos_coef=eos)
    logits = torch.zeros(1, 2, 3, requires_grad=True)
    losses = criterion({"pred_logits": logits, "pred_boxes": outputs["pred_boxes"]}, targets)
    assert losses["loss_ce"].item() == pytest.approx(math.log(3), rel=1e-6)
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, math.log(4)]]], requires_grad=True)
    losses = criterion({"pred_logits": logits, "pred_boxes": outputs["pred_boxes"]}, targets)
    assert losses["loss_ce"].item() == pytest.approx((math.log(3) + eos * math.log(1.5)) / (1 + eos), rel=1e-6)
    # cardinality: queries whose top class is not "no object" (query 0's tie picks class 0)
    assert losses["cardinality_error"].item() == 0.0
    losses["loss"].backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="classifier"):
        SetCriterion(2, HungarianMatcher(), WEIGHTS, classifier="sigmoid")
