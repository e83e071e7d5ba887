"""Pretrain a ResNet on a COCO-layout data set, as a stand-in for ImageNet weights.

    python -m smca.pretrain_backbone --coco_path DATA --out backbone.pth [--backbone resnet18 --steps 600]

DETR and SMCA fine-tune an ImageNet-trained backbone (frozen BatchNorm, frozen stem and layer1).
Where no such weights can be had (this project downloads nothing), a detector trained from a
random backbone spends its first thousands of steps learning edges, and a study of how fast the
transformer converges measures the backbone instead. This script gives the backbone a short,
cheap start on the detection data itself: every cell of the stride-16 and stride-32 maps
predicts the category of the smallest box that covers the cell's centre (0: background), a
per-cell cross-entropy through a 1x1 convolution on layer3 and on layer4. The boxes are the
only labels used, so any COCO-layout set serves.

Writes a torchvision ResNet state dict without the classifier (atomically), which
`smca.train --backbone_weights` loads with its BatchNorm statistics.
"""

import argparse
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import box_convert

from .checkpoint import save_atomically
from .config import BACKBONES, Config
from .data import DatasetError, build_dataloader, build_dataset
from .data.coco import class_ids
from .distributed import seed_everything
from .models.backbone import CHANNELS, STRIDES

__all__ = ["cell_labels", "pretrain_backbone", "main"]

# The layers that get a per-cell head: the maps SMCA-DETR reads (C4, C5), as (name, index).
HEADS = (("layer3", 2), ("layer4", 3))
IGNORE = -100  # cross-entropy's ignore_index, for cells in the padding


def cell_labels(targets: Sequence[Dict[str, Tensor]], map_size: Sequence[int], stride: int) -> Tensor:
    """Per-cell category of the smallest box covering the cell's centre.

    Args:
        targets: per image dict(boxes (n, 4) cxcywh normalised by size, labels (n,), size (2,) (h, w)).
        map_size: (Hf, Wf) of the feature map over the padded batch; stride: its stride in pixels.
    Returns:
        (B, Hf, Wf) int64: a label, 0 for background (so labels start at 1), IGNORE outside the image.
    """
    height, width = map_size
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) * stride  # cell centres in pixels
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) * stride
    out = []
    for target in targets:
        h, w = target["size"].tolist()
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        boxes = box_convert(target["boxes"].float().cpu(), "cxcywh", "xyxy") * scale  # (n, 4) pixels
        inside_x = (xs[None, :] >= boxes[:, 0:1]) & (xs[None, :] < boxes[:, 2:3])  # (n, Wf)
        inside_y = (ys[None, :] >= boxes[:, 1:2]) & (ys[None, :] < boxes[:, 3:4])  # (n, Hf)
        inside = inside_y[:, :, None] & inside_x[:, None, :]  # (n, Hf, Wf)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        # Smallest covering box: the covering box of least area, background where none covers.
        cost = torch.where(inside, area[:, None, None], torch.tensor(float("inf")))
        labels = torch.zeros(height, width, dtype=torch.int64)
        if len(boxes):
            best_cost, best = cost.min(dim=0)
            labels = torch.where(best_cost.isfinite(), target["labels"].cpu()[best], labels)
        outside = (ys[:, None] >= h) | (xs[None, :] >= w)
        out.append(labels.masked_fill(outside, IGNORE))
    return torch.stack(out)


class _CellClassifier(nn.Module):
    """A torchvision ResNet (trainable BatchNorm) with a 1x1 classifier on each map of HEADS."""

    def __init__(self, name: str, num_classes: int) -> None:
        super().__init__()
        self.resnet = getattr(torchvision.models, name)(weights=None)
        self.resnet.fc = nn.Identity()  # not saved: the detector drops the classifier anyway
        self.heads = nn.ModuleDict({layer: nn.Conv2d(CHANNELS[name][i], num_classes, 1) for layer, i in HEADS})

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        """images (B, 3, H, W) -> {layer: logits (B, num_classes, Hf, Wf)}."""
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(images))))
        out = {}
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(r, layer)(x)
            if layer in self.heads:
                out[layer] = self.heads[layer](x)
        return out


def pretrain_backbone(
    cfg: Config, out: str, steps: int, lr: float = 1e-3, log_every: int = 50, progress: bool = True
) -> Dict[str, float]:
    """Train cfg.backbone on the cell task over cfg.coco_path's train split; save to `out`.

    Uses cfg.backbone, cfg.batch_size, cfg.num_workers, cfg.seed, cfg.device and the data
    fields (training transforms). AdamW at `lr` with a cosine decay to 0 over `steps` steps.
    Returns dict(loss, accuracy) over the last log_every steps (accuracy over labelled cells).
    """
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    dataset = build_dataset("train", cfg)
    ids = class_ids(dataset.categories)  # sparse database ids: one class per category
    num_classes = max(dataset.categories) + 1 if ids is None else len(ids)
    dataset.set_classes(ids, num_classes)
    loader = build_dataloader(dataset, cfg.batch_size, cfg.num_workers, train=True, seed=cfg.seed)
    model = _CellClassifier(cfg.backbone, num_classes + 1).to(device)  # + background, cell label 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    recent: List[Dict[str, float]] = []
    start = time.time()
    step = 0
    while step < steps:
        for images, _, targets in loader:
            targets = [dict(t, labels=t["labels"] + 1) for t in targets]  # class c is cell label c + 1
            logits = model(images.to(device))
            loss = images.new_zeros(())
            correct = labelled = 0
            for layer, i in HEADS:
                labels = cell_labels(targets, logits[layer].shape[-2:], STRIDES[i]).to(device)
                loss = loss + F.cross_entropy(logits[layer], labels, ignore_index=IGNORE)
                valid = labels != IGNORE
                correct += int((logits[layer].argmax(1) == labels)[valid].sum())
                labelled += int(valid.sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            recent = (recent + [dict(loss=loss.item(), accuracy=correct / max(labelled, 1))])[-log_every:]
            if progress and (step % log_every == 0 or step == steps):
                means = _means(recent)
                print(
                    f"step {step}/{steps}: loss {means['loss']:.3f}, cell accuracy {means['accuracy']:.3f}, "
                    f"{time.time() - start:.0f} s"
                )
            if step == steps:
                break
    state = {k: v.detach().cpu() for k, v in model.resnet.state_dict().items() if not k.startswith("fc.")}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_atomically(state, out)
    return _means(recent)


def _means(records: List[Dict[str, float]]) -> Dict[str, float]:
    """Key-wise mean of a list of dicts with the same keys."""
    return {k: sum(r[k] for r in records) / len(records) for k in records[0]}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser("smca.pretrain_backbone", description=__doc__.split("\n\n")[0])
    p.add_argument("--coco_path", required=True, help="COCO-layout root (its train split is used)")
    p.add_argument("--out", required=True, help="where to write the state dict")
    p.add_argument("--backbone", choices=BACKBONES, default="resnet18")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--min_sizes", type=int, nargs="+", default=[96, 112, 128, 144], help="training shorter sides")
    p.add_argument("--max_size", type=int, default=192)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    cfg = Config(
        backbone=args.backbone,
        coco_path=args.coco_path,
        batch_size=args.batch_size,
        min_sizes=tuple(args.min_sizes),
        eval_size=max(args.min_sizes),
        max_size=args.max_size,
        num_workers=args.num_workers,
        seed=args.seed,
        device=args.device,
    )
    try:
        final = pretrain_backbone(cfg, args.out, args.steps, args.lr)
    except DatasetError as err:
        p.exit(2, f"smca.pretrain_backbone: error: {err}\n")
    print(f"wrote {args.out} (last steps: loss {final['loss']:.3f}, cell accuracy {final['accuracy']:.3f})")


if __name__ == "__main__":
    main()
