"""Hungarian matcher: a hand-computed cost, and optimality against brute force."""
import itertools
import math

import pytest
import torch

from smca.models.matcher import HungarianMatcher


def random_case(generator: torch.Generator, queries: int, sizes, classes: int = 4):
    outputs = {
        "pred_logits": torch.randn(len(sizes), queries, classes, generator=generator),
        "pred_boxes": 0.2 + 0.6 * torch.rand(len(sizes), queries, 4, generator=generator),
    }
    targets = [
        {
            "labels": torch.randint(0, classes, (n,), generator=generator),
            "boxes": 0.2 + 0.6 * torch.rand(n, 4, generator=generator),
        }
        for n in sizes
    ]
    return outputs, targets


def test_cost_on_hand_case():
    """p = sigmoid(0) = 1/2; L1 distance 0.1; boxes [0.4, 0.6]^2 and [0.5, 0.7] x [0.4, 0.6]."""
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    cost = matcher.cost_matrix(
        torch.zeros(1, 3), torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.tensor([1]), torch.tensor([[0.6, 0.5, 0.2, 0.2]])
    )
    # focal: positive 0.25 * 0.5^2 * ln 2, negative 0.75 * 0.5^2 * ln 2 -> class cost -0.125 ln 2
    class_cost = 0.25 * 0.25 * math.log(2) - 0.75 * 0.25 * math.log(2)
    # intersection 0.1 x 0.2 = 0.02, union 0.06, enclosing box 0.3 x 0.2 = 0.06 -> GIoU = 1/3
    expected = 2 * class_cost + 5 * 0.1 + 2 * -(1 / 3)
    torch.testing.assert_close(cost, torch.tensor([[expected]]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_matching_is_optimal(seed):
    generator = torch.Generator().manual_seed(seed)
    queries, sizes = 5, [3, 0, 4, 1]
    outputs, targets = random_case(generator, queries, sizes)
    matcher = HungarianMatcher()
    indices = matcher(outputs, targets)
    assert len(indices) == len(sizes)
    for b, ((rows, cols), target) in enumerate(zip(indices, targets)):
        n = len(target["labels"])
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == len(cols) == n
        assert sorted(cols.tolist()) == list(range(n)) and len(set(rows.tolist())) == n
        if n == 0:
            continue
        cost = matcher.cost_matrix(outputs["pred_logits"][b], outputs["pred_boxes"][b], target["labels"], target["boxes"])
        found = cost[rows, cols].sum().item()
        # brute force: target j goes to query chosen[j]
        best = min(
            sum(cost[chosen[j], j].item() for j in range(n)) for chosen in itertools.permutations(range(queries), n)
        )
        assert found == pytest.approx(best, abs=1e-5)


def test_exact_predictions_are_matched_to_their_targets():
    """Queries predicting the targets exactly (in shuffled order) are matched to them."""
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.3, 0.2, 0.4], [0.5, 0.8, 0.3, 0.2]])
    labels = torch.tensor([2, 0, 1])
    order = torch.tensor([2, 0, 1])  # query q predicts target order[q]
    logits = torch.full((1, 3, 3), -5.0)
    logits[0, torch.arange(3), labels[order]] = 5.0
    outputs = {"pred_logits": logits, "pred_boxes": boxes[order][None]}
    ((rows, cols),) = HungarianMatcher()(outputs, [{"labels": labels, "boxes": boxes}])
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 2, 1: 0, 2: 1}


def test_all_zero_costs_rejected():
    with pytest.raises(ValueError):
        HungarianMatcher(0, 0, 0)


def test_softmax_class_cost_is_minus_probability():
    """DETR's class cost: -softmax(logits)[target]; the no-object column only normalises."""
    matcher = HungarianMatcher(cost_class=1, cost_bbox=0, cost_giou=0, classifier="softmax")
    logits = torch.tensor([[0.0, math.log(2), math.log(3)], [math.log(5), 0.0, 0.0]])  # 2 classes + no object
    cost = matcher.cost_matrix(logits, torch.full((2, 4), 0.5), torch.tensor([1, 0]), torch.full((2, 4), 0.5))
    torch.testing.assert_close(cost, -torch.tensor([[2 / 6, 1 / 6], [1 / 7, 5 / 7]]))
    with pytest.raises(ValueError, match="classifier"):
        HungarianMatcher(classifier="softmx")
