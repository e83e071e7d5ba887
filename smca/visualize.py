"""Pictures: detections drawn on an image, and the Gaussian prior and cross-attention of queries.

Uses matplotlib's object API (matplotlib.figure.Figure), which needs no GUI backend and does
not touch pyplot's global state.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from PIL import Image, ImageColor, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["PALETTE", "MIN_DRAWN_SIDE", "draw_detections", "feature_map_to_image", "plot_attention"]

# Colour-blind-friendly categorical colours (Okabe-Ito), cycled over category ids.
PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#FFFFFF")
CAPTION_BACKGROUND = "#202020"  # the strip under a picture that says its threshold
CAPTION_TEXT = "#FFFFFF"


def _name(categories: Optional[Dict[int, str]], label: int) -> str:
    return (categories or {}).get(int(label), str(int(label)))


# Pictures smaller than this (shorter side, pixels) are drawn enlarged, so that boxes and their
# labels can be read.
MIN_DRAWN_SIDE = 512


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or without FreeType: one fixed size
        return ImageFont.load_default()


def _text_colour(colour: str) -> str:
    """Black on light colours, white on dark ones."""
    r, g, b = ImageColor.getrgb(colour)[:3]
    return "#000000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#FFFFFF"


def _overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _place_label(box: Sequence[float], size: Sequence[float], taken: List[Sequence[float]], bounds: Sequence[int]):
    """Top-left corner of a label of `size` (w, h) for `box` (xyxy): above the box's top-left
    corner, else inside it at the top, else below it, else inside at the bottom, the first of
    these that lies in the picture and overlaps no label in `taken`; when every one is taken,
    stacked below the first free place under the box's top."""
    w, h = size
    width, height = bounds
    x0, y0, x1, y1 = box
    x = min(max(x0, 0.0), max(width - w, 0.0))

    def free(y: float) -> bool:
        rect = (x, y, x + w, y + h)
        return y >= 0 and y + h <= height and not any(_overlaps(rect, other) for other in taken)

    for y in (y0 - h, y0, y1, y1 - h):
        if free(y):
            return x, y
    y = min(max(y0, 0.0), max(height - h, 0.0))
    for _ in range(len(taken) + 1):  # step down past the labels in the way
        if free(y):
            return x, y
        below = [o[3] for o in taken if _overlaps((x, y, x + w, y + h), o)]
        if not below:
            break
        y = max(below)
        if y + h > height:
            break
    return x, min(max(y0, 0.0), max(height - h, 0.0))  # nowhere free: on top of another


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor,
    categories: Optional[Dict[int, str]] = None,
    width: Optional[int] = None,
    threshold: Optional[float] = None,
    caption: Optional[str] = None,
    min_side: int = MIN_DRAWN_SIDE,
) -> Tensor:
    """image (3, H, W) uint8; boxes (K, 4) xyxy in its pixels; labels, scores (K,) -> a picture
    (3, H', W') uint8 with each box outlined in its category's colour and labelled "name score".

    An image whose shorter side is below min_side is drawn enlarged (bilinear) to that shorter
    side, so that the boxes and labels can be read; a larger one keeps its size. The labels'
    font and the lines' width (default) follow the drawn size; a label goes above its box, inside
    it where that place is taken by another label (the best-scoring detections, first in the
    list, choose first), else below it, or is stacked under the others. With a threshold or a
    caption, a strip under the picture says "score > threshold: K detections" and the caption;
    H' then includes that strip.

    Raises ValueError for an image that is not (3, H, W) uint8 (boxes and scores may have any
    floating dtype).
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(
            f"image: expected a (3, H, W) uint8 picture, got {tuple(image.shape)} {image.dtype} "
            "(float pictures in [0, 1]: (image * 255).round().to(torch.uint8))"
        )
    image = image.detach().cpu()
    height, width_px = image.shape[-2:]
    scale = max(1.0, min_side / max(min(height, width_px), 1))
    size = (max(1, round(width_px * scale)), max(1, round(height * scale)))  # PIL: (w, h)
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    if size != picture.size:
        picture = picture.resize(size, Image.BILINEAR)
    short = min(size)
    font = _font(max(11, round(short / 32)))
    line = width if width is not None else max(2, round(short / 200))
    draw = ImageDraw.Draw(picture)
    sx, sy = size[0] / width_px, size[1] / height
    taken: List[Sequence[float]] = []
    drawn = []
    for box, label in zip(boxes.detach().float().cpu().tolist(), labels.tolist()):
        colour = PALETTE[int(label) % len(PALETTE)]
        xyxy = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
        xyxy[2], xyxy[3] = max(xyxy[2], xyxy[0]), max(xyxy[3], xyxy[1])
        draw.rectangle(xyxy, outline=colour, width=line)
        drawn.append((xyxy, colour))
    for (xyxy, colour), label, score in zip(drawn, labels.tolist(), scores.tolist()):  # over every box
        text = f"{_name(categories, label)} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        pad = max(1, line // 2)
        label_size = (right + 2 * pad, bottom + 2 * pad)
        x, y = _place_label(xyxy, label_size, taken, size)
        rect = (x, y, x + label_size[0], y + label_size[1])
        taken.append(rect)
        draw.rectangle(rect, fill=colour)
        draw.text((x + pad, y + pad), text, fill=_text_colour(colour), font=font)
    lines = []
    if threshold is not None:
        lines.append(f"score > {threshold:g}: {len(boxes)} detection{'' if len(boxes) == 1 else 's'}")
    if caption:
        lines.append(caption)
    if lines:
        text = "   ".join(lines)
        probe = ImageDraw.Draw(picture)
        _, top, _, bottom = probe.textbbox((0, 0), text, font=font)
        pad = max(2, round(short / 100))
        strip = Image.new("RGB", (size[0], bottom + 2 * pad), CAPTION_BACKGROUND)
        ImageDraw.Draw(strip).text((pad, pad), text, fill=CAPTION_TEXT, font=font)
        framed = Image.new("RGB", (size[0], size[1] + strip.size[1]))
        framed.paste(picture, (0, 0))
        framed.paste(strip, (0, size[1]))
        picture = framed
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)


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
