"""COCO evaluation: ground truth scored as detections gives AP 1.0, with either backend."""

import contextlib
import copy
import io

import pytest
import torch
from torch import nn
from torchvision.ops import box_convert

from smca import Config
from smca.data import build_dataloader, build_dataset
from smca.data.synthetic import make_dataset
from smca.engine import coco_evaluate, evaluate, format_coco_summary

BACKENDS = ["pycocotools", "faster_coco_eval"]


def _require(backend):
    pytest.importorskip(backend)


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    root = make_dataset(
        str(tmp_path_factory.mktemp("shapes")), num_train=1, num_val=6, image_size=96, seed=7, max_objects=6
    )
    return build_dataset("val", Config(coco_path=root, min_sizes=(96,), eval_size=96, max_size=128))


def _ground_truth_detections(coco):
    return [
        dict(image_id=a["image_id"], category_id=a["category_id"], bbox=list(a["bbox"]), score=1.0)
        for a in coco.dataset["annotations"]
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ground_truth_gives_ap_one(val_set, backend):
    _require(backend)
    coco = val_set.coco
    stats = coco_evaluate(coco, _ground_truth_detections(coco), val_set.ids, backend=backend, verbose=False)
    assert stats.shape == (12,)
    assert stats[0] == 1.0 and stats[1] == 1.0 and stats[2] == 1.0
    assert stats[8] == 1.0  # AR@100
    # Per area range AP is not exactly 1: COCO sorts a detection into a range by its box area
    # and the truth by its segment area, so overlapping shapes of different ranges can swap.


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_detections_score_lower(val_set, backend):
    _require(backend)
    coco = val_set.coco
    shifted = _ground_truth_detections(coco)
    for d in shifted:
        d["bbox"][0] += d["bbox"][2] * 0.6  # IoU with the truth 0.25: misses at every threshold
    stats = coco_evaluate(coco, shifted, val_set.ids, backend=backend, verbose=False)
    assert stats[0] == 0.0 and stats[1] == 0.0
    # Each box relabelled to a category absent from its image: nothing can match.
    relabelled = []
    for d in _ground_truth_detections(coco):
        present = {a["category_id"] for a in coco.imgToAnns[d["image_id"]]}
        absent = sorted(set(coco.getCatIds()) - present)
        if absent:
            relabelled.append(dict(d, category_id=absent[0]))
    assert relabelled
    assert coco_evaluate(coco, relabelled, val_set.ids, backend=backend, verbose=False)[0] == 0.0


def test_backends_agree_on_noisy_detections(val_set):
    _require("faster_coco_eval")
    coco = val_set.coco
    generator = torch.Generator().manual_seed(0)
    noisy = _ground_truth_detections(coco)
    for d in noisy:
        d["bbox"] = [v + float(n) for v, n in zip(d["bbox"], torch.randn(4, generator=generator) * 3)]
        d["bbox"][2:] = [max(v, 1.0) for v in d["bbox"][2:]]
        d["score"] = float(torch.rand((), generator=generator))
    a = coco_evaluate(coco, copy.deepcopy(noisy), val_set.ids, backend="pycocotools", verbose=False)
    b = coco_evaluate(coco, copy.deepcopy(noisy), val_set.ids, backend="faster_coco_eval", verbose=False)
    assert 0.0 < a[0] < 1.0
    torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), atol=1e-6, rtol=0)


def _coco(boxes):
    """A pycocotools COCO of two 200 x 200 images, category 1 and 2, and the given
    (image_id, [x, y, w, h]) boxes of category 1."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dict(
        images=[dict(id=i, width=200, height=200, file_name=f"{i}.png") for i in (1, 2)],
        categories=[dict(id=1, name="a"), dict(id=2, name="b")],
        annotations=[
            dict(id=n + 1, image_id=i, category_id=1, bbox=list(b), area=b[2] * b[3], iscrowd=0)
            for n, (i, b) in enumerate(boxes)
        ],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


SMALL, MEDIUM, LARGE = [10, 10, 20, 20], [50, 50, 60, 60], [0, 0, 150, 150]  # areas 400, 3600, 22500
MISSING = -1.0  # COCO's value for a statistic without ground truth


def _stats(area_value, all_value):
    """The 12 statistics with `all_value` for the all-area ones and area_value[range] for the rest."""
    s, m, l = (area_value[r] for r in ("small", "medium", "large"))
    return [all_value] * 3 + [s, m, l] + [all_value] * 3 + [s, m, l]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "boxes, image_ids, expected",
    [
        # ground truth in the medium range only: no detection gives 0 there, -1 where there is none
        ([(1, MEDIUM)], [1, 2], _stats(dict(small=MISSING, medium=0.0, large=MISSING), 0.0)),
        ([(1, SMALL), (2, LARGE)], [1, 2], _stats(dict(small=0.0, medium=MISSING, large=0.0), 0.0)),
        ([(1, SMALL), (1, MEDIUM), (2, LARGE)], [1, 2], [0.0] * 12),
        ([], [1, 2], [MISSING] * 12),  # no ground truth at all
        ([(1, MEDIUM)], [2], [MISSING] * 12),  # none on the images evaluated
        ([(1, MEDIUM)], [], [MISSING] * 12),  # no images
    ],
)
def test_no_detections_is_zero_where_there_is_ground_truth_else_missing(backend, boxes, image_ids, expected):
    _require(backend)
    stats = coco_evaluate(_coco(boxes), [], image_ids, backend=backend, verbose=False)
    assert stats.tolist() == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_detections_without_ground_truth_are_missing_not_zero(backend):
    _require(backend)
    detections = [dict(image_id=1, category_id=1, bbox=MEDIUM, score=0.9)]
    assert coco_evaluate(_coco([]), detections, [1, 2], backend=backend, verbose=False).tolist() == [MISSING] * 12


@pytest.mark.parametrize("backend", BACKENDS)
def test_detections_outside_the_images_or_categories_are_ignored(backend):
    _require(backend)
    coco = _coco([(1, MEDIUM)])
    hit = dict(image_id=1, category_id=1, bbox=MEDIUM, score=0.9)
    expected = coco_evaluate(coco, [dict(hit)], [1], backend=backend, verbose=False).tolist()
    assert expected == pytest.approx(_stats(dict(small=MISSING, medium=1.0, large=MISSING), 1.0))
    others = [dict(hit, image_id=2), dict(hit, category_id=2), dict(hit, category_id=77)]
    assert coco_evaluate(coco, [dict(hit)] + others, [1], backend=backend, verbose=False).tolist() == expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["detections", "image_ids"])
def test_unknown_image_ids_are_a_clear_error(backend, where):
    _require(backend)
    detections = [dict(image_id=1, category_id=1, bbox=MEDIUM, score=0.9)]
    image_ids = [1, 2]
    if where == "detections":
        detections.append(dict(detections[0], image_id=99))
    else:
        image_ids.append(99)
    with pytest.raises(ValueError, match=rf"{where}: image ids \[99\] are not in the ground truth"):
        coco_evaluate(_coco([(1, MEDIUM)]), detections, image_ids, backend=backend, verbose=False)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend: expected 'auto'"):
        coco_evaluate(_coco([]), [], [1], backend="cocoapi", verbose=False)


def test_summary_matches_pycocotools(val_set, capsys):
    from pycocotools.cocoeval import COCOeval

    coco = val_set.coco
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(_ground_truth_detections(coco)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        evaluator.summarize()
    assert format_coco_summary(evaluator.stats) == out.getvalue().rstrip("\n")
    assert len(format_coco_summary(evaluator.stats).splitlines()) == 12


class _Oracle(nn.Module):
    """A 'model' whose post-processor answers with the ground truth of the images in loader order."""

    def __init__(self, dataset):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        coco = dataset.coco
        self.answers = []
        for image_id in dataset.ids:
            anns = coco.imgToAnns[image_id]
            boxes = box_convert(
                torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy"
            )
            labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
            self.answers.append(dict(scores=torch.ones(len(anns)), labels=labels, boxes=boxes))

    def forward(self, images, pixel_mask):
        return {"pred_logits": images.new_zeros(len(images), 1, 1), "pred_boxes": images.new_zeros(len(images), 1, 4)}

    def postprocess(self, outputs, target_sizes):
        return [self.answers.pop(0) for _ in range(len(target_sizes))]


def test_evaluate_loop_with_ground_truth(val_set, capsys):
    oracle = _Oracle(val_set)
    loader = build_dataloader(val_set, batch_size=4, num_workers=0, train=False)
    stats = evaluate(oracle, None, oracle.postprocess, loader, torch.device("cpu"), progress=False)
    assert stats["coco_eval_bbox"][0] == 1.0
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in printed
