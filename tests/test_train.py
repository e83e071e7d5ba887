"""Training CLI: exact resume after a kill, 2-process DDP (gloo), non-finite loss, bad inputs, predict."""

import hashlib
import json
import os
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


def test_eval_only_reproduces_the_logged_ap(straight_run, data_root, tmp_path, capsys):
    out = str(tmp_path / "eval")
    train.main(
        TINY
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
    assert "loss is nan at epoch 1, iteration 1" in err and "last good checkpoint" in err
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


def _negative_box_annotations(data_root):
    with open(os.path.join(data_root, "annotations", "instances_train2017.json")) as f:
        coco = json.load(f)
    coco["annotations"][1]["bbox"][3] = -2
    return json.dumps(coco)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_data", "does not exist"),
        ("invalid_json", "not a valid COCO annotation file"),
        ("negative_box", "negative width or height"),
        ("other_model", "another model or configuration: model: checkpoint 'smca', run 'detr'"),
        ("other_size", "hidden_dim: checkpoint 32, run 64"),
        ("corrupt_checkpoint", "corrupt, truncated"),
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
    elif case == "negative_box":
        argv += [_write_data(tmp_path, data_root, _negative_box_annotations(data_root))]
    else:
        argv += [data_root]
        if case == "other_model":
            argv += ["--model", "detr"]
        elif case == "other_size":
            argv += ["--hidden_dim", "64"]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
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
            assert drawn.size == size and drawn.mode == "RGB"
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
