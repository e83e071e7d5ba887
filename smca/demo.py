"""The demo: make the built-in data set, train a small SMCA-DETR on it, evaluate, draw predictions.

    python -m smca.demo [--work_dir demo_output] [--epochs N] [--device cpu|cuda]

WORK_DIR/data is the synthetic COCO-layout set (made once, reused), WORK_DIR/train holds
log.txt and checkpoint.pth (a second run resumes from it), WORK_DIR/predictions the detections
drawn on validation images and pictures of the top queries' Gaussian prior and attention.
Prints COCO's summary after every epoch and the AP table at the end.
"""

import argparse
import json
import os
import time
from typing import List, Optional

import torch

from . import train
from .data.synthetic import make_dataset
from .engine import COCO_STAT_NAMES
from .predict import load_model, predict_files

# A few minutes on two CPU cores; a GPU gets through many more epochs in the same time.
DEFAULT_EPOCHS = {"cpu": 10, "cuda": 50}
IMAGE_SIZE = 128
PREDICTION_IMAGES = 4


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser("smca.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--work_dir", default="demo_output")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--epochs", type=int, help=f"default: {DEFAULT_EPOCHS['cpu']} on CPU, {DEFAULT_EPOCHS['cuda']} on CUDA"
    )
    p.add_argument("--num_train", type=int, default=512)
    p.add_argument("--num_val", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    epochs = args.epochs or DEFAULT_EPOCHS[torch.device(args.device).type]
    data = os.path.join(args.work_dir, "data")
    train_dir = os.path.join(args.work_dir, "train")
    checkpoint = os.path.join(train_dir, "checkpoint.pth")
    start = time.time()

    if os.path.isfile(os.path.join(data, "annotations", "instances_val2017.json")):
        print(f"using the data set in {data}")
    else:
        make_dataset(data, args.num_train, args.num_val, image_size=IMAGE_SIZE, seed=args.seed, max_objects=6)
        print(f"made {args.num_train} training and {args.num_val} validation images in {data}")

    # The demo preset's model at the scale of the data (shorter sides around 128 pixels).
    train_argv = [
        "--preset", "demo", "--coco_path", data, "--output_dir", train_dir, "--epochs", str(epochs),
        "--device", args.device, "--num_workers", str(args.num_workers), "--seed", str(args.seed),
        "--min_sizes", "96", "112", "128", "144", "--eval_size", "128", "--max_size", "192",
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
        f"{train_minutes:.1f} min of data making and training"
    )
    print("  ".join(f"{name:>6}" for name in COCO_STAT_NAMES[:6]))
    print("  ".join(f"{value:6.3f}" for value in stats[:6]))
    print(f"log and checkpoint: {train_dir}; pictures: {predictions}")


if __name__ == "__main__":
    main()
