"""Inference on raw images (prepare_images, predict, attention_maps: functions of a model
built by smca.models.build_model) and its command line, detections on image files with a
trained checkpoint:

    python -m smca.predict --checkpoint OUT/checkpoint.pth --images a.png b.jpg --output_dir PRED \\
        [--threshold 0.5] [--max_detections N] [--attention_queries [Q ...]]

writes PRED/detections.json (per image: file, height, width and the detections, boxes xyxy in
the image's pixels, clipped to the image), PRED/<name>.png (the image with its boxes drawn, enlarged
to a shorter side of at least 512 px when smaller, with a caption line giving the threshold) and, with
--attention_queries, PRED/<name>_attention.png: for each chosen query (no values: the four
highest-scoring ones) its box, Gaussian prior and cross-attention over the image.
"""

import argparse
import json
import os
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.ops import clip_boxes_to_image
from torchvision.transforms.v2 import functional as TF

from smca_kernels.reference import gaussian_log_prior

from .checkpoint import CheckpointError, config_to_restore, load_checkpoint, restore
from .config import Config
from .data.image import ImageError, read_image
from .data.transforms import resized_size
from .models.postprocess import class_probabilities
from .utils import boxes_to_pixels, normalize, pad_images, unpadded_sizes
from .visualize import draw_detections, plot_attention

if TYPE_CHECKING:
    from .models import SMCADETR

__all__ = ["ImageError", "prepare_images", "predict", "attention_maps", "load_model", "predict_files", "main"]

Images = Union[Tensor, Sequence[Tensor]]

PROG = "smca.predict"
DEFAULT_ATTENTION_QUERIES = 4


def _resize(maps: Tensor, size: Tuple[int, int]) -> Tensor:
    """(B, K, h, w) -> (B, K, *size), bilinear; unchanged when already that size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def prepare_images(model: "SMCADETR", images: Images) -> Tuple[Tensor, Tensor, Tensor]:
    """Raw images -> model input at the evaluation size.

    Args:
        images: a list of (3, H_b, W_b) tensors or a (B, 3, H, W) batch, float in [0, 1]
            or uint8 (smca.data.image.read_image reads a file so).
    Returns:
        batch (B, 3, Hm, Wm) normalised and padded, pixel_mask (B, Hm, Wm),
        original_sizes (B, 2) (h, w) of the inputs.
    Raises:
        TypeError: not tensors (a numpy array, a PIL image or a path: read it with read_image).
        ValueError: not 3 channels, or float values outside [0, 1] (0..255 as floats, say).
    """
    if isinstance(images, Tensor):
        images = [images] if images.dim() == 3 else list(images.unbind(0))
    if isinstance(images, (str, bytes)) or not all(isinstance(image, Tensor) for image in images):
        raise TypeError(
            "images: expected (3, H, W) tensors (uint8, or float in [0, 1]); read files with "
            f"smca.data.image.read_image, got {type(images).__name__}"
        )
    device = model.query_embed.weight.device
    resized, sizes = [], []
    for image in images:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images: expected (3, H, W) tensors, got shape {tuple(image.shape)}")
        if image.is_floating_point() and image.numel() and not (image.min() >= 0 and image.max() <= 1):
            raise ValueError(
                f"images: float pictures must be in [0, 1], got values in [{float(image.min()):g}, "
                f"{float(image.max()):g}] (pass uint8, or divide 0..255 values by 255)"
            )
        image = image.to(device)
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        sizes.append(image.shape[-2:])
        # the size evaluation resizes to (the cap may win over eval_size)
        image = TF.resize(image, list(resized_size(*sizes[-1], model.eval_size, model.max_size)), antialias=True)
        resized.append(normalize(image))
    batch, pixel_mask = pad_images(resized)
    return batch, pixel_mask, torch.as_tensor([list(s) for s in sizes], device=device)


@torch.no_grad()
def _run_eval(model: "SMCADETR", images: Images, attention_layer: Optional[int] = None) -> Tuple[Dict, Tensor, Tensor]:
    """Runs the model in eval mode (restoring the mode after) -> (outputs, pixel_mask, original_sizes)."""
    batch, pixel_mask, sizes = prepare_images(model, images)
    was_training = model.training
    model.eval()
    try:
        outputs = model(batch, pixel_mask, attention_layer)
    finally:
        model.train(was_training)
    return outputs, pixel_mask, sizes


@torch.no_grad()
def predict(model: "SMCADETR", images: Images, threshold: float = 0.5) -> List[Dict[str, Tensor]]:
    """Detections on raw images; no targets needed.

    Args:
        images: see prepare_images (any sizes; resized to the evaluation size internally).
        threshold: keep detections whose score exceeds it.
    Returns:
        one dict per image: boxes (K, 4) absolute xyxy in the input image's pixels,
        labels (K,) int64, scores (K,), by decreasing score.
    """
    outputs, _, sizes = _run_eval(model, images)
    results = model.postprocess(outputs, sizes)
    return [{k: v[r["scores"] > threshold] for k, v in r.items()} for r in results]


@torch.no_grad()
def attention_maps(model: "SMCADETR", images: Images, query_indices: Sequence[int], layer: int = -1) -> Dict:
    """Gaussian prior and cross-attention of chosen queries over the feature map, for pictures.

    With several levels the maps of the coarser levels are resized onto the finest level's
    grid: the attention keeps its mass (it sums to 1 over all levels), the prior is the
    alpha-weighted mixture of the levels' priors.

    Args:
        images: see prepare_images.
        query_indices: K query indices.
        layer: decoder layer (negative counts from the last).
    Returns:
        attention (B, K, Hf, Wf) head-averaged cross-attention weights;
        prior (B, K, Hf, Wf) head-averaged Gaussian weights exp(logG) in [0, 1] (None for DETR);
        feature_size (Hf, Wf) and stride: cell (x, y) covers pixels [stride x, stride (x + 1))
            of the padded input of size padded_size (Hm, Wm);
        image_sizes (B, 2) (h, w) of each resized image in that input (the rest is padding);
        boxes (B, K, 4) the queries' boxes in the original images' pixels (xyxy);
        scores (B, K) their top class probability, labels (B, K) that class.
    """
    _check_attention_args(model, query_indices, layer)
    outputs, pixel_mask, sizes = _run_eval(model, images, attention_layer=layer)
    att = outputs["attention"]
    index = torch.as_tensor(list(query_indices), dtype=torch.long, device=pixel_mask.device)
    shapes = att["spatial_shapes"]
    height, width = shapes[0]
    weights = att["weights"][:, index]  # (B, K, L)

    attention, prior = [], []
    for level, (w_level, (h, w)) in enumerate(zip(weights.split([h * w for h, w in shapes], dim=-1), shapes)):
        w_level = w_level.unflatten(-1, (h, w))  # (B, K, h, w)
        # a coarse level's cell spreads its weight over the finer cells it covers
        attention.append(_resize(w_level, (height, width)) * (h * w) / (height * width))
        if att["centers"] is not None:
            log_prior = gaussian_log_prior(
                att["centers"][:, :, index, level], att["precision"][:, :, index, level], (h, w)
            )  # (B, H or 1, K, h * w)
            level_prior = log_prior.exp().mean(1).unflatten(-1, (h, w))
            if att["alpha"] is not None:
                level_prior = level_prior * att["alpha"][:, 0, index, level, None, None]
            prior.append(_resize(level_prior, (height, width)))

    scores, labels = class_probabilities(outputs["pred_logits"][:, index], model.classifier).max(-1)
    return {
        "attention": torch.stack(attention).sum(0),
        "prior": torch.stack(prior).sum(0) if prior else None,
        "feature_size": (height, width),
        "stride": model.decoder.strides[0],
        "padded_size": tuple(pixel_mask.shape[-2:]),
        "image_sizes": unpadded_sizes(pixel_mask).long(),
        "boxes": boxes_to_pixels(outputs["pred_boxes"][:, index], sizes),
        "scores": scores,
        "labels": labels,
    }


def _check_attention_args(model: "SMCADETR", query_indices: Optional[Sequence[int]], layer: int) -> None:
    """ValueError naming a query index or decoder layer the model does not have."""
    queries, layers = model.query_embed.num_embeddings, len(model.decoder.layers)
    bad = [int(i) for i in (query_indices or []) if not 0 <= int(i) < queries]
    if bad:
        raise ValueError(f"query indices {bad}: the model has queries 0..{queries - 1}")
    if not -layers <= layer < layers:
        raise ValueError(f"attention layer {layer}: the model has decoder layers 0..{layers - 1} (or -1..-{layers})")


def load_model(checkpoint: str, device: str = "cpu", attention_backend: Optional[str] = None):
    """(model in eval mode on device, its Config, {category id: name}) from a checkpoint."""
    from .models import build_model

    state = load_checkpoint(checkpoint)
    cfg = Config.from_dict(state["config"])
    cfg.device = device
    if attention_backend is not None:
        cfg.attention_backend = attention_backend
    # The checkpoint holds every weight: the model it fills is built without reading the
    # pretrained backbone file its config names, which need not exist here (another folder or machine).
    model, _, _ = build_model(config_to_restore(cfg))
    restore(state, model, rank=None)
    return model.to(device).eval(), cfg, dict(state.get("categories", {}))


def _output_names(paths: List[str]) -> List[str]:
    """File stems, made unique by an index where two images share one."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return [s if stems.count(s) == 1 else f"{s}_{i}" for i, s in enumerate(stems)]


def predict_files(
    model,
    images: List[str],
    output_dir: str,
    threshold: float,
    categories: Dict[int, str],
    attention_queries: Optional[List[int]] = None,
    attention_layer: int = -1,
    max_detections: Optional[int] = None,
) -> Dict:
    """Run the model on image files and write the JSON, the PNGs and the attention pictures.

    Keeps the detections scoring above threshold, at most max_detections per image (the best).
    Images are read as a person sees them (smca.data.image.read_image); ImageError names a file
    that cannot be read; ValueError a query or layer the model does not have (before anything is
    written).
    """
    if attention_queries is not None:
        _check_attention_args(model, attention_queries, attention_layer)
    os.makedirs(output_dir, exist_ok=True)
    device = next(model.parameters()).device
    report = {"threshold": threshold, "images": []}
    for path, name in zip(images, _output_names(images)):
        image = read_image(path)
        pixels = image.to(device).float() / 255.0
        result = predict(model, [pixels], threshold=threshold)[0]  # sorted by decreasing score
        result = {k: v[:max_detections] for k, v in result.items()}
        result["boxes"] = clip_boxes_to_image(result["boxes"], image.shape[-2:])
        report["images"].append(
            dict(
                file=path,
                height=int(image.shape[1]),
                width=int(image.shape[2]),
                detections=[
                    dict(
                        box_xyxy=[round(v, 2) for v in box],
                        category_id=int(label),
                        category=categories.get(int(label), str(int(label))),
                        score=round(float(score), 4),
                    )
                    for box, label, score in zip(
                        result["boxes"].tolist(), result["labels"].tolist(), result["scores"].tolist()
                    )
                ],
            )
        )
        drawn = draw_detections(
            image,
            result["boxes"],
            result["labels"],
            result["scores"],
            categories,
            threshold=threshold,
            caption=None if max_detections is None else f"(at most {max_detections} shown, the best)",
        )
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(os.path.join(output_dir, f"{name}.png"))
        if attention_queries is not None:
            queries = attention_queries
            if not queries:
                everyone = attention_maps(model, [pixels], range(model.query_embed.num_embeddings), attention_layer)
                queries = everyone["scores"][0].topk(DEFAULT_ATTENTION_QUERIES).indices.tolist()
            maps = attention_maps(model, [pixels], queries, attention_layer)
            fig = plot_attention(image, maps, queries, categories=categories)
            fig.savefig(os.path.join(output_dir, f"{name}_attention.png"), dpi=100)
    with open(os.path.join(output_dir, "detections.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(PROG, description="Detect objects in images with an SMCA-DETR checkpoint.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", required=True, nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--threshold", type=float, default=0.5, help="keep detections scoring above it")
    p.add_argument("--max_detections", type=int, help="keep at most this many per image (the best)")
    p.add_argument(
        "--attention_queries",
        type=int,
        nargs="*",
        help="also draw these queries' Gaussian prior and attention (no values: the top-scoring ones)",
    )
    p.add_argument("--attention_layer", type=int, default=-1, help="decoder layer of the attention picture")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention_backend", help="override the checkpoint's attention backend")
    args = p.parse_args(argv)
    try:
        for path in args.images:
            read_image(path)  # every image decodes before the model loads or anything is written
        model, _, categories = load_model(args.checkpoint, args.device, args.attention_backend)
        report = predict_files(
            model,
            args.images,
            args.output_dir,
            args.threshold,
            categories,
            args.attention_queries,
            args.attention_layer,
            args.max_detections,
        )
    except (CheckpointError, ImageError, ValueError) as err:
        p.exit(2, f"{PROG}: error: {err}\n")
    count = sum(len(i["detections"]) for i in report["images"])
    print(f"{count} detections in {len(report['images'])} images written to {args.output_dir}")


if __name__ == "__main__":
    main()
