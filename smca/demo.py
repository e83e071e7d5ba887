"""The demo: make the built-in data set, train a small SMCA-DETR on it, evaluate, draw predictions.

    python -m smca.demo [--work_dir demo_output] [--epochs N] [--device cpu|cuda]

WORK_DIR/data is the synthetic COCO-layout set, WORK_DIR/backbone.pth a ResNet-18 pretrained on
it (smca.pretrain_backbone: this project downloads no ImageNet weights), both made once and
reused; WORK_DIR/train holds log.txt and checkpoint.pth (a second run resumes from it),
WORK_DIR/predictions the detections drawn on validation images and pictures of the top queries'
Gaussian prior and attention. Prints COCO's summary after every epoch and the AP table at the end.
"""

import argparse
import json
import os
import time
from typing import List, Optional

import torch

from . import train
from .config import Config, lr_drop_for, preset_values
from .data.synthetic import make_dataset
from .engine import COCO_STAT_NAMES
from .predict import load_model, predict_files
from .pretrain_backbone import pretrain_backbone

# A few minutes on two CPU cores; a GPU gets through many more epochs in the same time.
DEFAULT_EPOCHS = {"cpu": 10, "cuda": 50}
PREDICTION_IMAGES = 4
# The built-in data of the demo and of the convergence study: images of about 128 pixels (the
# demo preset's scale), shapes of 0.3..0.8 of the shorter side, one hue per category. A
# backbone trained for a few CPU minutes cannot tell the shapes apart by form alone (the class
# error stays at chance); by colour it can, and what is left to learn is where the objects are.
SHAPES = dict(image_size=128, max_objects=6, rel_sizes=(0.15, 0.4), colour_by_category=True)


def shapes_data(work_dir: str, num_train: int, num_val: int, seed: int = 0) -> str:
    """WORK_DIR/data: the built-in data set (SHAPES), made unless an earlier call made it."""
    data = os.path.join(work_dir, "data")
    if os.path.isfile(os.path.join(data, "annotations", "instances_val2017.json")):
        print(f"using the data set in {data}")
    else:
        make_dataset(data, num_train, num_val, seed=seed, **SHAPES)
        print(f"made {num_train} training and {num_val} validation images in {data}")
    return data


def shapes_backbone(work_dir: str, data: str, steps: int, device: str, num_workers: int, seed: int = 0) -> str:
    """WORK_DIR/backbone.pth: a ResNet-18 pretrained on `data` for `steps` steps at the demo
    preset's sizes (smca.pretrain_backbone), unless an earlier call made it."""
    backbone = os.path.join(work_dir, "backbone.pth")
    if os.path.isfile(backbone):
        print(f"using the pretrained backbone {backbone}")
    else:
        print(f"pretraining the backbone on {data} for {steps} steps")
        values = dict(preset_values("demo"), coco_path=data, device=device, num_workers=num_workers, seed=seed)
        pretrain_backbone(Config(**values), backbone, steps)
    return backbone


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser("smca.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default="demo_output")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--epochs", type=int, help=f"default: {DEFAULT_EPOCHS['cpu']} on CPU, {DEFAULT_EPOCHS['cuda']} on CUDA"
    )
    p.add_argument("--num_train", type=int, default=512)
    p.add_argument("--num_val", type=int, default=64)
    p.add_argument("--backbone_steps", type=int, default=300, help="backbone pretraining steps")
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    epochs = args.epochs or DEFAULT_EPOCHS[torch.device(args.device).type]
    train_dir = os.path.join(args.work_dir, "train")
    checkpoint = os.path.join(train_dir, "checkpoint.pth")
    start = time.time()
    data = shapes_data(args.work_dir, args.num_train, args.num_val, args.seed)
    backbone = shapes_backbone(args.work_dir, data, args.backbone_steps, args.device, args.num_workers, args.seed)
    train_argv = [
        "--preset", "demo", "--coco_path", data, "--backbone_weights", backbone, "--output_dir", train_dir,
        "--epochs", str(epochs), "--lr_drop", str(lr_drop_for(epochs)), "--device", args.device,
        "--num_workers", str(args.num_workers), "--seed", str(args.seed),
    ]  # fmt: skip
    if os.path.isfile(checkpoint):
        train_argv += ["--resume", checkpoint]
    train.main(train_argv)
    train_minutes = (time.time() - start) / 60

    model, _, categories = load_model(checkpoint, args.device)
    val_dir = os.path.join(data, "val2017")
    images = [os.path.join(val_dir, name) for name in sorted(os.listdir(val_dir))[:PREDICTION_IMAGES]]
    predictions = os.path.join(args.work_dir, "predictions")
    # The few best boxes per image whatever their score: a short run is not confident yet.
    predict_files(
        model, images, predictions, threshold=0.0, categories=categories, attention_queries=[], max_detections=5
    )

    with open(os.path.join(train_dir, "log.txt")) as f:
        last = [json.loads(line) for line in f][-1]
    stats = last["test_coco_eval_bbox"]
    print(
        f"\nSMCA-DETR demo: {last['epoch'] + 1} epochs on the synthetic shapes, {args.device}, "
        f"{train_minutes:.1f} min of data making, backbone pretraining and training"
    )
    print("  ".join(f"{name:>6}" for name in COCO_STAT_NAMES[:6]))
    print("  ".join(f"{value:6.3f}" for value in stats[:6]))
    print(f"log and checkpoint: {train_dir}; pictures: {predictions}")


if __name__ == "__main__":
    main()
