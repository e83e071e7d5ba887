"""Pictures: detections drawn on an image, and the Gaussian prior and cross-attention of queries.

Uses matplotlib's object API (matplotlib.figure.Figure), which needs no GUI backend and does
not touch pyplot's global state.
"""

from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

__all__ = ["PALETTE", "draw_detections", "feature_map_to_image", "plot_attention"]

# Colour-blind-friendly categorical colours (Okabe-Ito), cycled over category ids.
PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#FFFFFF")


def _name(categories: Optional[Dict[int, str]], label: int) -> str:
    return (categories or {}).get(int(label), str(int(label)))


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor,
    categories: Optional[Dict[int, str]] = None,
    width: int = 2,
) -> Tensor:
    """image (3, H, W) uint8; boxes (K, 4) xyxy in its pixels; labels, scores (K,) -> (3, H, W) uint8
    with each box outlined in its category's colour and captioned "name score"."""
    if len(boxes) == 0:
        return image.cpu().clone()
    captions = [f"{_name(categories, l)} {s:.2f}" for l, s in zip(labels.tolist(), scores.tolist())]
    colours = [PALETTE[int(l) % len(PALETTE)] for l in labels.tolist()]
    return draw_bounding_boxes(image.cpu(), boxes.detach().float().cpu(), labels=captions, colors=colours, width=width)


def feature_map_to_image(values: Tensor, stride: int, resized_size: Sequence[int], image_size: Sequence[int]) -> Tensor:
    """A map over the model's feature grid -> the same map over the original image's pixels.

    values (K, Hf, Wf): cell (x, y) covers pixels [stride x, stride (x + 1)) of the padded model
    input, whose top-left resized_size (h, w) is the image resized; image_size (H, W) is the
    original image. Returns (K, H, W).
    """
    k, hf, wf = values.shape
    on_input = F.interpolate(
        values[None].float(), size=(hf * stride, wf * stride), mode="bilinear", align_corners=False
    )[0]
    h, w = int(resized_size[0]), int(resized_size[1])
    on_image = on_input[:, :h, :w]
    return F.interpolate(on_image[None], size=tuple(int(s) for s in image_size), mode="bilinear", align_corners=False)[
        0
    ]


def plot_attention(
    image: Tensor,
    maps: Dict,
    query_indices: Sequence[int],
    batch_index: int = 0,
    categories: Optional[Dict[int, str]] = None,
) -> Figure:
    """One row per query: the image with the query's box, its Gaussian prior, its attention.

    image (3, H, W) uint8 (the original image); maps: the dict of model.attention_maps for a
    batch holding this image at batch_index (attention and prior (B, K, Hf, Wf) with prior None
    for DETR, stride, image_sizes, boxes, scores, labels).
    """
    image = image.cpu()
    size = image.shape[-2:]
    resized = maps["image_sizes"][batch_index].tolist()
    panels = {"attention": feature_map_to_image(maps["attention"][batch_index].cpu(), maps["stride"], resized, size)}
    if maps.get("prior") is not None:
        panels["Gaussian prior"] = feature_map_to_image(maps["prior"][batch_index].cpu(), maps["stride"], resized, size)
    titles = ["Gaussian prior", "attention"] if "Gaussian prior" in panels else ["attention"]
    columns = 1 + len(titles)
    rows = len(query_indices)
    fig = Figure(figsize=(3.2 * columns, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    picture = image.permute(1, 2, 0).numpy()
    for row, query in enumerate(query_indices):
        box = maps["boxes"][batch_index, row].cpu()
        label = int(maps["labels"][batch_index, row])
        score = float(maps["scores"][batch_index, row])
        boxed = draw_detections(image, box[None], torch.tensor([label]), torch.tensor([score]), categories)
        axes[row, 0].imshow(boxed.permute(1, 2, 0).numpy())
        axes[row, 0].set_title(f"query {query}: {_name(categories, label)} {score:.2f}", fontsize=9)
        for col, title in enumerate(titles, start=1):
            heat = panels[title][row]
            axes[row, col].imshow(picture)
            axes[row, col].imshow(heat.numpy(), cmap="inferno", alpha=0.6, vmin=0.0, vmax=max(float(heat.max()), 1e-12))
            axes[row, col].set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig
