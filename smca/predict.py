"""Detections on image files with a trained checkpoint.

    python -m smca.predict --checkpoint OUT/checkpoint.pth --images a.png b.jpg --output_dir PRED \\
        [--threshold 0.5] [--max_detections N] [--attention_queries [Q ...]]

writes PRED/detections.json (per image: file, height, width and the detections, boxes xyxy in
the image's pixels, clipped to the image), PRED/<name>.png (the image with its boxes drawn) and, with
--attention_queries, PRED/<name>_attention.png: for each chosen query (no values: the four
highest-scoring ones) its box, Gaussian prior and cross-attention over the image.
"""

import argparse
import json
import os
from typing import Dict, List, Optional

import torch
from PIL import Image
from torchvision.ops import clip_boxes_to_image

from .checkpoint import CheckpointError, load_checkpoint, restore
from .config import Config
from .data.image import ImageError, read_image
from .visualize import draw_detections, plot_attention

__all__ = ["ImageError", "load_model", "predict_files", "main"]

PROG = "smca.predict"
DEFAULT_ATTENTION_QUERIES = 4


def load_model(checkpoint: str, device: str = "cpu", attention_backend: Optional[str] = None):
    """(model in eval mode on device, its Config, {category id: name}) from a checkpoint."""
    from .models import build_model

    state = load_checkpoint(checkpoint)
    cfg = Config.from_dict(state["config"])
    cfg.device = device
    if attention_backend is not None:
        cfg.attention_backend = attention_backend
    model, _, _ = build_model(cfg)
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
    that cannot be read.
    """
    os.makedirs(output_dir, exist_ok=True)
    device = next(model.parameters()).device
    report = {"threshold": threshold, "images": []}
    for path, name in zip(images, _output_names(images)):
        image = read_image(path)
        pixels = image.to(device).float() / 255.0
        result = model.predict([pixels], threshold=threshold)[0]  # sorted by decreasing score
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
        drawn = draw_detections(image, result["boxes"], result["labels"], result["scores"], categories)
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(os.path.join(output_dir, f"{name}.png"))
        if attention_queries is not None:
            queries = attention_queries
            if not queries:
                everyone = model.attention_maps([pixels], range(model.query_embed.num_embeddings), attention_layer)
                queries = everyone["scores"][0].topk(DEFAULT_ATTENTION_QUERIES).indices.tolist()
            maps = model.attention_maps([pixels], queries, attention_layer)
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
    except (CheckpointError, ImageError) as err:
        p.exit(2, f"{PROG}: error: {err}\n")
    count = sum(len(i["detections"]) for i in report["images"])
    print(f"{count} detections in {len(report['images'])} images written to {args.output_dir}")


if __name__ == "__main__":
    main()
