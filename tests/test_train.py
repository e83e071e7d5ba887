"""Training CLI: exact resume after a kill, 2-process DDP (gloo), non-finite loss, bad inputs, predict."""

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import smca.models
from smca import train
from smca.checkpoint import load_checkpoint
from smca.config import Config
from smca.data.synthetic import CATEGORIES, make_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--model",
    "smca",
    "--backbone",
    "resnet18",
    "--hidden_dim",
    "32",
    "--nheads",
    "4",
    "--num_queries",
    "10",
    "--enc_layers",
    "1",
    "--dec_layers",
    "2",
    "--dim_feedforward",
    "64",
    "--dropout",
    "0.1",
    "--lr",
    "1e-3",
    "--lr_backbone",
    "1e-4",
    "--lr_drop",
    "1",
    "--batch_size",
    "2",
    "--num_workers",
    "0",
    "--device",
    "cpu",
    "--min_sizes",
    "64",
    "80",
    "--eval_size",
    "64",
    "--max_size",
    "96",
    "--seed",
    "1",
    "--no_progress",
]
EPOCHS = 2
NAMES = {i + 1: name for i, name in enumerate(CATEGORIES)}


def _digest(root):
    """{relative path: sha256} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_dataset(
        str(tmp_path_factory.mktemp("shapes")), num_train=8, num_val=2, image_size=64, seed=0, max_objects=3
    )


@pytest.fixture(scope="module")
def straight_run(data_root, tmp_path_factory):
    """A run of EPOCHS epochs straight through; its output directory."""
    out = str(tmp_path_factory.mktemp("straight"))
    train.main(TINY + ["--coco_path", data_root, "--output_dir", out, "--epochs", str(EPOCHS)])
    return out


def test_straight_run_outputs(straight_run, capsys):
    log = _log(straight_run)
    assert [line["epoch"] for line in log] == list(range(EPOCHS))
    assert [line["step"] for line in log] == [4 * (e + 1) for e in range(EPOCHS)]  # 8 images, batch 2
    assert all(len(line["test_coco_eval_bbox"]) == 12 for line in log)
    assert log[0]["train_lr"] == 1e-3 and log[1]["train_lr"] == pytest.approx(1e-4)  # lr_drop 1
    state = load_checkpoint(os.path.join(straight_run, "checkpoint.pth"))
    assert state["epoch"] == EPOCHS - 1
    assert state["config"]["num_classes"] == 7  # the data's largest category id + 1
    assert state["categories"][1] == "ellipse"
    with open(os.path.join(straight_run, "config.json")) as f:
        assert json.load(f)["hidden_dim"] == 32
    assert not [name for name in os.listdir(straight_run) if ".tmp" in name]


@pytest.mark.parametrize("flags", ["the run's", "none"])
def test_eval_only_reproduces_the_logged_ap(flags, straight_run, data_root, tmp_path, capsys):
    """--eval --resume measures the checkpoint as its run evaluated it, with the run's flags or with
    none: image sizes, model and seed not given are the checkpoint's."""
    out = str(tmp_path / "eval")
    train.main(
        (TINY if flags == "the run's" else ["--device", "cpu", "--num_workers", "0", "--no_progress"])
        + [
            "--coco_path",
            data_root,
            "--resume",
            os.path.join(straight_run, "checkpoint.pth"),
            "--eval",
            "--output_dir",
            out,
        ]
    )
    printed = capsys.readouterr().out
    assert sum(line.startswith((" Average Precision", " Average Recall")) for line in printed.splitlines()) == 12
    with open(os.path.join(out, "eval.json")) as f:
        stats = json.load(f)["test_coco_eval_bbox"]
    assert stats == _log(straight_run)[-1]["test_coco_eval_bbox"]


def test_flags_override_the_preset():
    parse = train.get_args_parser().parse_args
    flags = ["--preset", "demo", "--beta", "2", "--backbone_norm", "batch", "--lr_backbone", "1e-4"]
    cfg = train.build_config(parse(flags))
    assert (cfg.beta, cfg.backbone_norm, cfg.lr_backbone, cfg.hidden_dim) == (2.0, "batch", 1e-4, 64)
    # The demo preset freezes its backbone: a trainable norm needs a backbone rate.
    with pytest.raises(ValueError, match="lr_backbone <= 0 freezes the backbone"):
        train.build_config(parse(["--preset", "demo", "--backbone_norm", "batch"]))


def test_atomic_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous checkpoint and no temporary file."""
    from smca import Config
    from smca.checkpoint import save_checkpoint

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    path = str(tmp_path / "checkpoint.pth")
    kwargs = dict(model=model, optimizer=optimizer, lr_scheduler=scheduler, cfg=Config(device="cpu"))
    save_checkpoint(path, epoch=0, **kwargs)
    before = _digest(str(tmp_path))

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, epoch=1, **kwargs)
    assert _digest(str(tmp_path)) == before
    assert load_checkpoint(path)["epoch"] == 0


def test_killed_and_resumed_run_ends_with_the_same_weights(data_root, straight_run, tmp_path):
    """Kill a training process right after its first checkpoint, resume it: the final weights,
    optimizer state and losses equal the straight run's, bit for bit."""
    out = str(tmp_path / "killed")
    checkpoint = os.path.join(out, "checkpoint.pth")
    argv = TINY + ["--coco_path", data_root, "--output_dir", out, "--epochs", str(EPOCHS)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "smca.train"] + argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        while not os.path.exists(checkpoint) and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert os.path.exists(checkpoint), err.decode()
    killed_at = load_checkpoint(checkpoint)["epoch"]
    assert killed_at < EPOCHS - 1, "the run finished before it was killed; nothing was resumed"

    train.main(argv + ["--resume", checkpoint])

    straight = load_checkpoint(os.path.join(straight_run, "checkpoint.pth"))
    resumed = load_checkpoint(checkpoint)
    assert resumed["epoch"] == EPOCHS - 1
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for group, state in straight["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed["optimizer"]["state"][group][key]))
    assert straight["lr_scheduler"] == resumed["lr_scheduler"]
    straight_log, resumed_log = _log(straight_run), _log(out)
    assert [line["epoch"] for line in resumed_log] == list(range(EPOCHS))
    for a, b in zip(straight_log, resumed_log):
        assert a["train_loss"] == b["train_loss"] and a["test_coco_eval_bbox"] == b["test_coco_eval_bbox"]


def test_ddp_two_processes_gloo(data_root, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "smca.train"]
    cmd += TINY + ["--coco_path", data_root, "--output_dir", out, "--epochs", "1"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # Only the main process logs, evaluates and writes.
    assert result.stdout.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 1
    assert result.stdout.count("epoch 0:") == 1
    assert [line["epoch"] for line in _log(out)] == [0]
    state = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert len(state["rng"]) == 2  # one generator state per process
    assert not any(k.startswith("module.") for k in state["model"])


class _NaNAfter(torch.nn.Module):
    """Wraps a criterion; its training loss turns NaN from the given training call on."""

    def __init__(self, criterion, first_bad_call):
        super().__init__()
        self.criterion = criterion
        self.first_bad_call = first_bad_call
        self.calls = 0

    def forward(self, outputs, targets):
        losses = self.criterion(outputs, targets)
        if self.training:
            self.calls += 1
            if self.calls >= self.first_bad_call:
                losses["loss"] = losses["loss"] * float("nan")
        return losses


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data_root, tmp_path, monkeypatch, capsys):
    build = smca.models.build_model

    def build_with_nan(cfg):
        model, criterion, postprocessor = build(cfg)
        return model, _NaNAfter(criterion, first_bad_call=6), postprocessor  # 4 steps an epoch: epoch 1, step 1

    monkeypatch.setattr(smca.models, "build_model", build_with_nan)
    out = str(tmp_path / "nan")
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--coco_path", data_root, "--output_dir", out, "--epochs", str(EPOCHS)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "smca-train: error: loss is nan at epoch 1, iteration 1" in err and "last good checkpoint" in err
    checkpoint = os.path.join(out, "checkpoint.pth")
    assert f"is left as it was (epoch 0): continue from it with --resume {checkpoint} with a lower --lr" in err
    state = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert state["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert [line["epoch"] for line in _log(out)] == [0]


@pytest.fixture(scope="module")
def existing_output(straight_run, tmp_path_factory):
    """An output directory holding a previous run's files, and their digest."""
    out = tmp_path_factory.mktemp("existing")
    for name in ("checkpoint.pth", "log.txt", "config.json"):
        shutil.copyfile(os.path.join(straight_run, name), out / name)
    return str(out), _digest(str(out))


class _Tiny(torch.nn.Module):
    """A stand-in detector: one weight, outputs of the model's shapes."""

    def __init__(self, value):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(1.0))
        self.value = value

    def forward(self, images, pixel_mask):
        out = self.weight * torch.full((len(images), 3, 4), self.value)
        return {"pred_logits": out, "pred_boxes": out.sigmoid()}


@pytest.mark.parametrize(
    "value, loss_fn, message",
    [
        (0.0, lambda out: torch.sqrt(out["pred_logits"].sum() * 0), "gradients are not finite"),  # d sqrt(0) = inf
        (float("nan"), lambda out: out["pred_logits"].sum(), "outputs are not finite"),
    ],
)
def test_non_finite_outputs_or_gradients_stop_before_the_update(value, loss_fn, message):
    from smca.engine import NonFiniteLossError, train_one_epoch

    model = _Tiny(value)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = (torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool), [{}, {}])

    class Criterion(torch.nn.Module):
        def forward(self, outputs, targets):
            return {"loss": loss_fn(outputs)}

    with pytest.raises(NonFiniteLossError, match=message):
        train_one_epoch(model, Criterion(), [batch], optimizer, torch.device("cpu"), epoch=0, progress=False)
    assert model.weight.item() == 1.0


def _write_data(tmp_path, data_root, train_annotations):
    """A data root sharing data_root's images, with the given text as the training annotations."""
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        os.symlink(os.path.join(data_root, f"{split}2017"), root / f"{split}2017")
    with open(os.path.join(data_root, "annotations", "instances_val2017.json")) as f:
        (root / "annotations" / "instances_val2017.json").write_text(f.read())
    (root / "annotations" / "instances_train2017.json").write_text(train_annotations)
    return str(root)


def _broken_annotations(data_root, case):
    """The training annotations of data_root with one thing broken, as JSON text."""
    with open(os.path.join(data_root, "annotations", "instances_train2017.json")) as f:
        coco = json.load(f)
    if case == "negative_box":
        coco["annotations"][1]["bbox"][3] = -2
    elif case == "string_image_ids":  # as some converters write
        for entry in coco["images"]:
            entry["id"] = f"img_{entry['id']}"
        for ann in coco["annotations"]:
            ann["image_id"] = f"img_{ann['image_id']}"
    elif case == "missing_image_file":
        coco["images"][3]["file_name"] = "not_there.png"
    return json.dumps(coco)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_data", "does not exist"),
        ("invalid_json", "not a valid COCO annotation file"),
        ("negative_box", "negative width or height"),
        ("string_image_ids", "has id 'img_1'; COCO image ids are integers"),
        ("missing_image_file", "1 of the 8 listed images cannot be read: image id 4: image '"),
        ("other_model", "another model or configuration: model: checkpoint 'smca', run 'detr'"),
        ("other_size", "hidden_dim: checkpoint 32, run 64"),
        ("corrupt_checkpoint", "corrupt, truncated"),
        ("results_file_folder", "is a folder; expected a file name"),
    ],
)
def test_bad_input_is_a_clear_error_and_touches_no_output(data_root, existing_output, tmp_path, capsys, case, message):
    out, before = existing_output
    checkpoint = os.path.join(out, "checkpoint.pth")
    if case == "corrupt_checkpoint":
        with open(checkpoint, "rb") as f:
            (tmp_path / "corrupt.pth").write_bytes(f.read()[:5000])
        checkpoint = str(tmp_path / "corrupt.pth")
    argv = TINY + ["--output_dir", out, "--epochs", "5", "--resume", checkpoint, "--coco_path"]
    if case == "missing_data":
        argv += [str(tmp_path / "no_such_dir")]
    elif case == "invalid_json":
        argv += [_write_data(tmp_path, data_root, '{"images": [{"id": 1,')]
    elif case in ("negative_box", "string_image_ids", "missing_image_file"):
        argv += [_write_data(tmp_path, data_root, _broken_annotations(data_root, case))]
    else:
        argv += [data_root]
        if case == "other_model":
            argv += ["--model", "detr"]
        elif case == "other_size":
            argv += ["--hidden_dim", "64"]
        elif case == "results_file_folder":
            argv += ["--results_file", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert _digest(out) == before


@pytest.mark.parametrize("resume", ["none", "another_checkpoint"])
def test_a_new_run_never_overwrites_an_earlier_checkpoint(data_root, existing_output, tmp_path, capsys, resume):
    out, before = existing_output
    checkpoint = os.path.join(out, "checkpoint.pth")
    argv = TINY + ["--output_dir", out, "--epochs", "5", "--coco_path", data_root]
    if resume == "another_checkpoint":  # e.g. starting from another run's weights
        shutil.copy(checkpoint, tmp_path / "other.pth")
        argv += ["--resume", str(tmp_path / "other.pth")]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    assert f"already holds {checkpoint} from an earlier run" in capsys.readouterr().err
    assert _digest(out) == before


def test_predict_writes_json_and_png(straight_run, data_root, tmp_path):
    from smca import predict

    images = [
        os.path.join(data_root, "val2017", name) for name in sorted(os.listdir(os.path.join(data_root, "val2017")))
    ]
    out = str(tmp_path / "pred")
    predict.main(
        [
            "--checkpoint",
            os.path.join(straight_run, "checkpoint.pth"),
            "--images",
            *images,
            "--output_dir",
            out,
            "--threshold",
            "0.0",
            "--attention_queries",
            "0",
            "3",
            "--device",
            "cpu",
        ]
    )
    with open(os.path.join(out, "detections.json")) as f:
        report = json.load(f)
    assert [entry["file"] for entry in report["images"]] == images
    for entry, path in zip(report["images"], images):
        with Image.open(path) as picture:
            size = picture.size
        assert [entry["width"], entry["height"]] == list(size)
        assert len(entry["detections"]) > 0  # threshold 0 keeps every top-k detection
        for det in entry["detections"]:
            x0, y0, x1, y1 = det["box_xyxy"]
            assert 0 <= x0 <= x1 <= entry["width"] and 0 <= y0 <= y1 <= entry["height"]
            assert det["category"] == NAMES.get(det["category_id"], str(det["category_id"])) and 0 <= det["score"] <= 1
        stem = os.path.splitext(os.path.basename(path))[0]
        with Image.open(os.path.join(out, f"{stem}.png")) as drawn:
            # enlarged to a shorter side of 512, a caption strip under it
            scale = 512 / min(size)
            assert drawn.size[0] == round(scale * size[0]) and drawn.size[1] > round(scale * size[1])
            assert min(drawn.size[0], drawn.size[1]) >= 512 and drawn.mode == "RGB"
        assert os.path.getsize(os.path.join(out, f"{stem}_attention.png")) > 0


def test_predict_missing_image_is_a_clear_error(straight_run, tmp_path, capsys):
    from smca import predict

    with pytest.raises(SystemExit) as exit_info:
        predict.main(
            [
                "--checkpoint",
                os.path.join(straight_run, "checkpoint.pth"),
                "--images",
                str(tmp_path / "nope.png"),
                "--output_dir",
                str(tmp_path / "pred"),
            ]
        )
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "pred").exists()


def _resume(straight_run, tmp_path, extra, name="resumed"):
    """Continue a copy of the straight run (checkpoint after epoch EPOCHS - 1) with TINY + extra;
    its output directory."""
    out = tmp_path / name
    out.mkdir()
    for file in ("checkpoint.pth", "log.txt"):
        shutil.copyfile(os.path.join(straight_run, file), out / file)
    train.main(TINY + ["--output_dir", str(out), "--resume", str(out / "checkpoint.pth")] + extra)
    return str(out)


TINY_SCHEDULE = dict(lr=1e-3, lr_backbone=1e-4, weight_decay=1e-4, lr_drop=1)  # weight_decay: Config's default


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"lr": 5e-4},
        {"lr_drop": 5},
        {"lr": 2e-3, "lr_backbone": 3e-5, "weight_decay": 0.05, "lr_drop": 2},
    ],
    ids=lambda c: "-".join(c) or "unchanged",
)
def test_resume_applies_the_new_schedule(data_root, straight_run, tmp_path, capsys, changes):
    """A resumed run trains with its own lr, lr_backbone, weight_decay and lr_drop: the optimizer
    and scheduler are where a run with these settings from the start would be, the log's lr is
    that one, config.json and the checkpoint record them, and a note names what changed."""
    settings = {**TINY_SCHEDULE, **changes}
    flags = [x for k, v in changes.items() for x in (f"--{k}", str(v))]
    out = _resume(straight_run, tmp_path, ["--coco_path", data_root, "--epochs", "3"] + flags)
    state = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert state["epoch"] == 2
    assert state["lr_scheduler"]["step_size"] == settings["lr_drop"] and state["lr_scheduler"]["last_epoch"] == 3
    for group, base in zip(state["optimizer"]["param_groups"], (settings["lr"], settings["lr_backbone"])):
        assert group["initial_lr"] == base and group["weight_decay"] == settings["weight_decay"]
        assert group["lr"] == pytest.approx(base * 0.1 ** (3 // settings["lr_drop"]), rel=1e-12)
    assert _log(out)[2]["train_lr"] == pytest.approx(settings["lr"] * 0.1 ** (2 // settings["lr_drop"]), rel=1e-12)
    with open(os.path.join(out, "config.json")) as f:
        recorded = json.load(f)
    for k, v in settings.items():
        assert recorded[k] == v and state["config"][k] == v
    err = capsys.readouterr().err
    for k, v in changes.items():
        assert f"{k}: checkpoint {TINY_SCHEDULE[k]!r}, run {v!r}" in err
    assert ("differ from the checkpoint's" in err) == bool(changes)


@pytest.fixture(scope="module")
def frozen_backbone_run(data_root, tmp_path_factory):
    """One epoch with the backbone frozen (lr_backbone 0); its output directory."""
    out = str(tmp_path_factory.mktemp("frozen"))
    train.main(TINY + ["--coco_path", data_root, "--output_dir", out, "--epochs", "1", "--lr_backbone", "0"])
    return out


@pytest.mark.parametrize("direction", ["freeze", "unfreeze"])
def test_resume_can_freeze_or_unfreeze_the_backbone(data_root, straight_run, frozen_backbone_run, tmp_path, capsys, direction):
    """lr_backbone 0 leaves the backbone out of the optimizer: resuming across that change keeps
    the rest's optimizer state, and the backbone trains exactly when the new run says so."""
    source, lr_backbone = (straight_run, "0") if direction == "freeze" else (frozen_backbone_run, "1e-4")
    before = load_checkpoint(os.path.join(source, "checkpoint.pth"))
    out = _resume(source, tmp_path, ["--coco_path", data_root, "--epochs", "3", "--lr_backbone", lr_backbone])
    after = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert f"lr_backbone: checkpoint {float(before['config']['lr_backbone'])!r}" in capsys.readouterr().err
    trained = "layer4.0.conv1.weight"
    name = next(k for k in after["model"] if k.startswith("backbone.") and k.endswith(trained))
    assert torch.equal(before["model"][name], after["model"][name]) == (direction == "freeze")
    backbone_group = after["optimizer"]["param_groups"][1]
    assert (len(backbone_group["params"]) == 0) == (direction == "freeze")
    assert backbone_group["initial_lr"] == float(lr_backbone)
    # the transformer's Adam moments went on from the checkpoint's: its step count is cumulative
    first = after["optimizer"]["param_groups"][0]["params"][0]
    steps_before = before["optimizer"]["state"][first]["step"]
    assert after["optimizer"]["state"][first]["step"] == steps_before + 4 * (3 - before["epoch"] - 1)


def test_resume_with_another_batch_size_logs_the_true_step(data_root, straight_run, tmp_path, capsys):
    """The logged and stored step counts optimizer steps over every batch size the run had."""
    out = _resume(straight_run, tmp_path, ["--coco_path", data_root, "--epochs", "4", "--batch_size", "4"])
    # 8 images: 4 steps an epoch at batch 2 (epochs 0, 1), 2 at batch 4 (epochs 2, 3)
    assert [line["step"] for line in _log(out)] == [4, 8, 10, 12]
    assert load_checkpoint(os.path.join(out, "checkpoint.pth"))["step"] == 12
    assert "batch_size: checkpoint 2, run 4" in capsys.readouterr().err
    checkpoint = os.path.join(out, "checkpoint.pth")
    train.main(TINY + ["--coco_path", data_root, "--output_dir", out, "--resume", checkpoint, "--epochs", "5"])
    assert [line["step"] for line in _log(out)] == [4, 8, 10, 12, 16]
    assert load_checkpoint(checkpoint)["step"] == 16


def test_resume_from_a_checkpoint_without_a_step_count(data_root, straight_run, tmp_path, capsys):
    """A checkpoint from before the step was stored: the count is estimated at its own batch
    size, and the estimate is said."""
    out = tmp_path / "old"
    out.mkdir()
    state = load_checkpoint(os.path.join(straight_run, "checkpoint.pth"))
    del state["step"]
    torch.save(state, out / "checkpoint.pth")
    train.main(
        TINY
        + ["--coco_path", data_root, "--output_dir", str(out), "--resume", str(out / "checkpoint.pth")]
        + ["--epochs", "3", "--batch_size", "4"]
    )
    assert "estimated as 8: 2 epochs of 8 images at batch size 2 on 1 process" in capsys.readouterr().err
    assert [line["step"] for line in _log(str(out))] == [10]


def test_resume_with_another_seed_draws_from_it(data_root, straight_run, tmp_path, capsys):
    """The checkpoint's generators continue only under its own seed; another seed restarts them
    (two seeds, two different epochs), and a note says so."""
    logs, notes = [], []
    for seed in ("2", "3"):
        out = _resume(straight_run, tmp_path, ["--coco_path", data_root, "--epochs", "3", "--seed", seed], f"seed{seed}")
        notes.append(capsys.readouterr().err)
        logs.append(_log(out)[-1])
    assert logs[0]["epoch"] == logs[1]["epoch"] == 2
    assert logs[0]["train_loss"] != logs[1]["train_loss"]
    for seed, err in zip(("2", "3"), notes):
        assert f"seed: checkpoint 1, run {seed}" in err and f"with seed {seed} the random generators restart" in err


def test_resume_of_a_finished_run_says_there_is_nothing_to_train(data_root, straight_run, tmp_path, capsys):
    out = _resume(straight_run, tmp_path, ["--coco_path", data_root, "--epochs", "1"])
    assert f"nothing to train ({EPOCHS} epochs done, --epochs 1)" in capsys.readouterr().out
    assert [line["epoch"] for line in _log(out)] == list(range(EPOCHS))


# --- Checkpoints in: architecture from the checkpoint, weights-only checkpoints, --finetune --------

MODEL_FLAGS = (
    "--model", "--backbone", "--hidden_dim", "--nheads", "--num_queries", "--enc_layers", "--dec_layers", "--dim_feedforward"
)


def _without(argv, names):
    """argv without the given one-value flags (and their values)."""
    out, items = [], iter(argv)
    for item in items:
        if item in names:
            next(items)
        else:
            out.append(item)
    return out


TRAINING = _without(TINY, MODEL_FLAGS)  # TINY's training, data and run flags: the model comes from a checkpoint


def _remapped_data(data_root, root, new_id):
    """A data root sharing data_root's images whose category ids (annotations and categories of
    both splits) are new_id(id); ids mapped to one are merged."""
    os.makedirs(os.path.join(root, "annotations"))
    for split in ("train", "val"):
        os.symlink(os.path.join(data_root, f"{split}2017"), os.path.join(root, f"{split}2017"))
        with open(os.path.join(data_root, "annotations", f"instances_{split}2017.json")) as f:
            coco = json.load(f)
        names = {}
        for category in coco["categories"]:
            names.setdefault(new_id(category["id"]), category["name"])
        coco["categories"] = [{"id": i, "name": name} for i, name in sorted(names.items())]
        for ann in coco["annotations"]:
            ann["category_id"] = new_id(ann["category_id"])
        with open(os.path.join(root, "annotations", f"instances_{split}2017.json"), "w") as f:
            json.dump(coco, f)
    return str(root)


@pytest.fixture
def finetune_loads(monkeypatch):
    """The model's weights right after --finetune loaded them (filled in by the run)."""
    loaded = {}
    original = train.load_finetune_weights

    def spy(model, state, path="checkpoint"):
        report = original(model, state, path)
        loaded.update({k: v.clone() for k, v in model.state_dict().items()})
        return report

    monkeypatch.setattr(train, "load_finetune_weights", spy)
    return loaded


def test_finetune_onto_data_with_another_category_count(data_root, straight_run, finetune_loads, tmp_path, capsys):
    """A checkpoint of 7 classes fine-tuned onto data of 4 (ids 1..3) with no model flags: its
    architecture, all its weights but the re-initialised class head, a fresh optimizer, schedule
    and step count; the run's checkpoint then continues with --resume, again without model flags."""
    root = _remapped_data(data_root, tmp_path / "three", lambda c: (c - 1) % 3 + 1)
    source = os.path.join(straight_run, "checkpoint.pth")
    before = load_checkpoint(source)
    out = str(tmp_path / "finetuned")
    argv = TRAINING + ["--coco_path", root, "--output_dir", out, "--lr_backbone", "0"]
    train.main(argv + ["--epochs", "1", "--finetune", source])
    printed = capsys.readouterr()
    expected = f"loaded {len(before['model']) - 2} tensors; re-initialised class_embed (checkpoint 7 classes, run 4)"
    assert f"smca-train: fine-tuning from {source}: {expected}\n" in printed.out
    assert "frozen at random weights" not in printed.err  # the backbone is the checkpoint's
    assert set(finetune_loads) == set(before["model"])
    for key, tensor in before["model"].items():
        if key.startswith("class_embed."):
            assert finetune_loads[key].shape[0] == 4 and tensor.shape[0] == 7, key
        else:
            assert torch.equal(finetune_loads[key], tensor), key
    state = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert (state["epoch"], state["step"], state["lr_scheduler"]["last_epoch"]) == (0, 4, 1)  # a new run
    first = state["optimizer"]["param_groups"][0]["params"][0]
    assert state["optimizer"]["state"][first]["step"] == 4  # fresh Adam moments (the checkpoint's had 8 steps)
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == 1e-3
    assert state["config"]["num_classes"] == 4 and state["config"]["resume"] is None
    for k in ("hidden_dim", "num_queries", "enc_layers", "dec_layers", "dim_feedforward", "backbone"):
        assert state["config"][k] == before["config"][k], k
    log = _log(out)
    assert [(line["epoch"], line["step"]) for line in log] == [(0, 4)] and len(log[0]["test_coco_eval_bbox"]) == 12

    checkpoint = os.path.join(out, "checkpoint.pth")
    train.main(argv + ["--epochs", "2", "--resume", checkpoint])
    assert [(line["epoch"], line["step"]) for line in _log(out)] == [(0, 4), (1, 8)]
    resumed = load_checkpoint(checkpoint)
    assert resumed["config"]["num_classes"] == 4 and resumed["model"]["class_embed.weight"].shape[0] == 4


def test_finetune_with_another_number_of_queries(data_root, straight_run, finetune_loads, tmp_path, capsys):
    source = os.path.join(straight_run, "checkpoint.pth")
    before = load_checkpoint(source)
    out = str(tmp_path / "queries")
    train.main(TRAINING + ["--coco_path", data_root, "--output_dir", out, "--epochs", "1"]
               + ["--num_queries", "5", "--finetune", source])
    expected = f"loaded {len(before['model']) - 1} tensors; re-initialised query_embed (10 -> 5 queries)\n"
    assert f"fine-tuning from {source}: {expected}" in capsys.readouterr().out
    assert finetune_loads["query_embed.weight"].shape == (5, 32)
    for key, tensor in before["model"].items():
        if key != "query_embed.weight":
            assert torch.equal(finetune_loads[key], tensor), key  # the class head too: 7 classes both
    state = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert state["config"]["num_queries"] == 5 and state["model"]["query_embed.weight"].shape == (5, 32)


def test_finetune_of_another_architecture_names_the_keys(data_root, straight_run, tmp_path, capsys):
    source = os.path.join(straight_run, "checkpoint.pth")
    out = tmp_path / "wider"
    with pytest.raises(SystemExit) as exit_info:
        train.main(TRAINING + ["--coco_path", data_root, "--output_dir", str(out), "--epochs", "1"]
                   + ["--hidden_dim", "64", "--finetune", source])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--finetune {source}: its weights do not fit this run's model" in err
    assert "input_proj.0.weight (checkpoint (32, 512, 1, 1), run (64, 512, 1, 1))" in err
    assert "Settings given that differ from the checkpoint's: hidden_dim: checkpoint 32, run 64" in err
    assert not out.exists()


def test_load_finetune_weights_refuses_missing_and_unknown_keys(straight_run):
    """Unit level: the keys of another model are named (present in the checkpoint only, or in the
    model only); a class head of another classifier is re-initialised and said to be."""
    from smca import Config

    state = load_checkpoint(os.path.join(straight_run, "checkpoint.pth"))
    saved = Config.from_dict(state["config"])
    detr, _, _ = smca.models.build_model(dataclasses.replace(saved, model="detr"))
    extra = sorted(set(state["model"]) - set(detr.state_dict()))
    with pytest.raises(train.CheckpointError, match=r"not in this model: " + re.escape(extra[0])):
        train.load_finetune_weights(detr, state, "ckpt.pth")
    smca_model, _, _ = smca.models.build_model(saved)
    partial = dict(state, model={k: v for k, v in state["model"].items() if k != "decoder.norm.weight"})
    with pytest.raises(train.CheckpointError, match="missing from the checkpoint: decoder.norm.weight$"):
        train.load_finetune_weights(smca_model, partial)
    softmax, _, _ = smca.models.build_model(dataclasses.replace(saved, classifier="softmax"))
    report = train.load_finetune_weights(softmax, state)
    assert report.notes == ["class_embed (checkpoint 7 classes, run 7; classifier focal -> softmax)"]
    assert report.reinitialised == ["class_embed.weight", "class_embed.bias"]
    assert len(report.loaded) == len(state["model"]) - 2


@pytest.mark.parametrize("other, message", [
    (["--resume", "other.pth"], "argument --resume: not allowed with argument --finetune"),
    (["--eval"], "--finetune starts a training run; to evaluate a checkpoint give --eval --resume"),
])
def test_finetune_with_resume_or_eval_is_a_parser_error(data_root, tmp_path, capsys, other, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--coco_path", data_root, "--output_dir", str(out), "--finetune", "x.pth"] + other)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: smca-train") and message in err
    assert not out.exists()


# A converted checkpoint's architecture, none of it the defaults' or TINY's.
CONVERTED = dict(
    model="smca", backbone="resnet18", hidden_dim=32, nheads=4, num_queries=7, enc_layers=1, dec_layers=2,
    dim_feedforward=64, num_classes=9, dynamic_scale="type1", classifier="softmax", modulation="head_shared",
)
EVAL = ["--device", "cpu", "--num_workers", "0", "--eval_size", "64", "--max_size", "96", "--no_progress"]


@pytest.fixture(scope="module")
def weights_only(tmp_path_factory):
    """A weights-only checkpoint (as smca.convert writes) of the CONVERTED architecture."""
    from smca import Config
    from smca.checkpoint import save_weights

    # a recipe of its own for the losses, as a converted DETR checkpoint has DETR's
    cfg = Config(device="cpu", cls_loss_coef=1.0, set_cost_class=1.0, eos_coef=0.3, **CONVERTED)
    torch.manual_seed(3)
    model, _, _ = smca.models.build_model(cfg)
    path = str(tmp_path_factory.mktemp("converted") / "converted.pth")
    save_weights(path, model, cfg, NAMES, converted_from="a test")
    return path


def _eval_stats(out):
    with open(os.path.join(out, "eval.json")) as f:
        return json.load(f)["test_coco_eval_bbox"]


def test_eval_of_a_weights_only_checkpoint_needs_no_model_flags(data_root, weights_only, tmp_path, capsys):
    """--eval --resume of a converted checkpoint with no model flag evaluates its model: the same
    COCO numbers as with every model flag repeated."""
    implicit, explicit = str(tmp_path / "implicit"), str(tmp_path / "explicit")
    train.main(["--eval", "--resume", weights_only, "--coco_path", data_root, "--output_dir", implicit] + EVAL)
    flags = [x for k, v in CONVERTED.items() for x in (f"--{k}", str(v))]
    train.main(["--eval", "--resume", weights_only, "--coco_path", data_root, "--output_dir", explicit] + EVAL + flags)
    printed = capsys.readouterr().out
    assert printed.count(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == 2
    assert len(_eval_stats(implicit)) == 12 and _eval_stats(implicit) == _eval_stats(explicit)


@pytest.mark.parametrize("case", ["train", "flag_differs", "too_few_classes"])
def test_weights_only_checkpoint_errors_touch_no_output(data_root, weights_only, tmp_path, capsys, case):
    """--resume of a weights-only checkpoint for training points to --finetune; with --eval a
    model flag given must still agree, and the checkpoint's num_classes must cover the data's
    ids. Nothing is written."""
    out = tmp_path / "out"
    argv = ["--resume", weights_only, "--output_dir", str(out), "--coco_path"]
    if case == "train":
        argv += [data_root] + TRAINING + ["--epochs", "1"]
        message = "holds weights only (converted from a test), no optimizer, schedule or epoch to continue"
        message += f" training from: start a new training run from its weights with --finetune {weights_only}"
    elif case == "flag_differs":
        argv += [data_root, "--eval", "--classifier", "focal"] + EVAL
        message = "another model or configuration: classifier: checkpoint 'softmax', run 'focal'"
    else:  # category ids 6..11: the checkpoint's 9 classes are too few
        argv += [_remapped_data(data_root, tmp_path / "shifted", lambda c: c + 5), "--eval"] + EVAL
        message = "the checkpoint's num_classes 9 is too small: the data has category id 11"
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("bad", [["--lr_drop", "0"], ["--batch_size", "0"], ["--max_size", "0"], ["--min_sizes", "64", "0"]])
def test_sizes_and_schedule_below_one_are_refused(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + bad)
    assert exit_info.value.code == 2
    assert f"{bad[0][2:]}: expected" in capsys.readouterr().err


def test_max_size_alone_caps_the_images(data_root, tmp_path, capsys):
    """--max_size below eval_size and min_sizes is DETR's cap, not an error: every image gets a
    longer side of max_size, and a note says what was used."""
    out = str(tmp_path / "small")
    train.main(TINY + ["--coco_path", data_root, "--output_dir", out, "--epochs", "1", "--max_size", "48"])
    err = capsys.readouterr().err
    assert "shorter sides 64, 80 exceed max_size 48" in err and "a 640 x 480 image becomes 48 x 36" in err
    cfg = train.build_config(train.get_args_parser().parse_args(TINY + ["--coco_path", data_root, "--max_size", "48"]))
    from smca.data import build_dataset

    for split in ("train", "val"):
        dataset = build_dataset(split, cfg)
        assert all(max(dataset[i][0].shape[-2:]) == 48 for i in range(len(dataset)))
    assert _log(out)[0]["epoch"] == 0


def test_predict_resizes_as_evaluation_does_under_the_cap():
    """Inference's resize (smca.predict: predict, attention maps) gives the evaluation
    transform's sizes, also where max_size is below eval_size."""
    from smca import Config
    from smca.data.transforms import make_transforms
    from smca.models import build_model
    from smca.predict import prepare_images
    from torchvision import tv_tensors

    cfg = Config(
        device="cpu", backbone="resnet18", hidden_dim=32, nheads=4, num_queries=5, enc_layers=1, dec_layers=1,
        dim_feedforward=32, num_classes=3, eval_size=800, max_size=100,
    )
    model, _, _ = build_model(cfg)
    transforms = make_transforms("val", cfg.min_sizes, cfg.eval_size, cfg.max_size)
    for height, width in [(64, 96), (97, 61), (50, 50), (30, 301)]:
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
        boxes = tv_tensors.BoundingBoxes(torch.tensor([[0.0, 0.0, 5.0, 5.0]]), format="XYXY", canvas_size=(height, width))
        expected = transforms(image, {"boxes": boxes, "labels": torch.tensor([1])})[0].shape[-2:]
        batch, pixel_mask, _ = prepare_images(model, [image])
        assert tuple(batch.shape[-2:]) == tuple(expected) and max(expected) == 100


def _truncated_copy(data_root, tmp_path, split):
    """A copy of data_root whose first `split` image is cut off halfway: (root, that file, its id)."""
    root = tmp_path / "truncated"
    shutil.copytree(data_root, root)
    with open(root / "annotations" / f"instances_{split}2017.json") as f:
        first = json.load(f)["images"][0]
    path = root / f"{split}2017" / first["file_name"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return str(root), str(path), first["id"]


@pytest.mark.parametrize("split, num_workers", [("train", "0"), ("train", "1"), ("val", "0")])
def test_truncated_image_stops_the_run_naming_it_and_keeps_the_checkpoint(
    data_root, straight_run, tmp_path, capsys, split, num_workers
):
    """Only decoding shows a truncated file. Training (resumed after a checkpoint) or evaluation
    stops with the file and image id, exit status 2 (from a loader's worker process too, without
    its traceback); the checkpoint stays as it was."""
    root, path, image_id = _truncated_copy(data_root, tmp_path, split)
    out = tmp_path / "out"
    out.mkdir()
    checkpoint = str(out / "checkpoint.pth")
    shutil.copyfile(os.path.join(straight_run, "checkpoint.pth"), checkpoint)
    before = _digest(str(out))["checkpoint.pth"]
    argv = TINY + ["--coco_path", root, "--output_dir", str(out), "--resume", checkpoint, "--epochs", str(EPOCHS + 1)]
    argv += ["--num_workers", num_workers]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv + (["--eval"] if split == "val" else []))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"image id {image_id}: image '{path}' cannot be decoded (OSError: image file is truncated" in err
    assert "Traceback" not in err
    if split == "train":
        assert f"The last checkpoint, {checkpoint}, is left as it was" in err
    assert _digest(str(out))["checkpoint.pth"] == before


def test_cli_on_string_image_ids_stops_before_writing_anything(data_root, tmp_path):
    """`python -m smca.train` on annotations whose image ids are strings: a clear error (no
    traceback) before the output folder is made."""
    root = _write_data(tmp_path, data_root, _broken_annotations(data_root, "string_image_ids"))
    out = tmp_path / "fresh"
    cmd = [sys.executable, "-m", "smca.train"] + TINY + ["--coco_path", root, "--output_dir", str(out), "--epochs", "1"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "image '000000000001.png' has id 'img_1'; COCO image ids are integers" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_predict_reads_a_16_bit_png_as_it_looks(straight_run, tmp_path):
    """A 16-bit grey PNG of value 32896 (PIL mode I;16) is mid-grey 128, not white: with no
    detection kept, the drawn picture is the image as read (enlarged)."""
    import numpy as np

    from smca import predict

    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((48, 64), 32896, dtype=np.uint16)).save(path)
    out = tmp_path / "pred"
    predict.main(
        ["--checkpoint", os.path.join(straight_run, "checkpoint.pth"), "--images", str(path)]
        + ["--output_dir", str(out), "--threshold", "1.0", "--device", "cpu"]
    )
    with Image.open(out / "grey16.png") as drawn:
        # enlarged to a shorter side of 512, the threshold's caption strip under it
        assert drawn.size[0] == round(64 * 512 / 48) and drawn.size[1] > 512
        assert (np.asarray(drawn)[:512] == 128).all()


@pytest.mark.parametrize(
    "kind, message",
    [("truncated", "cannot be decoded (OSError: image file is truncated"), ("float", "has 32-bit floating-point")],
)
def test_predict_bad_image_stops_before_any_output(straight_run, data_root, tmp_path, capsys, kind, message):
    """A bad image after a good one: the error names it and nothing is written."""
    from smca import predict

    val = os.path.join(data_root, "val2017")
    good = os.path.join(val, sorted(os.listdir(val))[0])
    if kind == "truncated":
        bad = tmp_path / "bad.png"
        with open(good, "rb") as f:
            data = f.read()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad = tmp_path / "bad.tif"
        Image.new("F", (32, 32), 0.5).save(bad)
    with pytest.raises(SystemExit) as exit_info:
        predict.main(
            ["--checkpoint", os.path.join(straight_run, "checkpoint.pth"), "--images", good, str(bad)]
            + ["--output_dir", str(tmp_path / "pred"), "--device", "cpu"]
        )
    assert exit_info.value.code == 2
    assert f"image '{bad}' {message}" in capsys.readouterr().err
    assert not (tmp_path / "pred").exists()


def test_resized_size_caps_the_longer_side():
    """DETR's rule: the shorter side asked for unless that takes the longer past max_size, then the
    longer side is max_size exactly; the aspect ratio kept to a pixel, either orientation."""
    from smca.data.transforms import resized_size

    for height, width in [(480, 640), (640, 480), (100, 100), (37, 301), (301, 37), (1, 1000)]:
        for size in (1, 36, 64, 200, 800):
            for max_size in (1, 48, 64, 100, 256, 1333):
                new_h, new_w = resized_size(height, width, size, max_size)
                short, long = sorted((new_h, new_w))
                assert new_h == new_w or (new_h < new_w) == (height < width)
                assert 1 <= short <= long <= max_size
                if size * max(height, width) <= max_size * min(height, width):
                    assert short == size
                else:
                    assert long == max_size
                assert abs(long * min(height, width) / max(height, width) - short) < 1


@pytest.mark.parametrize("image_set", ["train", "val"])
def test_transforms_cap_every_size(image_set):
    """Every shorter side asked for above max_size: each image comes out with a longer side of
    exactly max_size (both training paths, evaluation), boxes kept."""
    from torchvision import tv_tensors

    from smca.data.transforms import make_transforms

    transforms = make_transforms(image_set, min_sizes=(480, 800), eval_size=800, max_size=96)
    torch.manual_seed(0)
    for height, width in [(125, 110), (60, 200), (300, 300)]:
        image = torch.zeros(3, height, width, dtype=torch.uint8)
        whole = torch.tensor([[0.0, 0.0, float(width), float(height)]])
        boxes = tv_tensors.BoundingBoxes(whole, format="XYXY", canvas_size=(height, width))
        for _ in range(10):
            out, target = transforms(image, {"boxes": boxes, "labels": torch.tensor([1])})
            assert max(out.shape[-2:]) == 96 and target["labels"].tolist() == [1]


def test_finetune_keeps_the_checkpoints_loss_recipe(data_root, weights_only, tmp_path, capsys):
    """Fine-tuning a converted checkpoint trains with its loss and matching weights (DETR's for
    a DETR checkpoint), except those a flag sets."""
    out = tmp_path / "out"
    train.main(["--finetune", weights_only, "--output_dir", str(out), "--coco_path", data_root, "--epochs", "1",
                "--set_cost_class", "2"] + TRAINING)
    saved = torch.load(out / "checkpoint.pth", weights_only=True)["config"]
    assert (saved["cls_loss_coef"], saved["eos_coef"], saved["set_cost_class"]) == (1.0, 0.3, 2.0)
    assert saved["classifier"] == "softmax" and saved["dynamic_scale"] == CONVERTED["dynamic_scale"]
    # continued with the same flags, the run keeps the recipe it had: nothing differs
    capsys.readouterr()
    train.main(["--resume", str(out / "checkpoint.pth"), "--output_dir", str(out), "--coco_path", data_root,
                "--epochs", "2", "--set_cost_class", "2"] + TRAINING)
    assert "differ" not in capsys.readouterr().err
    resumed = torch.load(out / "checkpoint.pth", weights_only=True)["config"]
    assert {k: resumed[k] for k in ("cls_loss_coef", "eos_coef", "set_cost_class", "topk")} == {
        k: saved[k] for k in ("cls_loss_coef", "eos_coef", "set_cost_class", "topk")
    }


def test_a_checkpoint_is_enough_on_its_own(data_root, tmp_path, monkeypatch, capsys):
    """A run trained from a pretrained backbone file (a relative path): with that file and the run
    folder gone and another working directory, its checkpoint still predicts, evaluates,
    fine-tunes and resumes training (the model is built without reading backbone_weights)."""
    import torchvision

    from smca import predict

    work = tmp_path / "work"
    work.mkdir()
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), work / "backbone.pth")
    monkeypatch.chdir(work)
    flags = TINY + ["--coco_path", data_root, "--backbone_weights", "backbone.pth"]
    train.main(flags + ["--output_dir", "run", "--epochs", "1"])
    assert load_checkpoint("run/checkpoint.pth")["config"]["backbone_weights"] == "backbone.pth"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move("run/checkpoint.pth", elsewhere / "checkpoint.pth")
    shutil.rmtree("run")
    os.unlink("backbone.pth")
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    checkpoint = os.path.relpath(elsewhere / "checkpoint.pth")
    capsys.readouterr()

    image = os.path.join(data_root, "val2017", sorted(os.listdir(os.path.join(data_root, "val2017")))[0])
    predict.main(["--checkpoint", checkpoint, "--images", image, "--output_dir", "pred", "--device", "cpu"])
    assert os.path.isfile("pred/detections.json")

    train.main(["--coco_path", data_root, "--resume", checkpoint, "--eval", "--output_dir", "eval", "--device", "cpu",
                "--num_workers", "0", "--eval_size", "64", "--max_size", "96", "--no_progress"])  # fmt: skip
    assert os.path.isfile("eval/eval.json")

    # the same flags as the first run, --backbone_weights naming the file that is gone
    os.mkdir("resumed")
    shutil.copyfile(checkpoint, "resumed/checkpoint.pth")
    train.main(flags + ["--output_dir", "resumed", "--resume", "resumed/checkpoint.pth", "--epochs", "2"])
    assert [line["epoch"] for line in _log("resumed")] == [1]

    train.main(TINY + ["--coco_path", data_root, "--finetune", checkpoint, "--output_dir", "tuned", "--epochs", "1"])
    assert load_checkpoint("tuned/checkpoint.pth")["epoch"] == 0
    assert "no such file" not in capsys.readouterr().err


def test_tensorboard_logs_every_loss_term_lr_and_ap_per_epoch(data_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from smca.engine import COCO_STAT_NAMES

    out = str(tmp_path / "run")
    train.main(TINY + ["--coco_path", data_root, "--output_dir", out, "--epochs", "2", "--tensorboard"])
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    log = _log(out)
    loss_terms = {k for k in log[0] if k.startswith(("train_loss", "test_loss"))}
    assert {"train_loss_ce", "train_loss_bbox", "train_loss_giou", "test_loss_ce"} <= loss_terms
    expected = loss_terms | {"train_class_error", "lr", "lr_backbone", "step"} | {f"test_{n}" for n in COCO_STAT_NAMES}
    assert expected <= tags, sorted(expected - tags)
    for tag in expected:
        assert [event.step for event in events.Scalars(tag)] == [0, 1], tag
    for tag in loss_terms:
        assert [e.value for e in events.Scalars(tag)] == pytest.approx([line[tag] for line in log], rel=1e-6), tag
    assert [e.value for e in events.Scalars("test_AP")] == pytest.approx([l["test_coco_eval_bbox"][0] for l in log])
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([1e-3, 1e-4])  # --lr_drop 1
    assert [e.value for e in events.Scalars("lr_backbone")] == pytest.approx([1e-4, 1e-5])


def test_tensorboard_of_a_resumed_run_keeps_one_point_per_epoch(tmp_path):
    """A run resumed from epoch 1 writes epochs 1.. again: their earlier points are dropped."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = train._TensorBoard(str(tmp_path), 0)
    for epoch in range(3):
        first.log({"train_loss": float(epoch), "epoch": epoch, "train_lr": 1e-3}, epoch, [1e-3, 1e-4])
    first.close()
    resumed = train._TensorBoard(str(tmp_path), 1)
    for epoch in (1, 2):
        resumed.log({"train_loss": 10.0 + epoch, "epoch": epoch, "train_lr": 1e-3}, epoch, [1e-3, 1e-4])
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train_loss", "lr", "lr_backbone"}  # train_lr is "lr"
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [(0, 0.0), (1, 11.0), (2, 12.0)]


def test_matmul_precision_reaches_the_kernels_on_a_gpu_only():
    """--matmul_precision sets PyTorch's float32 matmul precision for a CUDA run (TF32 by default),
    which the Triton kernels read (the CUDA kernel reads the same setting in C++); a CPU run and a
    bad value leave it untouched."""
    from smca.train import set_matmul_precision
    from smca_kernels.triton._common import dot_precision

    assert Config().matmul_precision == "high"
    with pytest.raises(ValueError, match=r"matmul_precision: expected one of \('highest', 'high', 'medium'\), got 'tf32'"):
        Config(matmul_precision="tf32")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        set_matmul_precision("high", torch.device("cpu"))
        assert dot_precision(torch.float32) == "ieee"
        set_matmul_precision("high", torch.device("cuda"))
        assert dot_precision(torch.float32) == "tf32"
        set_matmul_precision("highest", torch.device("cuda", 0))
        assert dot_precision(torch.float32) == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)


# A run's output folder: one run at a time, writes that fail cleanly, inputs checked first.


def test_an_output_dir_is_locked_for_the_life_of_its_run(tmp_path):
    """The lock is the process's own: a second taker is refused (naming the holder) until the
    first releases it; nothing but the lock file is written."""
    from smca.run_files import LOCK_NAME, OutputError, lock_output_dir

    out = str(tmp_path / "out")
    first = lock_output_dir(out)
    try:
        with pytest.raises(OutputError, match=rf"--output_dir {out} is in use by another run \(process {os.getpid()} "):
            lock_output_dir(out)
    finally:
        first.release()
    lock_output_dir(out).release()
    assert os.listdir(out) == [LOCK_NAME]


def test_a_second_run_into_a_busy_output_dir_is_refused_and_a_killed_one_blocks_nothing(data_root, tmp_path, capsys):
    """A run started into a folder where another run is training stops before writing anything;
    once that run is killed (its data loader worker included), the folder is free at once."""
    out = str(tmp_path / "busy")
    argv = TINY + ["--coco_path", data_root, "--output_dir", out, "--epochs", "50", "--num_workers", "1"]
    first = subprocess.Popen(
        [sys.executable, "-m", "smca.train"] + argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        config = os.path.join(out, "config.json")
        while not os.path.exists(config) and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1].decode()
        with open(config) as f:
            first_config = f.read()
        with pytest.raises(SystemExit) as exit_info:
            train.main(argv[:-4] + ["--epochs", "3", "--lr", "5e-4"])  # another run's settings
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"smca-train: error: --output_dir {out} is in use by another run (process {first.pid} " in err
        assert "wait until it ends (continue it then with --resume), or give another --output_dir" in err
        with open(config) as f:
            assert f.read() == first_config
        # Once it has saved a checkpoint, the folder is still that live run's, not an earlier run's.
        while not os.path.exists(os.path.join(out, "checkpoint.pth")) and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1].decode()
        with pytest.raises(SystemExit):
            train.main(argv[:-4] + ["--epochs", "3"])
        err = capsys.readouterr().err
        assert f"--output_dir {out} is in use by another run (process {first.pid} " in err and "earlier" not in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    # The killed run's lock went with it (its worker's copy too): its --resume goes ahead at once.
    checkpoint = os.path.join(out, "checkpoint.pth")
    epoch = load_checkpoint(checkpoint)["epoch"]
    train.main(TINY + ["--coco_path", data_root, "--output_dir", out, "--resume", checkpoint, "--epochs", str(epoch + 2)])
    assert _log(out)[-1]["epoch"] == epoch + 1


class _DiskFull:
    """smca.run_files' open(): the files named `name` (a temporary file of it too) get `free`
    bytes of disk from their `nth` opening (1: the first) on, then writes fail with ENOSPC, as
    on a disk that fills."""

    def __init__(self, name, nth=1, free=1000):
        self.name, self.nth, self.free, self.opened = name, nth, free, 0

    def __call__(self, path, *args, **kwargs):
        f = open(path, *args, **kwargs)
        if os.path.basename(path).split(".tmp")[0] != self.name:
            return f
        self.opened += 1
        return self._Filling(f, self.free) if self.opened >= self.nth else f

    class _Filling:
        def __init__(self, f, free):
            self.f, self.free = f, free

        def write(self, data):
            data = memoryview(data).cast("B")
            if len(data) > self.free:
                self.f.write(data[: self.free])  # what fitted stays written
                self.free = 0
                self.f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.free -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()


def test_a_checkpoint_that_fills_the_disk_keeps_the_old_one(tmp_path, monkeypatch):
    """torch.save's zip writer hides a failed write behind errors of its own ("unexpected
    pos"): the error still names the file and the reason, the old file stays, no temporary one."""
    from smca import run_files
    from smca.checkpoint import save_atomically
    from smca.run_files import OutputError

    path = str(tmp_path / "checkpoint.pth")
    save_atomically({"epoch": 0}, path)
    before = _digest(str(tmp_path))
    monkeypatch.setattr(run_files, "open", _DiskFull("checkpoint.pth", free=100_000), raising=False)
    with pytest.raises(OutputError) as info:
        save_atomically({"epoch": 1, "weights": torch.zeros(100_000)}, path)
    assert str(info.value) == f"cannot write {path}: No space left on device"
    assert info.value.errno == errno.ENOSPC
    assert _digest(str(tmp_path)) == before


@pytest.mark.parametrize(
    "name, nth, kept",
    [
        ("checkpoint.pth", 2, "The last checkpoint, {checkpoint}, is left as it was (epoch 0): free some space, then "
         "continue with --resume {checkpoint}"),
        ("log.txt", 2, "The last checkpoint, {checkpoint}, is left as it was (epoch 0): free some space, then "
         "continue with --resume {checkpoint}"),
        ("config.json", 1, "No checkpoint was written: free some space, then start the run again"),
    ],
)
def test_a_full_disk_stops_the_run_with_one_error_and_keeps_the_last_checkpoint(
    data_root, tmp_path, monkeypatch, capsys, name, nth, kept
):
    from smca import run_files

    out = str(tmp_path / "out")
    checkpoint = os.path.join(out, "checkpoint.pth")
    monkeypatch.setattr(run_files, "open", _DiskFull(name, nth=nth, free=10), raising=False)
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--coco_path", data_root, "--output_dir", out, "--epochs", str(EPOCHS)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("smca-train: error:") == 1 and "Traceback" not in err
    assert (
        f"smca-train: error: cannot write {os.path.join(out, name)}: No space left on device. "
        + kept.format(checkpoint=checkpoint)
        + "\n"
    ) in err
    assert not [n for n in os.listdir(out) if ".tmp" in n]
    if nth == 2:
        assert load_checkpoint(checkpoint)["epoch"] == 0
        assert [line["epoch"] for line in _log(out)] in ([0], [0, 1])  # no half line
        monkeypatch.undo()  # space is freed: the run continues
        train.main(TINY + ["--coco_path", data_root, "--output_dir", out, "--epochs", str(EPOCHS), "--resume", checkpoint])
        assert [line["epoch"] for line in _log(out)] == [0, 1]


def test_a_line_that_does_not_fit_is_not_appended(tmp_path, monkeypatch):
    from smca import run_files
    from smca.run_files import OutputError, append_line

    path = str(tmp_path / "log.txt")
    append_line(path, '{"epoch": 0}')
    monkeypatch.setattr(run_files, "open", _DiskFull("log.txt", free=5), raising=False)
    with pytest.raises(OutputError, match="No space left on device"):
        append_line(path, '{"epoch": 1}')
    with open(path) as f:
        assert f.read() == '{"epoch": 0}\n'


@pytest.mark.parametrize("batch_size, world_size, message", [
    (9, 1, "--batch_size 9: {ann} lists 8 training images, fewer than one batch (an epoch drops its last "
     "incomplete batch): give --batch_size 8 or less, or more images"),
    (5, 2, "--batch_size 5 on each of 2 processes: {ann} lists 8 training images, 4 per process, fewer than one "
     "batch (an epoch drops its last incomplete batch): give --batch_size 4 or less, fewer processes, or more images"),
])
def test_a_batch_larger_than_the_training_set_is_refused_before_writing(data_root, tmp_path, capsys, batch_size,
                                                                         world_size, message):
    ann = os.path.join(data_root, "annotations", "instances_train2017.json")
    if world_size == 1:
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_info:
            train.main(TINY + ["--coco_path", data_root, "--output_dir", str(out), "--batch_size", str(batch_size)])
        assert exit_info.value.code == 2
        assert f"smca-train: error: {message.format(ann=ann)}\n" in capsys.readouterr().err
        assert not out.exists()
    else:  # torchrun's processes each take a share of the images (DistributedSampler)
        from smca.data import DatasetError, build_dataset

        cfg = Config(coco_path=data_root, batch_size=batch_size, device="cpu")
        with pytest.raises(DatasetError) as info:
            train._check_batches(cfg, build_dataset("train", cfg), world_size)
        assert str(info.value) == message.format(ann=ann)
        train._check_batches(dataclasses.replace(cfg, batch_size=4), build_dataset("train", cfg), world_size)


@pytest.mark.parametrize("bad, message", [
    (["--num_workers", "-1"], "num_workers: expected >= 0, got -1"),
    (["--lr", "-1"], "lr: expected a finite learning rate >= 0, got -1.0"),
    (["--lr", "nan"], "lr: expected a finite learning rate >= 0, got nan"),
    (["--lr_backbone", "inf"], "lr_backbone: expected a finite learning rate (<= 0 freezes the backbone), got inf"),
    (["--weight_decay", "-1"], "weight_decay: expected a finite value >= 0, got -1.0"),
    (["--clip_max_norm", "-1"], "clip_max_norm: expected a finite value >= 0 (0: off), got -1.0"),
    (["--dropout", "1"], "dropout: expected a probability in [0, 1), got 1.0"),
    (["--epochs", "-1"], "epochs: expected >= 0, got -1"),
    (["--seed", "-1"], "seed: expected an integer in [0, 2**32), as numpy's, got -1"),
    (["--eval", "--no_eval"], "eval and no_eval: give one"),
    (["--device", "gpu"], "--device gpu: expected cpu, cuda or cuda:N"),
    (["--attention_backend", "cuda"], "--attention_backend cuda: not available for cpu tensors here; available: auto, "),
])
def test_settings_torch_would_refuse_mid_run_are_refused_first(data_root, tmp_path, capsys, bad, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--coco_path", data_root, "--output_dir", str(out)] + bad)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"smca-train: error: {message}" in err and "Traceback" not in err
    assert not out.exists()


def _without_val(data_root, tmp_path, how):
    """A copy of data_root (its images linked) whose val set is missing in some way."""
    root = tmp_path / "data"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        os.symlink(os.path.join(data_root, f"{split}2017"), root / f"{split}2017")
    shutil.copyfile(os.path.join(data_root, "annotations", "instances_train2017.json"),
                    root / "annotations" / "instances_train2017.json")
    val = root / "annotations" / "instances_val2017.json"
    if how == "empty_file":
        val.write_text("")
    elif how == "no_images":
        val.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "ellipse"}]}))
    return str(root), str(val)


@pytest.mark.parametrize("how", ["no_eval", "missing", "empty_file", "no_images"])
def test_training_without_a_validation_set(data_root, tmp_path, capsys, how):
    """--no_eval, or a data set without a val set (a note says so): training writes its
    checkpoints and log lines without evaluating."""
    root, val = (data_root, None) if how == "no_eval" else _without_val(data_root, tmp_path, how)
    out = str(tmp_path / "out")
    train.main(TINY + ["--coco_path", root, "--output_dir", out, "--epochs", "1"]
               + (["--no_eval"] if how == "no_eval" else []))
    captured = capsys.readouterr()
    assert "Average Precision" not in captured.out
    assert re.search(r"^epoch 0: loss \d+\.\d+, \d+\.\d s$", captured.out, re.M), captured.out
    why = {"missing": f"there is no {val}", "empty_file": f"{val} lists no images", "no_images": f"{val} lists no images"}
    if how in why:
        assert f"smca-train: note: {why[how]}: training without evaluation (--no_eval does so on purpose)\n" in captured.err
    else:
        assert "training without evaluation" not in captured.err
    (line,) = _log(out)
    assert line["epoch"] == 0 and "train_loss" in line and not [k for k in line if k.startswith("test_")]
    assert load_checkpoint(os.path.join(out, "checkpoint.pth"))["epoch"] == 0


def test_eval_without_a_validation_set_is_refused(data_root, tmp_path, capsys, straight_run):
    root, val = _without_val(data_root, tmp_path, "missing")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--coco_path", root, "--output_dir", str(out), "--eval", "--resume",
                           os.path.join(straight_run, "checkpoint.pth")])
    assert exit_info.value.code == 2
    assert (
        f"smca-train: error: --eval: no validation set to evaluate on: there is no {val}; evaluation reads COCO's "
        "val2017/ images and annotations/instances_val2017.json under --coco_path\n"
    ) in capsys.readouterr().err
    assert not out.exists()


def test_an_image_with_more_objects_than_queries_is_named_in_a_warning(data_root, tmp_path, capsys):
    """Each query is matched to one object: the objects beyond --num_queries in an image are never
    learnt. The run goes on (as DETR's: a few crowded images need not set the query count)."""
    ann = os.path.join(data_root, "annotations", "instances_train2017.json")
    with open(ann) as f:
        coco = json.load(f)
    counts = {}
    for a in coco["annotations"]:
        counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
    most = max(counts.values())
    assert most >= 2, "the data needs an image with two objects"
    crowded = sum(n > most - 1 for n in counts.values())
    train.main(TINY + ["--coco_path", data_root, "--num_queries", str(most - 1), "--epochs", "0", "--no_eval"])
    err = capsys.readouterr().err
    assert f"smca-train: warning: --num_queries {most - 1}: {crowded} image" in err
    assert f"of {ann} have more objects than queries" in err and f"{most} objects); their objects beyond {most - 1} " \
        f"are never learnt: give --num_queries {most} or more" in err
    capsys.readouterr()
    train.main(TINY + ["--coco_path", data_root, "--num_queries", str(most), "--epochs", "0", "--no_eval"])
    assert "--num_queries" not in capsys.readouterr().err


def test_a_pickled_reference_checkpoint_is_refused_in_one_plain_line(data_root, tmp_path, capsys):
    """torch.load's weights-only refusal is several lines with terminal escapes and says how to
    load the file unsafely; the error names the flag and the class, and says to convert it."""
    import argparse

    path = str(tmp_path / "detr.pth")
    torch.save({"model": {}, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--coco_path", data_root, "--output_dir", str(tmp_path / "out"), "--finetune", path])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        f"smca-train: error: --finetune {path} is not an smca checkpoint: it holds pickled Python objects "
        "(argparse.Namespace), which smca's never do and which are not unpickled. A checkpoint saved by SMCA-DETR's "
        "or DETR's main.py is converted first: python -m smca.convert --source {smca-detr,detr} --input FILE "
        "--output OUT.pth\n"
    )
    assert not (tmp_path / "out").exists()


def test_torchrun_into_a_busy_output_dir_stops_every_process(data_root, tmp_path):
    """Rank 0 alone locks (it alone writes) and tells the others: all stop, none waits forever."""
    from smca.run_files import lock_output_dir

    out = str(tmp_path / "busy")
    lock = lock_output_dir(out)  # another run, in this process
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += ["-m", "smca.train"] + TINY + ["--coco_path", data_root, "--output_dir", out, "--epochs", "1"]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    assert result.returncode != 0
    assert result.stderr.count(f"smca-train: error: --output_dir {out} is in use by another run") == 2
    assert "Traceback" not in result.stderr.split("smca-train: error:")[0]
    assert os.listdir(out) == [".smca-train.lock"]


@pytest.mark.parametrize("how", ["no_eval", "missing"])
def test_a_results_file_without_an_evaluation_is_refused_first(data_root, tmp_path, capsys, how):
    """--results_file asks for detections that only an evaluation makes: without one (--no_eval,
    no val set) it is an error before anything is written, not a file silently never written."""
    root = data_root if how == "no_eval" else _without_val(data_root, tmp_path, how)[0]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main(TINY + ["--coco_path", root, "--output_dir", str(out), "--results_file", str(tmp_path / "r.json")]
                   + (["--no_eval"] if how == "no_eval" else []))
    assert exit_info.value.code == 2
    assert f"smca-train: error: --results_file {tmp_path / 'r.json'}: no evaluation to take detections from" \
        in capsys.readouterr().err
    assert not out.exists()
