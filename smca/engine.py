"""One training epoch, and evaluation with COCO's box AP.

Data loaders yield (images (B, 3, H, W), pixel_mask (B, H, W) True = padding, targets) as
smca.data.collate_fn builds them. Under DDP every process runs its share; losses are averaged
over processes and detections gathered on the main process, which computes the COCO metrics.
"""

import contextlib
import io
import json
import math
import os
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .distributed import all_gather_object, all_reduce_mean, is_main_process
from .run_files import OutputError, write_text

__all__ = [
    "NonFiniteLossError",
    "autocast",
    "train_one_epoch",
    "evaluate",
    "write_results",
    "coco_evaluate",
    "format_coco_summary",
    "COCO_STAT_NAMES",
]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; training must stop."""


def autocast(device: torch.device, amp: str):
    """Mixed precision for the model's forward: amp "off", "bf16" or "fp16"."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


def _to_float32(outputs: Any) -> Any:
    """Cast the floating tensors of a (nested) model output to float32, so losses and
    post-processing run in full precision after an autocast forward."""
    if isinstance(outputs, Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: _to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float32(v) for v in outputs)
    return outputs


def _to_device(images: Tensor, pixel_mask: Tensor, targets: List[Dict[str, Tensor]], device: torch.device):
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images.to(device, non_blocking=True), pixel_mask.to(device, non_blocking=True), targets


def _loss_values(losses: Dict[str, Tensor], device: torch.device) -> Dict[str, float]:
    """Scalar losses -> python floats averaged over processes (one device sync per step)."""
    keys = sorted(losses)
    values = torch.stack([losses[k].detach().float().reshape(()) for k in keys]).tolist()
    return all_reduce_mean(dict(zip(keys, values)), device)


def train_one_epoch(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    clip_max_norm: float = 0.0,
    amp: str = "off",
    scaler: Optional[torch.amp.GradScaler] = None,
    progress: bool = True,
) -> Dict[str, float]:
    """Train for one pass over data_loader; returns the epoch means of the logged losses, of the
    gradient norm (before clipping) and the lr.

    criterion(outputs, targets) returns scalar losses with the total under "loss". A
    GradScaler (for amp "fp16") scales the loss and skips steps with non-finite gradients.
    Without one, raises NonFiniteLossError as soon as the model's outputs, the (process-averaged)
    loss or the gradients are NaN or infinite, before the optimizer step, so the weights stay
    those of the last finite step.
    """
    model.train()
    criterion.train()
    sums: Dict[str, float] = defaultdict(float)
    steps = 0
    norms: List[float] = []  # finite gradient norms (a GradScaler skips the steps with others)
    bar = tqdm(
        data_loader,
        desc=f"epoch {epoch}",
        disable=not (progress and is_main_process()),
        leave=False,
        dynamic_ncols=True,
    )
    for images, pixel_mask, targets in bar:
        where = f"at epoch {epoch}, iteration {steps}"
        images, pixel_mask, targets = _to_device(images, pixel_mask, targets, device)
        with autocast(device, amp):
            outputs = model(images, pixel_mask)
        outputs = _to_float32(outputs)
        # The matcher cannot work on NaN; every process must agree to stop, or the others hang.
        finite = torch.isfinite(outputs["pred_logits"]).all() & torch.isfinite(outputs["pred_boxes"]).all()
        if all_reduce_mean({"finite": float(finite)}, device)["finite"] < 1:
            raise NonFiniteLossError(f"the model's outputs are not finite {where}; stopping")
        losses = criterion(outputs, targets)
        values = _loss_values(losses, device)
        if not math.isfinite(values["loss"]):
            parts = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise NonFiniteLossError(f"loss is {values['loss']} {where}; stopping ({parts})")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(losses["loss"]).backward()
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        else:
            losses["loss"].backward()
        # With max_norm inf this only measures. DDP has averaged the gradients, so every
        # process sees the same norm.
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm if clip_max_norm > 0 else math.inf)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            if not torch.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"the gradients are not finite {where} (loss {values['loss']:.4g}); stopping before the update"
                )
            optimizer.step()
        if torch.isfinite(grad_norm):
            norms.append(float(grad_norm))
        for k, v in values.items():
            sums[k] += v
        steps += 1
        bar.set_postfix(loss=f"{values['loss']:.3f}")
    if steps == 0:
        raise ValueError(
            "the training loader yielded no batch: the training set has fewer images than one batch per process"
        )
    stats = {k: v / steps for k, v in sums.items()}
    if norms:
        stats["grad_norm"] = sum(norms) / len(norms)
    stats["lr"] = optimizer.param_groups[0]["lr"]
    return stats


def _coco_detections(
    image_id: int, result: Dict[str, Tensor], class_ids: Optional[Sequence[int]] = None
) -> List[Dict[str, Any]]:
    """Post-processed boxes (xyxy, absolute) of one image -> COCO result dicts (bbox xywh);
    class_ids: the category id of each class (smca.data.class_ids; None: the class index is
    the id)."""
    boxes = result["boxes"].detach().float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    labels = result["labels"].tolist()
    if class_ids is not None:
        labels = [class_ids[label] for label in labels]
    return [
        dict(image_id=image_id, category_id=int(label), bbox=[round(v, 3) for v in box], score=float(score))
        for box, label, score in zip(boxes.tolist(), labels, result["scores"].tolist())
    ]


def write_results(path: str, detections: List[Dict[str, Any]]) -> None:
    """Write COCO result dicts to `path` as COCO's results JSON (a list of {image_id,
    category_id, bbox [x, y, w, h] in pixels, score}), what COCO's evaluation server and
    pycocotools' loadRes read. Atomic (smca.run_files.write_atomically), so the file is the old
    one or the whole new one; its folder is made when missing. Raises OutputError (an OSError)
    naming the file when it cannot be written."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as err:
        raise OutputError(f"--results_file {path}: cannot make its folder ({err.strerror or err})", path, err) from err
    write_text(path, json.dumps(detections))


def check_results_path(path: str) -> None:
    """OutputError before an evaluation (or a training run) whose results file could not be
    written: a folder."""
    if os.path.isdir(path):
        raise OutputError(
            f"--results_file {path} is a folder; expected a file name, such as {path}/detections.json", path
        )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    criterion: Optional[torch.nn.Module],
    postprocessor,
    data_loader: Iterable,
    device: torch.device,
    amp: str = "off",
    progress: bool = True,
    eval_backend: str = "auto",
    results_file: Optional[str] = None,
) -> Dict[str, Any]:
    """Losses and COCO box AP over data_loader (its dataset must have a pycocotools `coco`).

    postprocessor(outputs, orig_sizes (B, 2) (h, w)) gives per image dict(scores, labels
    (classes), boxes absolute xyxy in the original image); a dataset with `class_ids`
    (CocoDetection.set_classes) maps the classes to its category ids. Returns the mean losses
    (when a criterion is given) and, on the main process, "coco_eval_bbox": the 12 COCO
    statistics (COCO_STAT_NAMES), after printing COCO's summary.

    results_file: also write the detections there, before scoring them, as COCO's results
    JSON (write_results; the file's category ids), on the main process. A data set without
    any annotation (an image-info file such as COCO's image_info_test-dev2017.json) has
    nothing to score: no losses, no statistics, a line that says so; only the results file.
    Raises OutputError (an OSError) for a results_file that is a folder (before the model runs)
    or that cannot be written.
    """
    if results_file is not None:
        check_results_path(results_file)
    coco = data_loader.dataset.coco
    ground_truth = bool(coco.dataset.get("annotations"))
    class_ids = getattr(data_loader.dataset, "class_ids", None)
    model.eval()
    if criterion is not None:
        criterion.eval()
    sums: Dict[str, float] = defaultdict(float)
    steps = 0
    detections: Dict[int, List[Dict[str, Any]]] = {}
    bar = tqdm(data_loader, desc="eval", disable=not (progress and is_main_process()), leave=False, dynamic_ncols=True)
    for images, pixel_mask, targets in bar:
        images, pixel_mask, targets = _to_device(images, pixel_mask, targets, device)
        with autocast(device, amp):
            outputs = model(images, pixel_mask)
        outputs = _to_float32(outputs)
        if criterion is not None and ground_truth:
            for k, v in _loss_values(criterion(outputs, targets), device).items():
                sums[k] += v
            steps += 1
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        for target, result in zip(targets, postprocessor(outputs, orig_sizes)):
            image_id = int(target["image_id"])
            detections[image_id] = _coco_detections(image_id, result, class_ids)
    stats: Dict[str, Any] = {k: v / steps for k, v in sums.items()}
    # A DistributedSampler repeats a few images to even out the shards; the dict merge drops them.
    merged: Dict[int, List[Dict[str, Any]]] = {}
    for part in all_gather_object(detections):
        merged.update(part)
    if is_main_process():
        results = [d for image_id in sorted(merged) for d in merged[image_id]]
        if results_file is not None:
            write_results(results_file, results)
            print(f"{len(results)} detections on {len(merged)} images written to {results_file} (COCO results format)")
        if ground_truth:
            coco_stats = coco_evaluate(coco, results, sorted(merged), backend=eval_backend)
            stats["coco_eval_bbox"] = coco_stats.tolist()
        else:
            source = getattr(data_loader.dataset, "ann_file", "the annotation file")
            print(
                f"{source} has no annotations (an image-info file, as COCO test-dev's): nothing to score, no AP"
                + ("" if results_file else "; give --results_file to keep the detections")
            )
    return stats


def format_coco_summary(stats: Sequence[float]) -> str:
    """COCO's standard 12-line box summary, as pycocotools prints it."""
    rows = [
        (1, "0.50:0.95", "all", 100),
        (1, "0.50", "all", 100),
        (1, "0.75", "all", 100),
        (1, "0.50:0.95", "small", 100),
        (1, "0.50:0.95", "medium", 100),
        (1, "0.50:0.95", "large", 100),
        (0, "0.50:0.95", "all", 1),
        (0, "0.50:0.95", "all", 10),
        (0, "0.50:0.95", "all", 100),
        (0, "0.50:0.95", "small", 100),
        (0, "0.50:0.95", "medium", 100),
        (0, "0.50:0.95", "large", 100),
    ]
    lines = []
    for (is_ap, iou, area, max_dets), value in zip(rows, stats):
        title, kind = ("Average Precision", "(AP)") if is_ap else ("Average Recall", "(AR)")
        lines.append(f" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = {value:0.3f}")
    return "\n".join(lines)


def _no_results(coco_gt):
    """An empty pycocotools result set for coco_gt (its loadRes cannot build one from [])."""
    from pycocotools.coco import COCO

    results = COCO()
    results.dataset = dict(
        images=list(coco_gt.dataset["images"]), categories=list(coco_gt.dataset["categories"]), annotations=[]
    )
    results.createIndex()
    return results


def coco_evaluate(
    coco_gt, detections: List[Dict[str, Any]], image_ids: Sequence[int], backend: str = "auto", verbose: bool = True
) -> np.ndarray:
    """COCO box metrics of `detections` on the images `image_ids`; prints COCO's 12-line summary.

    coco_gt: a pycocotools COCO (its `.dataset` dict is read); detections: COCO result dicts
    (image_id, category_id, bbox [x, y, w, h] in pixels, score); backend: "faster_coco_eval",
    "pycocotools" or "auto" (faster_coco_eval when installed). Returns the 12 statistics
    (COCO_STAT_NAMES), float64, computed by COCOeval: -1 where a statistic has no ground truth
    (an area range without boxes; all twelve for images without any, or no images), else 0
    where nothing was detected. Detections outside image_ids and of categories not in coco_gt
    are ignored, as COCOeval ignores them.

    Raises ValueError for image ids (in image_ids or detections) that coco_gt does not have
    (pycocotools would fail an assert or count them as images without boxes) and for an
    unknown backend.
    """
    if backend == "auto":
        try:
            import faster_coco_eval  # noqa: F401

            backend = "faster_coco_eval"
        except ImportError:
            backend = "pycocotools"
    if backend not in ("faster_coco_eval", "pycocotools"):
        raise ValueError(f"backend: expected 'auto', 'faster_coco_eval' or 'pycocotools', got {backend!r}")
    image_ids = list(image_ids)
    known = set(coco_gt.getImgIds())
    for name, ids in (("image_ids", image_ids), ("detections", [d["image_id"] for d in detections])):
        unknown = sorted(set(ids) - known)
        if unknown:
            raise ValueError(
                f"{name}: image ids {unknown[:10]}{' ...' if len(unknown) > 10 else ''} are not in the ground truth "
                f"({len(known)} images)"
            )
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        gt = COCO(coco_gt.dataset)
        evaluator = COCOeval_faster(gt, gt.loadRes(detections), "bbox")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        stats = np.asarray(evaluator.stats[:12], dtype=np.float64)
    else:
        from pycocotools.cocoeval import COCOeval

        # pycocotools prints its progress and its own summary; ours (the same lines) follows.
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(coco_gt, coco_gt.loadRes(detections) if detections else _no_results(coco_gt), "bbox")
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = np.asarray(evaluator.stats[:12], dtype=np.float64)
    if verbose:
        print(format_coco_summary(stats))
    return stats
