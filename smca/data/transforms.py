"""DETR's augmentation on torchvision transforms.v2.

Training: horizontal flip, then one of
    (a) resize the shorter side to a random size in cfg.min_sizes (longer side <= cfg.max_size), or
    (b) resize the shorter side to one of 400/500/600, crop a random region 384..600 pixels
        wide and high, then (a);
evaluation: resize the shorter side to cfg.eval_size (longer side <= cfg.max_size).
As in DETR's resize, max_size caps the longer side whatever shorter side is asked for: where
the shorter side asked for would make the longer side exceed it, the image is scaled to a longer
side of max_size instead (resized_size), so max_size may be below eval_size and min_sizes.
Then uint8 -> float in [0, 1] and ImageNet normalisation. DETR's 400/500/600 and 384..600 are
sizes for an evaluation size of 800; they are scaled by cfg.eval_size / 800 so that small images
(the synthetic set, the demo preset) get the same recipe at their scale.

All randomness comes from torch's global generator, so a run is reproducible from its seed and
an exact resume only needs torch's RNG state.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..utils import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["RandomSizeCrop", "ResizeShortestSide", "resized_size", "capped_sizes_note", "make_transforms"]

DETR_EVAL_SIZE = 800


def resized_size(height: int, width: int, size: int, max_size: int) -> Tuple[int, int]:
    """(height, width) in pixels of an image resized to a shorter side of `size`, unless that
    makes the longer side exceed `max_size`: then to a longer side of `max_size` (DETR's
    get_size_with_aspect_ratio). The other side keeps the aspect ratio, rounded down (at least
    1); integer arithmetic, so a capped longer side is exactly max_size."""
    short, long = min(height, width), max(height, width)
    if size * long <= max_size * short:
        new_short, new_long = size, size * long // short
    else:
        new_short, new_long = max(1, max_size * short // long), max_size
    return (new_short, new_long) if height <= width else (new_long, new_short)


def capped_sizes_note(sizes: Sequence[int], max_size: int, example: Tuple[int, int] = (480, 640)) -> Optional[str]:
    """A sentence on the shorter sides in `sizes` that max_size keeps from ever being reached
    (every image is then scaled to a longer side of max_size), with the size an `example`
    (height, width) image gets; None when every size can be reached."""
    capped = sorted({s for s in sizes if s > max_size})
    if not capped:
        return None
    height, width = example
    new_h, new_w = resized_size(height, width, capped[-1], max_size)
    return (
        f"shorter side{'s' if len(capped) > 1 else ''} {', '.join(map(str, capped))} "
        f"exceed{'' if len(capped) > 1 else 's'} max_size {max_size}: "
        f"as in DETR's resize, the cap wins and images get a longer side of {max_size} instead "
        f"(a {width} x {height} image becomes {new_w} x {new_h})"
    )


class ResizeShortestSide(v2.RandomShortestSize):
    """Resize to a shorter side drawn from `min_size`, the longer side capped at `max_size`
    (resized_size). The draw is that of v2.RandomShortestSize (one torch.randint)."""

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        size = self.min_size[int(torch.randint(len(self.min_size), ()))]
        return dict(size=resized_size(height, width, size, self.max_size))


class RandomSizeCrop(v2.Transform):
    """Crop a random region whose width and height are drawn in [min_size, max_size] pixels.

    Sides are capped by the image's own (so a small image is never padded). Boxes are clipped
    to the crop by v2's crop kernel; those left empty are removed later by SanitizeBoundingBoxes.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 1 <= min_size <= max_size:
            raise ValueError(f"RandomSizeCrop: need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_w = int(torch.randint(min(self.min_size, width), min(width, self.max_size) + 1, ()))
        crop_h = int(torch.randint(min(self.min_size, height), min(height, self.max_size) + 1, ()))
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        return dict(top=top, left=left, height=crop_h, width=crop_w)

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def make_transforms(image_set: str, min_sizes, eval_size: int, max_size: int) -> v2.Compose:
    """The v2 pipeline for "train" or "val" over (image, dict(boxes=BoundingBoxes, labels)).

    min_sizes: shorter sides for training; eval_size: shorter side for evaluation; max_size:
    cap on the longer side, which wins over both (resized_size). Output: a float normalised
    tv_tensors.Image and the dict with the boxes (XYXY, absolute) moved along, clipped to the
    image, and empty ones (with their labels) removed.
    """
    scale = eval_size / DETR_EVAL_SIZE
    finish = [
        # Resizing to a whole number of pixels can leave a box that touches the right or bottom
        # edge a fraction of a pixel outside the image, and SanitizeBoundingBoxes drops such boxes.
        v2.ClampBoundingBoxes(clamping_mode="hard"),
        v2.SanitizeBoundingBoxes(min_size=1.0),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
    ]
    if image_set == "val":
        return v2.Compose([v2.ToImage(), ResizeShortestSide(eval_size, max_size=max_size), *finish])
    if image_set != "train":
        raise ValueError(f"image_set: expected 'train' or 'val', got {image_set!r}")
    resize = ResizeShortestSide(list(min_sizes), max_size=max_size)
    resize_crop_resize = v2.Compose(
        [
            v2.RandomShortestSize([round(s * scale) for s in (400, 500, 600)]),
            RandomSizeCrop(round(384 * scale), round(600 * scale)),
            ResizeShortestSide(list(min_sizes), max_size=max_size),
        ]
    )
    return v2.Compose([v2.ToImage(), v2.RandomHorizontalFlip(), v2.RandomChoice([resize, resize_crop_resize]), *finish])
