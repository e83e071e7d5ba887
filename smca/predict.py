"""Inference on raw images (prepare_images, predict, attention_maps: functions of a model
built by smca.models.build_model) and its command line, detections on image files with a
trained checkpoint:

    python -m smca.predict --checkpoint OUT/checkpoint.pth --images a.png b.jpg photos/ 'more/*' \\
        --output_dir PRED [--threshold 0.5] [--max_detections N] [--attention_queries [Q ...]]

reads the images named, the image files of a folder and the matches of a glob pattern
(image_files: what is not an image is skipped with a note) and writes PRED/detections.json
(per image: file, height, width, picture and the detections, boxes xyxy in the image's pixels,
clipped to the image), PRED/<name>.png (the image with its boxes drawn, enlarged to a shorter
side of at least 512 px when smaller, with a caption line giving the threshold) and, with
--attention_queries, PRED/<name>_attention.png: for each chosen query (no values: the four
highest-scoring ones) its box, Gaussian prior and cross-attention over the image. <name> is the
image's file name without its extension, with _1, _2, ... where images share one or an input
in PRED has it (output_names); no output replaces an input or a file smca.predict did not write: the run stops
before writing anything (check_outputs).
"""

import argparse
import glob
import json
import os
import sys
from collections import Counter
from typing import TYPE_CHECKING, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin
from torch import Tensor
from torchvision.ops import clip_boxes_to_image
from torchvision.transforms.v2 import functional as TF

from smca_kernels import available_backends
from smca_kernels.reference import gaussian_log_prior

from .checkpoint import CheckpointError, config_to_restore, load_checkpoint, restore
from .config import Config
from .data.image import ImageError, image_extensions, image_size, read_image
from .data.transforms import resized_size
from .distributed import check_attention_backend, check_device
from .models.postprocess import class_probabilities
from .run_files import write_atomically
from .utils import boxes_to_pixels, normalize, pad_images, unpadded_sizes
from .visualize import draw_detections, plot_attention

if TYPE_CHECKING:
    from .models import SMCADETR

__all__ = [
    "ImageError", "prepare_images", "predict", "attention_maps", "load_model", "image_files", "output_names",
    "check_outputs", "predict_files", "main",
]

Images = Union[Tensor, Sequence[Tensor]]

PROG = "smca.predict"
DEFAULT_ATTENTION_QUERIES = 4
# Every file predict writes says so (the PNGs' "Software" text, the JSON's "software" key): a
# later run may replace those, and only those.
SOFTWARE = "smca.predict"
REPORT = "detections.json"
GLOB_CHARACTERS = "*?["


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
        batch (B, 3, Hm, Wm) normalised and padded, on the model's device in the model's dtype
        (a .double(), .half() or .bfloat16() model gets float64, float16 or bfloat16: pixels
        are resized and normalised in float32, or float64 for a float64 model, then rounded
        once to that dtype), pixel_mask (B, Hm, Wm) bool, original_sizes (B, 2) int64 (h, w)
        of the inputs.
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
    device, dtype = model.query_embed.weight.device, model.query_embed.weight.dtype
    # resizing in 16 bits would round every pixel once more before the model's own rounding
    work = torch.promote_types(dtype, torch.float32)
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
        image = image.to(work) / 255.0 if image.dtype == torch.uint8 else image.to(work)
        sizes.append(image.shape[-2:])
        # the size evaluation resizes to (the cap may win over eval_size)
        image = TF.resize(image, list(resized_size(*sizes[-1], model.eval_size, model.max_size)), antialias=True)
        resized.append(normalize(image))
    batch, pixel_mask = pad_images(resized)
    return batch.to(dtype), pixel_mask, torch.as_tensor([list(s) for s in sizes], device=device)


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
        one dict per image: boxes (K, 4) float32 absolute xyxy in the input image's pixels,
        labels (K,) int64, scores (K,) float32, by decreasing score. The model runs in its own
        dtype and on its own device (a .double(), .half() or .bfloat16() model takes the
        images in that dtype, prepare_images); boxes and scores come back in float32 whatever it is.
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
            both float32 (float64 for a float64 model: the model runs in its own dtype, the
            maps are resized and summed over levels in at least float32);
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
    maps_dtype = torch.promote_types(att["weights"].dtype, torch.float32)
    weights = att["weights"][:, index].to(maps_dtype)  # (B, K, L)

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
            prior.append(_resize(level_prior.to(maps_dtype), (height, width)))

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
    """(model in eval mode on device, its Config, {category id: name}) from a checkpoint.
    attention_backend None: the checkpoint's, or "auto" where that one cannot run on `device`.
    Raises CheckpointError, ValueError (a backend given that cannot run on `device`)."""
    from .models import build_model

    state = load_checkpoint(checkpoint)
    cfg = Config.from_dict(state["config"])
    cfg.device = device
    if attention_backend is not None:
        check_attention_backend(attention_backend, torch.device(device))
        cfg.attention_backend = attention_backend
    elif cfg.attention_backend not in ("auto", "reference") + tuple(available_backends(device)):
        cfg.attention_backend = "auto"  # the run's kernel (e.g. Triton) is not here: every backend computes the same
    # The checkpoint holds every weight: the model it fills is built without reading the
    # pretrained backbone file its config names, which need not exist here (another folder or machine).
    model, _, _ = build_model(config_to_restore(cfg))
    restore(state, model, rank=None)
    return model.to(device).eval(), cfg, dict(state.get("categories", {}))


def _to_category_ids(model, labels: Tensor, categories: Dict[int, str]) -> Tensor:
    """Class indices -> the category ids they stand for, as the checkpoint's categories say
    (smca.data.class_ids: the ids themselves, or the categories in increasing id order)."""
    from .data.coco import class_ids

    classes = class_ids(categories, model.class_embed.out_features - (model.classifier == "softmax"))
    return labels if classes is None else torch.as_tensor(classes, device=labels.device)[labels]


def _note_to_stderr(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


def _identity(path: str) -> Tuple[int, int]:
    """(device, inode): the same for every name, link and hardlink of one file."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _drawn_by_predict(path: str) -> bool:
    """Whether the file is a PNG or the JSON report that smca.predict wrote (SOFTWARE)."""
    if path.lower().endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                report = json.load(f)
        except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: not ours
            return False
        return isinstance(report, dict) and report.get("software") == SOFTWARE
    try:
        with Image.open(path) as image:  # PNG text chunks come before the pixels: no decoding
            return image.format == "PNG" and image.info.get("Software") == SOFTWARE
    except Exception:  # PIL's failures differ by format; not an image PIL opens: not ours
        return False


def _skip_reason(path: str, extensions: FrozenSet[str], in_folder: bool) -> Optional[str]:
    """Why a file a folder or a pattern brought in is not taken as an image, or None."""
    if in_folder and os.path.basename(path).startswith("."):  # a pattern shows them only when asked to, as a shell does
        return "a hidden file"
    if os.path.isdir(path):
        return "a folder (give it to --images to read its images)"
    if not os.path.isfile(path):
        return "not a regular file" if os.path.exists(path) else "a link to nothing"
    extension = os.path.splitext(path)[1]
    if extension.lower() not in extensions:
        return f"not an image file name ({extension or 'no extension'})"
    try:
        image_size(path)
    except ImageError as err:
        return str(err)
    if _drawn_by_predict(path):
        return "a picture smca.predict drew"
    return None


def image_files(paths: Sequence[str], note: Callable[[str], None] = _note_to_stderr) -> List[str]:
    """What a user points predict at (--images) -> the image files, in order, each once.

    A path to a file is taken as it is (read_image then says what is wrong with one that is not
    an image). A folder gives its image files, sorted by name (not its subfolders'); a glob
    pattern (*, ?, [...] that the shell left unexpanded: quoted, or matching nothing) its
    matches, sorted. From a folder or a pattern, hidden files (a folder's: a pattern matches them
    only when it asks, '.*', as a shell's does), folders, files whose extension is
    no image format's (smca.data.image.image_extensions: .txt, .json, ...), files that do not
    open as images (their header is read) and pictures an earlier smca.predict drew are skipped.
    A file met again, by the same path or another (a link, a hardlink), is skipped. Each skip is
    one line given to note (default: stderr).

    Raises:
        ImageError: naming a path that does not exist, or a folder or a pattern that gives no
            image file.
    """
    extensions = image_extensions()
    files: List[str] = []
    seen: Dict[Tuple[int, int], str] = {}
    for arg in paths:
        if os.path.isdir(arg):
            candidates = sorted(os.path.join(arg, name) for name in os.listdir(arg))
            empty = f"--images {arg!r}: the folder holds no image file"
        elif not os.path.lexists(arg) and any(c in arg for c in GLOB_CHARACTERS):
            candidates = sorted(glob.glob(arg))
            empty = f"--images {arg!r}: the pattern matches no image file"
        elif not os.path.lexists(arg):
            raise ImageError(f"image {arg!r} does not exist")
        else:  # a file named: taken as it is
            candidates, empty = None, ""
        images = 0
        for path in [arg] if candidates is None else candidates:
            reason = None if candidates is None else _skip_reason(path, extensions, in_folder=os.path.isdir(arg))
            if reason is None:
                images += 1
                try:
                    identity = _identity(path)
                except OSError:  # a named link to nothing, say: read_image names it
                    identity = (-1, len(files))  # a key of its own
                if identity not in seen:
                    seen[identity] = path
                    files.append(path)
                    continue
                reason = "given again" if seen[identity] == path else f"the same file as {seen[identity]}"
            note(f"skipping {path}: {reason}")
        if not images:
            raise ImageError(empty + (f" (the {len(candidates)} skipped above)" if candidates else ""))
    return files


def output_names(images: Sequence[str], reserved: Sequence[str] = ()) -> List[str]:
    """The name each image's outputs take: <name>.png, <name>_attention.png.

    The image's file name without its extension; where several images share one (a.jpg and
    a.png, or a.png in two folders; compared ignoring case, as some file systems do) each gets
    _1, _2, ... in order, and a name whose files another image already has (a_attention.png is
    both the picture of a_attention.jpg and the attention picture of a.jpg), or whose files are
    `reserved` (the input images in the output folder: a.png there), gets the next free number.
    """
    stems = [os.path.splitext(os.path.basename(p))[0] for p in images]
    counts = Counter(stem.casefold() for stem in stems)
    names, taken = [], {name.casefold() for name in reserved}
    for stem in stems:
        number = 0 if counts[stem.casefold()] == 1 else 1
        while True:
            name = stem if number == 0 else f"{stem}_{number}"
            files = {f"{name}.png".casefold(), f"{name}_attention.png".casefold()}
            if not files & taken:
                break
            number += 1
        taken |= files
        names.append(name)
    return names


def check_outputs(images: Sequence[str], output_dir: str, attention: bool) -> List[str]:
    """output_names(images), once sure that writing the outputs into output_dir harms no file.

    output_dir may be the images' own folder (a.png there draws a_1.png). An output file that
    exists already is replaced only when an earlier smca.predict wrote it (its PNG's Software text, the JSON's software
    key say so).

    Raises:
        ValueError, before anything is written: output_dir is not a folder, or an output
            (REPORT, <name>.png, with attention <name>_attention.png) exists and is an input
            image (by any name, link or hardlink), a link, or a file smca.predict did not write.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir!r} is a file, not a folder: give a folder")
    here = [p for p in images if os.path.isdir(output_dir) and os.path.exists(p)
            and os.path.samefile(os.path.dirname(os.path.abspath(p)), output_dir)]
    names = output_names(images, [os.path.basename(p) for p in here])
    inputs = {}
    for path in images:
        try:
            inputs[_identity(path)] = path
        except OSError:  # missing: read_image names it
            pass
    outputs = [REPORT] + [f"{n}.png" for n in names] + ([f"{n}_attention.png" for n in names] if attention else [])
    for file in outputs:
        path = os.path.join(output_dir, file)
        if not os.path.lexists(path):
            continue
        if not os.path.islink(path) and _identity(path) in inputs:
            raise ValueError(
                f"--output_dir {output_dir!r}: writing {file} would replace the input image "
                f"{inputs[_identity(path)]!r}; give another --output_dir"
            )
        if os.path.islink(path) or not _drawn_by_predict(path):
            raise ValueError(
                f"--output_dir {output_dir!r} already holds {file}, which smca.predict did not write; "
                "give another --output_dir, or move that file"
            )
    return names


def _check_selection(threshold: float, max_detections: Optional[int]) -> None:
    """ValueError for a NaN threshold (no score exceeds it) or a max_detections below 1."""
    if threshold != threshold:
        raise ValueError("--threshold: expected a score, got nan")
    if max_detections is not None and max_detections < 1:
        raise ValueError(f"--max_detections: expected 1 or more detections per image, got {max_detections}")


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
    categories: the checkpoint's {category id: name} (load_model's); the JSON's category_id and
    the pictures' names are the category ids the model's classes stand for by them
    (smca.data.class_ids).
    Images are read as a person sees them (smca.data.image.read_image); ImageError names a file
    that cannot be read. The outputs' names and what they may replace: check_outputs. Before
    anything is written, ValueError names a query or layer the model does not have, a
    max_detections below 1, a NaN threshold, or an output that would replace an input or a
    file smca.predict did not write. Each file is written whole, then renamed into place.
    """
    if attention_queries is not None:
        _check_attention_args(model, attention_queries, attention_layer)
    _check_selection(threshold, max_detections)
    names = check_outputs(images, output_dir, attention_queries is not None)
    os.makedirs(output_dir, exist_ok=True)
    report = {"software": SOFTWARE, "threshold": threshold, "images": []}
    for path, name in zip(images, names):
        image = read_image(path)  # uint8: predict and attention_maps take it to the model's device and dtype
        result = predict(model, [image], threshold=threshold)[0]  # sorted by decreasing score
        result = {k: v[:max_detections] for k, v in result.items()}
        result["boxes"] = clip_boxes_to_image(result["boxes"], image.shape[-2:])
        result["labels"] = _to_category_ids(model, result["labels"], categories)
        report["images"].append(
            dict(
                file=path,
                picture=f"{name}.png",
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
        png_text = PngImagePlugin.PngInfo()
        png_text.add_text("Software", SOFTWARE)
        picture = Image.fromarray(drawn.permute(1, 2, 0).numpy())
        write_atomically(os.path.join(output_dir, f"{name}.png"), lambda f: picture.save(f, format="PNG", pnginfo=png_text))
        if attention_queries is not None:
            queries = attention_queries
            if not queries:
                everyone = attention_maps(model, [image], range(model.query_embed.num_embeddings), attention_layer)
                queries = everyone["scores"][0].topk(DEFAULT_ATTENTION_QUERIES).indices.tolist()
            maps = attention_maps(model, [image], queries, attention_layer)
            maps["labels"] = _to_category_ids(model, maps["labels"], categories)
            fig = plot_attention(image, maps, queries, categories=categories)
            write_atomically(
                os.path.join(output_dir, f"{name}_attention.png"),
                lambda f: fig.savefig(f, format="png", dpi=100, metadata={"Software": SOFTWARE}),
            )
    write_atomically(os.path.join(output_dir, REPORT), lambda f: f.write(json.dumps(report, indent=1).encode("utf-8")))
    return report


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(PROG, description="Detect objects in images with an SMCA-DETR checkpoint.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument(
        "--images",
        required=True,
        nargs="+",
        help="image files (PNG, JPEG, ...), folders (their image files) or quoted glob patterns ('photos/*'); "
        "from folders and patterns, hidden files, subfolders, files that are not images and pictures "
        "smca.predict drew are skipped with a note, and a file given twice is read once",
    )
    p.add_argument(
        "--output_dir",
        required=True,
        help=f"folder for {REPORT}, <name>.png and <name>_attention.png (<name>: the image's file name "
        "without extension, then _1, _2, ... where images share one or an input there has it); it may be "
        "the images' folder: the run stops before writing anything if an output would replace an input "
        "image or a file that smca.predict did not write (its own earlier outputs are replaced)",
    )
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
        _check_selection(args.threshold, args.max_detections)
        check_attention_backend(args.attention_backend, check_device(args.device))
        images = image_files(args.images)
        check_outputs(images, args.output_dir, args.attention_queries is not None)
        for path in images:
            read_image(path)  # every image decodes before the model loads or anything is written
        model, _, categories = load_model(args.checkpoint, args.device, args.attention_backend)
        report = predict_files(
            model,
            images,
            args.output_dir,
            args.threshold,
            categories,
            args.attention_queries,
            args.attention_layer,
            args.max_detections,
        )
    except (CheckpointError, ImageError, ValueError) as err:
        p.exit(2, f"{PROG}: error: {err}\n")
    except OSError as err:  # the output folder cannot be made or written: the error names the path
        p.exit(1, f"{PROG}: error: {err}\n")
    count = sum(len(i["detections"]) for i in report["images"])
    print(f"{count} detections in {len(report['images'])} images written to {args.output_dir}")


if __name__ == "__main__":
    main()
