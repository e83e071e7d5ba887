"""COCO detection through torchvision's CocoDetection, with DETR's targets.

A data root in the COCO layout (the real COCO 2017 or the built-in synthetic set):

    root/train2017/   root/val2017/   root/annotations/instances_{train,val}2017.json

Each sample is (image (3, H, W) float normalised, target) with target
    labels (n,) int64 category ids; boxes (n, 4) float32 cxcywh normalised by the transformed,
    unpadded image size (H, W); image_id () int64; orig_size (2,) int64 (h, w) of the file;
    size (2,) int64 (H, W) after the transforms.
Crowd annotations are left out (as DETR does) and so are boxes of zero width or height.
"""

import contextlib
import io
import math
import os
from typing import Dict, List, Sequence, Tuple

import torch
import torchvision
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as F

from ..models.utils import pad_images
from .transforms import make_transforms

__all__ = ["DatasetError", "CocoDetection", "build_dataset", "collate_fn", "build_dataloader", "coco_paths"]


class DatasetError(ValueError):
    """The data directory or an annotation file is missing or malformed."""


def coco_paths(root: str, image_set: str) -> Tuple[str, str]:
    """(image folder, annotation file) of `image_set` ("train" | "val") under a COCO root.

    Raises DatasetError naming what is missing.
    """
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set: expected 'train' or 'val', got {image_set!r}")
    if not root or not os.path.isdir(root):
        raise DatasetError(
            f"data directory {root!r} does not exist (expected train2017/, val2017/ and annotations/ inside)"
        )
    img_folder = os.path.join(root, f"{image_set}2017")
    ann_file = os.path.join(root, "annotations", f"instances_{image_set}2017.json")
    if not os.path.isdir(img_folder):
        raise DatasetError(f"image folder {img_folder!r} does not exist")
    if not os.path.isfile(ann_file):
        raise DatasetError(f"annotation file {ann_file!r} does not exist")
    return img_folder, ann_file


def _check_annotations(dataset: Dict, ann_file: str) -> None:
    """Every image and box well-formed: a COCO bbox is [x, y, w, h] with finite values, w, h >= 0."""
    if not dataset.get("images"):
        raise DatasetError(f"{ann_file}: no images listed")
    category_ids = {c["id"] for c in dataset.get("categories", [])}
    for ann in dataset.get("annotations", []):
        where = f"{ann_file}: annotation {ann.get('id')} of image {ann.get('image_id')}"
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise DatasetError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
        if not all(math.isfinite(v) for v in bbox):
            raise DatasetError(f"{where}: bbox has a non-finite value: {bbox}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DatasetError(f"{where}: bbox {bbox} has a negative width or height")
        if ann.get("category_id") not in category_ids:
            raise DatasetError(f"{where}: category_id {ann.get('category_id')!r} is not among the listed categories")


class CocoDetection(torchvision.datasets.CocoDetection):
    """torchvision's CocoDetection with the annotation file checked and DETR's targets.

    Args:
        img_folder: folder of the images; ann_file: COCO instances JSON;
        transforms: a v2 transform over (tv_tensors.Image uint8, dict(boxes, labels)).
    Raises DatasetError when the file is not valid JSON, not COCO-shaped, or has a bad box.
    """

    def __init__(self, img_folder: str, ann_file: str, transforms) -> None:
        try:
            # pycocotools prints progress lines while it loads; they are noise here.
            with contextlib.redirect_stdout(io.StringIO()):
                super().__init__(img_folder, ann_file)
        except (ValueError, AssertionError, KeyError, TypeError) as err:
            # ValueError covers json.JSONDecodeError and UnicodeDecodeError; pycocotools asserts
            # that the file holds a JSON object and indexes by keys.
            raise DatasetError(f"{ann_file}: not a valid COCO annotation file ({type(err).__name__}: {err})") from err
        _check_annotations(self.coco.dataset, ann_file)
        self._detr_transforms = transforms

    @property
    def categories(self) -> Dict[int, str]:
        """category id -> name."""
        return {c["id"]: c["name"] for c in self.coco.dataset["categories"]}

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        image, annotations = super().__getitem__(index)  # PIL image, list of COCO dicts
        width, height = image.size
        annotations = [a for a in annotations if a.get("iscrowd", 0) == 0]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes = tv_tensors.BoundingBoxes(box_convert(boxes, "xywh", "xyxy"), format="XYXY", canvas_size=(height, width))
        target = dict(
            boxes=F.clamp_bounding_boxes(boxes, clamping_mode="hard"),
            labels=torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64),
        )
        image, target = self._detr_transforms(F.pil_to_tensor(image), target)
        new_h, new_w = image.shape[-2:]
        scale = torch.tensor([new_w, new_h, new_w, new_h], dtype=torch.float32)
        return image.as_subclass(Tensor), dict(
            labels=target["labels"],
            boxes=box_convert(target["boxes"].as_subclass(Tensor), "xyxy", "cxcywh") / scale,
            image_id=torch.tensor(self.ids[index], dtype=torch.int64),
            orig_size=torch.tensor([height, width], dtype=torch.int64),
            size=torch.tensor([new_h, new_w], dtype=torch.int64),
        )


def build_dataset(image_set: str, cfg) -> CocoDetection:
    """The "train" or "val" split under cfg.coco_path, with the transforms of that split.

    Uses cfg.coco_path, cfg.min_sizes, cfg.eval_size and cfg.max_size. Raises DatasetError for
    a missing directory or file, invalid JSON and malformed boxes.
    """
    img_folder, ann_file = coco_paths(cfg.coco_path, image_set)
    transforms = make_transforms(image_set, cfg.min_sizes, cfg.eval_size, cfg.max_size)
    return CocoDetection(img_folder, ann_file, transforms)


def collate_fn(batch: Sequence[Tuple[Tensor, Dict[str, Tensor]]]) -> Tuple[Tensor, Tensor, List[Dict[str, Tensor]]]:
    """[(image (3, H_b, W_b), target)] -> images (B, 3, Hm, Wm), pixel_mask (B, Hm, Wm) True = padding, targets."""
    images, targets = zip(*batch)
    images, pixel_mask = pad_images(images)
    return images, pixel_mask, list(targets)


def build_dataloader(
    dataset, batch_size: int, num_workers: int, train: bool, distributed: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader with DETR's sampling.

    Training shuffles and drops the last incomplete batch; evaluation keeps the order and every
    image. Distributed: a DistributedSampler shuffled from (seed, epoch) (call set_epoch each
    epoch); it repeats a few images so that every process gets as many. Otherwise the
    shuffling seed is drawn from torch's global generator, so restoring that generator restores
    the order.
    """
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed)
    else:
        sampler = RandomSampler(dataset) if train else SequentialSampler(dataset)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=train, collate_fn=collate_fn, num_workers=num_workers
    )
