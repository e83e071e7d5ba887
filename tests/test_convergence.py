"""Backbone pretraining (smca.pretrain_backbone) and the convergence study (benchmarks/convergence.py)."""

import csv
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil

import pytest
import torch

from smca import Config
from smca.config import PRESETS
from smca.data.synthetic import make_dataset
from smca.models import build_model
import smca.pretrain_backbone as pretrain_module
from smca.pretrain_backbone import IGNORE, cell_labels, pretrain_backbone
from smca.train import build_config, get_args_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_study():
    spec = importlib.util.spec_from_file_location("convergence", os.path.join(REPO, "benchmarks", "convergence.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = _load_study()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_dataset(
        str(tmp_path_factory.mktemp("shapes")), num_train=8, num_val=2, image_size=64, seed=0, max_objects=3
    )


def test_cell_labels_smallest_covering_box_and_padding():
    # A 64 x 96 image in a 4 x 8 map of stride 16 (the batch is padded to 128 wide).
    # Box A covers x 0..48, y 0..64; box B (smaller, inside A) covers x 16..32, y 16..32.
    h, w = 64, 96
    boxes_xyxy = torch.tensor([[0.0, 0.0, 48.0, 64.0], [16.0, 16.0, 32.0, 32.0]])
    cxcywh = torch.stack(
        [
            (boxes_xyxy[:, 0] + boxes_xyxy[:, 2]) / 2 / w,
            (boxes_xyxy[:, 1] + boxes_xyxy[:, 3]) / 2 / h,
            (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) / w,
            (boxes_xyxy[:, 3] - boxes_xyxy[:, 1]) / h,
        ],
        dim=1,
    )
    target = dict(boxes=cxcywh, labels=torch.tensor([3, 5]), size=torch.tensor([h, w]))
    labels = cell_labels([target], (4, 8), 16)[0]
    expected = torch.zeros(4, 8, dtype=torch.int64)
    expected[:, :3] = 3  # cell centres x 8, 24, 40 < 48 are inside A
    expected[1, 1] = 5  # the centre (24, 24) is inside both: the smaller box wins
    expected[:, 6:] = IGNORE  # centres x 104, 120 lie in the padding
    assert torch.equal(labels, expected)

    empty = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64), size=torch.tensor([h, w]))
    background = torch.zeros(4, 8, dtype=torch.int64)
    background[:, 6:] = IGNORE
    assert torch.equal(cell_labels([empty], (4, 8), 16)[0], background)


def test_pretraining_on_database_category_ids(data_root, tmp_path):
    """Category ids as databases write them (74673216...) get one class each, not a head of the
    largest id's size; a category with id 0 does not become the background."""
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    for split in ("train", "val"):
        path = root / "annotations" / f"instances_{split}2017.json"
        coco = json.loads(path.read_text())
        new_id = {c["id"]: 74673216 + 1000 * i for i, c in enumerate(coco["categories"])}
        for entry in coco["categories"] + coco["annotations"]:
            key = "id" if "name" in entry else "category_id"
            entry[key] = new_id[entry[key]]
        path.write_text(json.dumps(coco))
    cfg = Config(
        backbone="resnet18", coco_path=str(root), batch_size=2, num_workers=0, device="cpu",
        min_sizes=(64,), eval_size=64, max_size=96,
    )  # fmt: skip
    heads = []
    original = pretrain_module._CellClassifier.__init__

    def record(self, name, num_classes):
        heads.append(num_classes)
        original(self, name, num_classes)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pretrain_module._CellClassifier, "__init__", record)
        final = pretrain_backbone(cfg, str(tmp_path / "backbone.pth"), steps=1, progress=False)
    assert heads == [len(new_id) + 1] and math.isfinite(final["loss"])


def test_pretrained_backbone_loads_into_the_detector(data_root, tmp_path):
    cfg = Config(
        backbone="resnet18", coco_path=data_root, batch_size=2, num_workers=0, device="cpu",
        min_sizes=(64,), eval_size=64, max_size=96,
    )  # fmt: skip
    out = str(tmp_path / "backbone.pth")
    final = pretrain_backbone(cfg, out, steps=3, progress=False)
    assert set(final) == {"loss", "accuracy"} and final["loss"] > 0
    state = torch.load(out, weights_only=True)
    assert not [k for k in state if k.startswith("fc.")]
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]
    # The trained BatchNorm statistics reach the detector's frozen norm.
    model, _, _ = build_model(
        Config(backbone="resnet18", backbone_weights=out, num_classes=7, hidden_dim=32, nheads=4, lr_backbone=0)
    )
    assert torch.equal(model.backbone.layer4[1].bn2.running_mean, state["layer4.1.bn2.running_mean"])
    assert not torch.equal(state["bn1.running_var"], torch.ones_like(state["bn1.running_var"]))
    assert not any(p.requires_grad for p in model.backbone.parameters())  # lr_backbone 0: frozen


def test_backbone_norm_batch_trains_every_layer():
    cfg = Config(backbone="resnet18", backbone_norm="batch", num_classes=7, hidden_dim=32, nheads=4)
    model, _, _ = build_model(cfg)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    assert all(p.requires_grad for p in model.backbone.parameters())
    with pytest.raises(ValueError, match="lr_backbone <= 0 freezes the backbone"):
        Config(backbone_norm="batch", lr_backbone=0)
    with pytest.raises(ValueError, match="backbone_norm"):
        Config(backbone_norm="sync")


def _rows(curves):
    return [
        dict(model=model, seed=seed, step=step, ap=ap)
        for model, per_seed in curves.items()
        for seed, points in enumerate(per_seed)
        for step, ap in points
    ]


def test_summary_mean_over_seeds_and_steps_to_reach_the_baseline():
    rows = _rows(
        {
            "detr": [[(10, 0.0), (20, 0.1), (30, 0.2)], [(10, 0.0), (20, 0.1), (30, 0.4)]],  # final mean 0.3
            "smca": [[(10, 0.2), (20, 0.5), (30, 0.6)], [(10, 0.3), (20, 0.3), (30, 0.5)]],  # 0.25, 0.4, 0.55
            "smca_ms": [[(10, 0.0), (20, 0.1), (30, 0.2)], [(10, 0.0), (20, 0.1), (30, 0.2)]],
        }
    )
    steps, mean, low, high = study.mean_curves(rows)["smca"]
    assert steps == [10, 20, 30] and mean == pytest.approx([0.25, 0.4, 0.55])
    assert low == [0.2, 0.3, 0.5] and high == [0.3, 0.5, 0.6]
    summary = {s["model"]: s for s in study.summarize(rows)}
    assert summary["detr"]["final_ap"] == pytest.approx(0.3) and summary["detr"]["final_ap_seeds"] == [0.2, 0.4]
    assert summary["detr"]["steps_to_baseline"] == 30  # the baseline reaches itself at its last step
    assert summary["smca"]["steps_to_baseline"] == 20 and summary["smca"]["fraction_of_budget"] == pytest.approx(2 / 3)
    assert summary["smca_ms"]["steps_to_baseline"] is None
    table = study.format_summary(study.summarize(rows, attention={"smca": 0.5}))
    assert "| smca | 0.550 | 0.600 / 0.500 | 20 | 0.67 | 50% |" in table
    assert "| smca_ms | 0.200 | 0.200 / 0.200 | never |  |  |" in table


def test_a_seed_with_fewer_evaluations_only_counts_shared_steps():
    rows = _rows({"detr": [[(10, 0.1), (20, 0.2)], [(10, 0.3)]]})
    assert study.mean_curves(rows)["detr"][:2] == ([10], [pytest.approx(0.2)])


def test_study_end_to_end_writes_csv_plot_and_resumes(tmp_path, capsys):
    work, results = str(tmp_path / "work"), str(tmp_path / "results")
    tiny = ["--hidden_dim", "32", "--nheads", "4", "--num_queries", "8", "--enc_layers", "1", "--dec_layers", "2"]
    tiny += ["--dim_feedforward", "64", "--batch_size", "2", "--min_sizes", "64", "--eval_size", "64"]
    tiny += ["--max_size", "96"]
    argv = ["--models", "smca", "detr", "--seeds", "0", "1", "--epochs", "2", "--num_train", "8", "--num_val", "2"]
    argv += ["--work_dir", work, "--results", results, "--backbone_steps", "2"]
    argv += ["--num_workers", "0", "--", *tiny]
    study.main(argv)
    printed = capsys.readouterr().out
    with open(os.path.join(results, "convergence.csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["model", "seed", "step", "ap"]
    # 8 training images, batch 2: 4 steps an epoch, AP after each of the 2 epochs.
    assert [(r["model"], r["seed"], r["step"]) for r in rows] == [
        (m, s, st) for m in ("smca", "detr") for s in ("0", "1") for st in ("4", "8")
    ]
    assert all(0 <= float(r["ap"]) <= 1 for r in rows)
    assert os.path.getsize(os.path.join(results, "convergence.png")) > 0
    assert "steps to reach detr's final AP" in printed
    shares = re.findall(r"^\| (smca|detr) \|.* (\d+)% \|$", printed, re.MULTILINE)
    assert [m for m, _ in shares] == ["smca", "detr"] and all(0 <= int(p) <= 100 for _, p in shares)
    with open(os.path.join(work, "runs", "smca_seed1", "config.json")) as f:
        config = json.load(f)
    # The study's flags (the demo preset, a frozen backbone), then those after "--", then model and seed.
    assert (config["model"], config["seed"], config["hidden_dim"], config["lr_backbone"]) == ("smca", 1, 32, 0)
    assert config["backbone"] == "resnet18" and config["lr_drop"] == 2  # 80% of 2 epochs, rounded
    assert os.path.isfile(os.path.join(work, "backbone.pth"))

    # A second call finds every run finished: nothing trains again, the same CSV comes out.
    mtime = os.path.getmtime(os.path.join(work, "runs", "detr_seed0", "checkpoint.pth"))
    study.main(argv)
    assert os.path.getmtime(os.path.join(work, "runs", "detr_seed0", "checkpoint.pth")) == mtime
    with open(os.path.join(results, "convergence.csv")) as f:
        assert list(csv.DictReader(f)) == rows


def _study_config(model, extra=()):
    """The Config smca.train builds for one of the study's runs on the built-in data."""
    argv = [*study.STUDY_TRAIN_ARGS, *extra, *study.model_flags(model), "--seed", "0"]
    argv += ["--coco_path", "unused", "--output_dir", "unused"]
    return dataclasses.asdict(build_config(get_args_parser().parse_args(argv)))


def test_models_map_to_train_flags_and_differ_only_in_them():
    assert list(study.MODELS) == ["smca", "smca_ms", "detr", "detr_softmax"] and study.BASELINE == "detr"
    configs = {model: _study_config(model) for model in study.MODELS}
    assert {m: c["model"] for m, c in configs.items()} == dict(
        smca="smca", smca_ms="smca_ms", detr="detr", detr_softmax="detr"
    )
    # detr keeps SMCA's focal classifier (the SMCA paper's baseline); detr_softmax is DETR as
    # published, the classifier and loss weights of the detr_r50_published preset, on the demo model.
    assert configs["detr"]["classifier"] == "focal"
    published, loss = PRESETS["detr_r50_published"], ("classifier", "cls_loss_coef", "set_cost_class", "eos_coef")
    assert {k: configs["detr_softmax"][k] for k in loss} == {k: published[k] for k in loss}
    changed = {k for k in configs["detr"] if configs["detr"][k] != configs["detr_softmax"][k]}
    assert "classifier" in changed and changed == {k for k in loss if configs["detr"][k] != published[k]}
    assert configs["detr_softmax"]["num_queries"] == PRESETS["demo"]["num_queries"]  # the demo's, not DETR's 100
    # A model's flags win over those after "--" (they come last), and every label names its model.
    assert _study_config("detr_softmax", ["--classifier", "focal", "--num_queries", "20"])["classifier"] == "softmax"
    assert _study_config("detr_softmax", ["--num_queries", "20"])["num_queries"] == 20
    assert study.model_label("detr_softmax").startswith("detr_softmax: DETR as published")
    assert study.model_label("other") == "other"


def test_summary_without_the_baseline_has_no_steps_to_reach():
    summary = study.summarize(_rows({"smca": [[(10, 0.2), (20, 0.3)]]}))
    assert summary[0]["steps_to_baseline"] is None and summary[0]["final_ap"] == 0.3
    assert "| smca | 0.300 | 0.300 | - |  |" in study.format_summary(summary)
