"""A built-in COCO-format detection data set: coloured shapes on natural-looking backgrounds.

    python -m smca.data.synthetic --out DIR [--seed 0 --num_train 512 --num_val 128 --image_size 192]

writes the layout that `--coco_path` expects, so one loader serves COCO and this set:

    DIR/train2017/000000000001.png ...   DIR/val2017/...
    DIR/annotations/instances_train2017.json, instances_val2017.json

Each image has 1..max_objects shapes of six categories (ellipse, rectangle, triangle, star,
ring, cross) with varied size, aspect ratio, rotation and colour, on a background of smooth
multi-octave noise, a colour gradient and fine grain. Shapes are drawn as hard-edged masks (no
anti-aliasing), so every box is exact: it is the extent of the object's visible pixels (later
shapes may occlude earlier ones, never by more than half), as COCO boxes are the extent of the
visible segment. COCO bbox is [x, y, w, h] with x, y the first covered column / row and w, h
the number of covered columns / rows; area is the visible pixel count.

Everything is drawn from numpy Generators seeded by (seed, split, image index), so the same seed
gives the same bytes; nothing is downloaded.
"""

import argparse
import colorsys
import json
import math
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CATEGORIES", "shape_mask", "mask_box", "random_background", "render_scene", "make_dataset"]

# COCO category ids are 1..len(CATEGORIES), so a model needs num_classes = len(CATEGORIES) + 1.
CATEGORIES = ("ellipse", "rectangle", "triangle", "star", "ring", "cross")
SPLIT_CODES = {"train": 0, "val": 1}
MAX_OCCLUDED_FRACTION = 0.5  # an earlier shape keeps at least half of its pixels visible
MIN_CONTRAST = 60.0  # Euclidean RGB distance between a shape's colour and the background under it
# With colour_by_category, the hue (degrees) each category's colours are drawn around.
CATEGORY_HUES = (0.0, 60.0, 120.0, 180.0, 240.0, 300.0)


def _polygon(
    points: np.ndarray, center: Tuple[float, float], half_size: Tuple[float, float], rotation: float
) -> List[Tuple[float, float]]:
    """Unit-shape points (n, 2) in [-1, 1]^2 -> image points: scale by half_size, rotate, shift."""
    scaled = points * np.asarray(half_size, dtype=np.float64)
    cos, sin = math.cos(rotation), math.sin(rotation)
    x = scaled[:, 0] * cos - scaled[:, 1] * sin + center[0]
    y = scaled[:, 0] * sin + scaled[:, 1] * cos + center[1]
    return list(zip(x.tolist(), y.tolist()))


def _star_points(n_tips: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -math.pi / 2 + np.arange(2 * n_tips) * math.pi / n_tips
    radii = np.where(np.arange(2 * n_tips) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_UNIT_SHAPES = {
    "rectangle": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64),
    "triangle": np.array([[0, -1], [1, 1], [-1, 1]], dtype=np.float64),
    "star": _star_points(),
    # A plus sign whose arms are 0.3 of the half size thick, as one 12-vertex outline.
    "cross": np.array(
        [
            [-0.3, -1],
            [0.3, -1],
            [0.3, -0.3],
            [1, -0.3],
            [1, 0.3],
            [0.3, 0.3],
            [0.3, 1],
            [-0.3, 1],
            [-0.3, 0.3],
            [-1, 0.3],
            [-1, -0.3],
            [-0.3, -0.3],
        ],
        dtype=np.float64,
    ),
}


def shape_mask(
    category: str,
    center: Tuple[float, float],
    half_size: Tuple[float, float],
    rotation: float,
    image_size: Tuple[int, int],
) -> np.ndarray:
    """The pixels a shape covers, drawn hard-edged on an image-sized canvas.

    center (x, y) and half_size (a, b) in pixels; rotation in radians (ellipses and rings stay
    axis-aligned); image_size (H, W). Returns a bool mask (H, W); parts outside the image are
    clipped away by the canvas.
    """
    height, width = image_size
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = center
    a, b = half_size
    if category in ("ellipse", "ring"):
        draw.ellipse([cx - a, cy - b, cx + a, cy + b], fill=1)
        if category == "ring":
            draw.ellipse([cx - 0.55 * a, cy - 0.55 * b, cx + 0.55 * a, cy + 0.55 * b], fill=0)
    elif category in _UNIT_SHAPES:
        draw.polygon(_polygon(_UNIT_SHAPES[category], center, half_size, rotation), fill=1)
    else:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    return np.asarray(canvas, dtype=bool)


def mask_box(mask: np.ndarray) -> Optional[List[int]]:
    """COCO box [x, y, w, h] of the True pixels of a (H, W) mask, None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _smooth_noise(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """Multi-octave value noise (H, W, channels) in about [-1, 1]: coarse grids upsampled bicubically."""
    total = np.zeros((height, width, channels), dtype=np.float32)
    amplitude = 1.0
    for cells in (2, 4, 8, 16):
        grid = rng.uniform(-1.0, 1.0, size=(cells, cells, channels)).astype(np.float32)
        for c in range(channels):
            octave = Image.fromarray(grid[:, :, c]).resize((width, height), Image.BICUBIC)
            total[:, :, c] += amplitude * np.asarray(octave)
        amplitude *= 0.5
    return total / 1.875  # sum of the amplitudes 1 + 1/2 + 1/4 + 1/8


def random_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A natural-looking background (H, W, 3) uint8: base colour + gradient + smooth noise + grain."""
    base = rng.uniform(40, 215, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xs / width - 0.5) * math.cos(angle) + (ys / height - 0.5) * math.sin(angle)
    gradient = ramp[:, :, None] * rng.uniform(-80, 80, size=3)
    noise = _smooth_noise(rng, height, width, 3) * rng.uniform(15, 60)
    grain = rng.normal(0.0, 4.0, size=(height, width, 3))
    return np.clip(base + gradient + noise + grain, 0, 255).astype(np.uint8)


def _category_colour(rng: np.random.Generator, category_id: int) -> np.ndarray:
    """RGB (3,) in 0..255 of hue CATEGORY_HUES[category_id - 1] +- 15 degrees, saturation and
    value in [0.6, 1]."""
    hue = (CATEGORY_HUES[category_id - 1] + rng.uniform(-15, 15)) % 360 / 360
    saturation, value = rng.uniform(0.6, 1.0, size=2)
    return 255 * np.array(colorsys.hsv_to_rgb(hue, saturation, value))


def _shape_colour(
    rng: np.random.Generator, under: np.ndarray, category_id: Optional[int] = None
) -> Optional[np.ndarray]:
    """A random RGB colour at least MIN_CONTRAST away from `under` (3,), or None after some tries;
    of the category's hue when category_id is given."""
    for _ in range(20):
        colour = rng.uniform(0, 255, size=3) if category_id is None else _category_colour(rng, category_id)
        if np.linalg.norm(colour - under) >= MIN_CONTRAST:
            return colour
    return None


def render_scene(
    rng: np.random.Generator,
    background: np.ndarray,
    num_objects: int,
    min_rel_size: float = 0.08,
    max_rel_size: float = 0.35,
    colour_by_category: bool = False,
) -> Tuple[np.ndarray, List[Dict]]:
    """Draw up to `num_objects` shapes on `background` (H, W, 3) uint8.

    Half sizes are drawn between min_rel_size and max_rel_size of the shorter image side with
    an aspect ratio in [0.6, 1.6]. Colours are random, or with colour_by_category drawn around
    the category's hue (CATEGORY_HUES), so that colour alone tells the category. A placement
    that would hide more than MAX_OCCLUDED_FRACTION of an earlier shape is redrawn (and the
    shape dropped after 30 tries).
    Returns the image (H, W, 3) uint8 and, per visible shape in drawing order,
    dict(category_id, bbox [x, y, w, h], area).
    """
    image = background.astype(np.float32)
    height, width = background.shape[:2]
    short = min(height, width)
    placed = []  # [category_id, full mask, visible mask]
    for _ in range(num_objects):
        for _attempt in range(30):
            category_id = int(rng.integers(len(CATEGORIES))) + 1
            size = rng.uniform(min_rel_size, max_rel_size) * short
            aspect = rng.uniform(0.6, 1.6)
            half_size = (size * math.sqrt(aspect), size / math.sqrt(aspect))
            center = (rng.uniform(0, width), rng.uniform(0, height))
            rotation = rng.uniform(-math.pi / 6, math.pi / 6)
            mask = shape_mask(CATEGORIES[category_id - 1], center, half_size, rotation, (height, width))
            if mask.sum() < 16:
                continue
            if any((visible & ~mask).sum() < (1 - MAX_OCCLUDED_FRACTION) * full.sum() for _, full, visible in placed):
                continue
            colour = _shape_colour(rng, image[mask].mean(axis=0), category_id if colour_by_category else None)
            if colour is None:
                continue
            # Shading: a soft gradient across the shape and a little grain, so objects are not flat.
            shade = 1.0 + 0.15 * _smooth_noise(rng, height, width, 1)
            fill = np.clip(colour * shade + rng.normal(0.0, 3.0, size=(height, width, 3)), 0, 255)
            image[mask] = fill[mask]
            for entry in placed:
                entry[2] = entry[2] & ~mask
            placed.append([category_id, mask, mask.copy()])
            break
    objects = []
    for category_id, _full, visible in placed:
        objects.append(dict(category_id=category_id, bbox=mask_box(visible), area=float(visible.sum())))
    return image.astype(np.uint8), objects


def _render_split(
    out: str,
    split: str,
    num_images: int,
    first_id: int,
    seed: int,
    image_size: int,
    max_objects: int,
    rel_sizes: Tuple[float, float],
    colour_by_category: bool,
) -> Dict:
    folder = os.path.join(out, f"{split}2017")
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
        height = int(rng.integers(int(0.75 * image_size), image_size + 1))
        width = int(rng.integers(int(0.75 * image_size), image_size + 1))
        background = random_background(rng, height, width)
        num_objects = int(rng.integers(1, max_objects + 1))
        image, objects = render_scene(rng, background, num_objects, *rel_sizes, colour_by_category)
        image_id = first_id + index
        file_name = f"{image_id:012d}.png"
        Image.fromarray(image).save(os.path.join(folder, file_name))
        images.append(dict(id=image_id, file_name=file_name, height=height, width=width))
        for obj in objects:
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, iscrowd=0, **obj))
    return dict(
        info=dict(description=f"smca synthetic shapes, {split} split, seed {seed}", version="1.0"),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=[dict(id=i + 1, name=name, supercategory="shape") for i, name in enumerate(CATEGORIES)],
    )


def make_dataset(
    out: str,
    num_train: int = 512,
    num_val: int = 128,
    image_size: int = 192,
    seed: int = 0,
    max_objects: int = 8,
    rel_sizes: Tuple[float, float] = (0.08, 0.35),
    colour_by_category: bool = False,
) -> str:
    """Write the data set under `out` (see the module docstring) and return `out`.

    Image sides are drawn in [0.75, 1] * image_size; each image has 1..max_objects shapes whose
    half sizes are drawn in rel_sizes (min, max) times the shorter image side. colour_by_category
    gives each category its own hue: recognising the category becomes easy and what is left to
    learn is mostly where the objects are (the convergence study's setting).
    Train and val image ids do not overlap (val ids follow the train ids).
    """
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be at least 1, got {max_objects}")
    if not 0 < rel_sizes[0] <= rel_sizes[1] <= 1:
        raise ValueError(f"rel_sizes must satisfy 0 < min <= max <= 1, got {tuple(rel_sizes)}")
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    first_id = 1
    for split, count in (("train", num_train), ("val", num_val)):
        coco = _render_split(
            out, split, count, first_id, seed, image_size, max_objects, tuple(rel_sizes), colour_by_category
        )
        with open(os.path.join(out, "annotations", f"instances_{split}2017.json"), "w") as f:
            json.dump(coco, f)
        first_id += count
    return out


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Write the built-in synthetic COCO-format detection data set.")
    parser.add_argument(
        "--out", required=True, help="output directory (COCO layout: train2017/, val2017/, annotations/)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=512)
    parser.add_argument("--num_val", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=192, help="longest possible image side in pixels")
    parser.add_argument("--max_objects", type=int, default=8)
    parser.add_argument("--rel_sizes", type=float, nargs=2, default=(0.08, 0.35), help="half sizes / shorter side")
    parser.add_argument("--colour_by_category", action="store_true", help="a hue per category")
    args = parser.parse_args(argv)
    make_dataset(
        args.out,
        args.num_train,
        args.num_val,
        args.image_size,
        args.seed,
        args.max_objects,
        tuple(args.rel_sizes),
        args.colour_by_category,
    )
    print(f"wrote {args.num_train} train and {args.num_val} val images to {args.out}")


if __name__ == "__main__":
    main()
