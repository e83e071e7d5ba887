"""COCO evaluation: ground truth scored as detections gives AP 1.0, with either backend."""

import contextlib
import copy
import io
import json
import os
import shutil

import pytest
import torch
from torch import nn
from torchvision.ops import box_convert

from smca import Config
from smca.checkpoint import load_checkpoint
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


# Category ids as databases write them, COCO's results file, an image-info file (test-dev).

TINY = ["--model", "smca", "--backbone", "resnet18", "--hidden_dim", "32", "--nheads", "4", "--num_queries", "10",
        "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64", "--lr", "1e-3", "--lr_backbone", "1e-4",
        "--batch_size", "2", "--num_workers", "0", "--device", "cpu", "--min_sizes", "64", "--eval_size", "64",
        "--max_size", "96", "--seed", "1", "--no_progress"]
SPARSE = 74673216  # a database's id


def _renumbered(root, new_id, drop_annotations=False):
    """Rewrite root's annotation files with category ids new_id(id) (and, for val, no
    "annotations" key: an image-info file as COCO's test-dev one)."""
    for split in ("train", "val"):
        path = os.path.join(root, "annotations", f"instances_{split}2017.json")
        with open(path) as f:
            coco = json.load(f)
        for entry in coco["categories"]:
            entry["id"] = new_id(entry["id"])
        for ann in coco["annotations"]:
            ann["category_id"] = new_id(ann["category_id"])
        if drop_annotations and split == "val":
            del coco["annotations"]
        with open(path, "w") as f:
            json.dump(coco, f)
    return root


def _load_results(ann_file, results_file, backend):
    """The results file read back by the backend's own loadRes, against the annotation file."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO
    else:
        from faster_coco_eval import COCO
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(ann_file)
        return gt, gt.loadRes(results_file)


def categories_of(root):
    with open(os.path.join(root, "annotations", "instances_val2017.json")) as f:
        return [c["id"] for c in json.load(f)["categories"]]


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    """One epoch on the shapes with category ids SPARSE + 1000 k (k = 1..6): (data root, output
    dir, results file)."""
    from smca import train

    root = _renumbered(
        make_dataset(str(tmp_path_factory.mktemp("sparse")), num_train=2, num_val=2, image_size=64, seed=5),
        lambda k: SPARSE + 1000 * k,
    )
    out = str(tmp_path_factory.mktemp("run"))
    results = os.path.join(out, "results", "val.json")
    train.main(TINY + ["--coco_path", root, "--output_dir", out, "--epochs", "1", "--results_file", results])
    return root, out, results


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_category_ids_train_with_one_class_each_and_keep_their_ids(sparse_run, backend):
    """Six categories numbered from 74674216: six logits (not 74.7 million), the mapping in the
    checkpoint, the results file in the annotation file's ids, read by COCO's loadRes."""
    _require(backend)
    root, out, results = sparse_run
    state = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    ids = [SPARSE + 1000 * k for k in range(1, 7)]
    assert state["config"]["num_classes"] == 6 and state["model"]["class_embed.weight"].shape[0] == 6
    assert sorted(state["categories"]) == ids
    gt, loaded = _load_results(os.path.join(root, "annotations", "instances_val2017.json"), results, backend)
    detections = loaded.dataset["annotations"]
    assert len(detections) == 2 * 10 * 6  # top-k over 10 queries x 6 classes, 2 images
    assert {d["category_id"] for d in detections} == set(ids)
    assert {d["image_id"] for d in detections} == set(gt.getImgIds())
    assert all(len(d["bbox"]) == 4 and 0 <= d["score"] <= 1 for d in detections)
    assert not [name for name in os.listdir(os.path.dirname(results)) if name != "val.json"]  # no temporary left


def test_sparse_category_ids_evaluate_and_predict_with_the_checkpoints_mapping(sparse_run, tmp_path, capsys):
    """--eval --resume and smca.predict give the annotation file's ids: the results file holds
    them, and predict's JSON names the categories."""
    from smca import train
    from smca.predict import load_model, predict_files

    root, out, _ = sparse_run
    checkpoint = os.path.join(out, "checkpoint.pth")
    capsys.readouterr()
    results = str(tmp_path / "eval.json")
    train.main(["--eval", "--resume", checkpoint, "--coco_path", root, "--results_file", results, "--no_progress"])
    printed = capsys.readouterr().out
    assert f"written to {results} (COCO results format)" in printed and "Average Precision" in printed
    with open(results) as f:
        assert {d["category_id"] for d in json.load(f)} == set(categories_of(root))
    model, _, categories = load_model(checkpoint)
    image = os.path.join(root, "val2017", sorted(os.listdir(os.path.join(root, "val2017")))[0])
    report = predict_files(model, [image], str(tmp_path / "pred"), 0.0, categories)
    found = report["images"][0]["detections"]
    assert found and all(d["category_id"] in categories for d in found)
    assert all(d["category"] == categories[d["category_id"]] for d in found)


def test_resume_onto_other_category_ids_is_a_clear_error(sparse_run, tmp_path, capsys):
    from smca import train

    root, out, _ = sparse_run
    other = str(tmp_path / "other")
    shutil.copytree(root, other)
    _renumbered(other, lambda i: i + 5)  # 74674221, ...: not the checkpoint's
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--eval", "--resume", os.path.join(out, "checkpoint.pth"), "--coco_path", other, "--no_progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "the checkpoint's num_classes 6: the data's category ids [74674221" in err
    assert "start a new run from its weights with --finetune instead" in err


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_info_file_without_annotations_writes_results_and_no_ap(sparse_run, tmp_path, backend, capsys):
    """COCO test-dev's image_info_test-dev2017.json has images and categories, no annotations:
    nothing can be scored, the results file is still written, in the categories' ids."""
    _require(backend)
    from smca import train

    root, out, _ = sparse_run
    test_dev = str(tmp_path / "test_dev")
    shutil.copytree(root, test_dev)
    _renumbered(test_dev, lambda i: i, drop_annotations=True)
    capsys.readouterr()
    results = str(tmp_path / "detections_test-dev2017_smca_results.json")
    train.main(["--eval", "--resume", os.path.join(out, "checkpoint.pth"), "--coco_path", test_dev,
                "--results_file", results, "--no_progress"])
    printed = capsys.readouterr().out
    assert "has no annotations (an image-info file, as COCO test-dev's): nothing to score, no AP" in printed
    assert "Average Precision" not in printed
    _, loaded = _load_results(os.path.join(test_dev, "annotations", "instances_val2017.json"), results, backend)
    assert {d["category_id"] for d in loaded.dataset["annotations"]} <= {SPARSE + 1000 * k for k in range(1, 7)}
    assert len(loaded.dataset["annotations"]) == 120


def test_results_file_that_is_a_folder_is_refused_before_the_model_runs(val_set, tmp_path):
    oracle = _Oracle(val_set)
    loader = build_dataloader(val_set, batch_size=4, num_workers=0, train=False)
    with pytest.raises(OSError, match=f"--results_file {tmp_path} is a folder; expected a file name"):
        evaluate(
            oracle, None, oracle.postprocess, loader, torch.device("cpu"), progress=False, results_file=str(tmp_path)
        )
    assert len(oracle.answers) == len(val_set)  # nothing was run


def test_evaluate_maps_classes_to_the_datasets_category_ids(val_set, tmp_path, capsys):
    """Detections of class i are scored, and written, as category class_ids[i]."""
    from smca.data.coco import class_ids

    ids = sorted(val_set.categories)
    val_set.set_classes([*ids], len(ids))  # class i: ids[i] (here id i + 1)
    try:
        oracle = _Oracle(val_set)
        for answer in oracle.answers:  # the oracle answers in classes, as a model does
            answer["labels"] = torch.tensor([ids.index(int(label)) for label in answer["labels"]], dtype=torch.int64)
        loader = build_dataloader(val_set, batch_size=4, num_workers=0, train=False)
        results = str(tmp_path / "r.json")
        stats = evaluate(oracle, None, oracle.postprocess, loader, torch.device("cpu"), progress=False,
                         results_file=results)
        assert stats["coco_eval_bbox"][0] == 1.0
        with open(results) as f:
            assert {d["category_id"] for d in json.load(f)} <= set(ids)
    finally:
        val_set.set_classes(class_ids(ids), max(ids) + 1)
