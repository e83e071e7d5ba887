"""Helpers shared by the data pipeline, the model and inference: ImageNet normalisation,
batching with a pixel mask, and box conversion to pixels.

Box conversions and IoUs come from torchvision.ops (box_convert, generalized_box_iou).
"""
from typing import List, Sequence, Tuple

import torch
from torch import Tensor
from torchvision.ops import box_convert

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "normalize",
    "pad_images",
    "unpadded_sizes",
    "split_levels",
    "boxes_to_pixels",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(image: Tensor) -> Tensor:
    """(..., 3, H, W) in [0, 1] -> ImageNet-normalised, as the backbone expects."""
    mean = image.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = image.new_tensor(IMAGENET_STD)[:, None, None]
    return (image - mean) / std


def pad_images(images: Sequence[Tensor]) -> Tuple[Tensor, Tensor]:
    """Pads images of different sizes at the bottom and right into one batch.

    Args:
        images: B tensors (3, H_b, W_b), already normalised (padding is 0 = the mean colour).
    Returns:
        batch (B, 3, Hm, Wm) with Hm, Wm the largest height and width;
        pixel_mask (B, Hm, Wm) bool, True = padding.
    """
    if len(images) == 0:
        raise ValueError("pad_images: expected at least one image")
    height = max(int(img.shape[-2]) for img in images)
    width = max(int(img.shape[-1]) for img in images)
    first = images[0]
    batch = first.new_zeros((len(images), first.shape[0], height, width))
    pixel_mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for b, img in enumerate(images):
        h, w = img.shape[-2:]
        batch[b, :, :h, :w].copy_(img)
        pixel_mask[b, :h, :w] = False
    return batch, pixel_mask


def unpadded_sizes(pixel_mask: Tensor) -> Tensor:
    """(B, Hm, Wm) bool, True = padding -> (B, 2) float (h, w) of each image's content.

    The content is the top-left block that pad_images leaves unmasked.
    """
    valid = ~pixel_mask
    heights = valid.any(dim=2).sum(dim=1)
    widths = valid.any(dim=1).sum(dim=1)
    return torch.stack([heights, widths], dim=1).float()


def split_levels(x: Tensor, spatial_shapes: Sequence[Tuple[int, int]]) -> List[Tensor]:
    """(B, L, ...) with L = sum of Hf * Wf -> one (B, Hf * Wf, ...) chunk per level."""
    return list(x.split([h * w for h, w in spatial_shapes], dim=1))


def boxes_to_pixels(boxes: Tensor, sizes: Tensor) -> Tensor:
    """boxes (B, N, 4) cxcywh normalised; sizes (B, 2) (h, w) -> (B, N, 4) absolute xyxy."""
    height, width = sizes.to(device=boxes.device, dtype=torch.float32).unbind(1)
    scale = torch.stack([width, height, width, height], dim=1).unsqueeze(1)  # (B, 1, 4)
    return box_convert(boxes.float(), "cxcywh", "xyxy") * scale
