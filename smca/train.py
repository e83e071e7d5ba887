"""Train or evaluate SMCA-DETR: `python -m smca.train` (console script `smca-train`).

    python -m smca.train --preset demo --coco_path DATA --output_dir OUT --epochs 10
    python -m smca.train --preset smca_r50 --coco_path /data/coco --output_dir OUT \\
        --backbone_weights resnet50.pth                      # the paper's single-scale run
    torchrun --nproc_per_node 8 -m smca.train --preset smca_ms_r50 ...   # DDP, one GPU each
    python -m smca.train --preset demo --coco_path DATA --resume OUT/checkpoint.pth --eval
    python -m smca.train --eval --resume smca_r50.pth --coco_path /data/coco   # a converted checkpoint
    python -m smca.train --finetune smca_r50.pth --coco_path MYDATA --output_dir OUT --epochs 12 \\
        --lr 1e-4 --lr_drop 8                       # a new run from a checkpoint's weights

DETR's arguments, plus --model, --attention_backend, --amp, --matmul_precision (TF32 on a GPU
unless "highest"), --max_size, --finetune, --preset (a
model from smca.config.PRESETS) and --schedule (a training schedule from smca.config.SCHEDULES;
default: the preset's own); explicit flags override both. num_classes
defaults to the data's largest category id + 1. --max_size caps the longer image side over
--min_sizes and --eval_size, as DETR's resize does (a note says when it overrides them).

With a checkpoint (--resume, --eval --resume, --finetune), every architecture field
(smca.checkpoint.ARCHITECTURE_FIELDS) and every loss and matching weight (LOSS_FIELDS) that no
flag, --preset or --schedule sets is the checkpoint's, with --resume also every training
setting (lr, sizes, batch size, ...: the run continues, or is evaluated, as it ran), so its
flags need not be repeated; one that is set must agree with the checkpoint (--resume)
or its weights must fit (--finetune). num_classes: --resume takes the checkpoint's (the data's
category ids must be below it), --finetune the data's as a new run does. --finetune starts a new
run (epoch 0, a fresh optimizer, schedule and step count) from the weights of a training or a
weights-only checkpoint (smca.convert's): every tensor that fits is loaded; the class head is
re-initialised where the number of classes differs and the query embeddings where --num_queries
does; any other key missing or of another shape is an error naming it. The checkpoint's backbone
weights win over --backbone_weights. A fine-tuning run writes ordinary checkpoints, continued
with --resume; a weights-only checkpoint cannot be --resume'd for training. A checkpoint is
enough on its own: --resume, --eval --resume and --finetune never read the backbone file its
config (or --backbone_weights) names.

Every epoch: train, evaluate on val (COCO's 12-line summary), append a JSON line to
OUTPUT_DIR/log.txt and atomically rewrite OUTPUT_DIR/checkpoint.pth (a checkpoint already there is
only continued, with --resume, never overwritten by a new run); the log's "step" counts
optimizer steps since the run began. --no_eval trains without evaluating, as does a data set
without a val set (no annotations/instances_val2017.json, or one listing no images; a note says
so); --eval needs one. A run locks OUTPUT_DIR for its life (smca.run_files: a second run into it
is refused; a killed run's lock goes with its process). Every file is written whole or not at
all: a write that fails (a full disk) stops the run with one error naming the file, the reason
and the checkpoint kept (its epoch), and leaves no temporary file. --resume continues from a
checkpoint, exactly with the same flags; the run's own training settings (lr, lr_backbone,
weight_decay, lr_drop, batch_size, seed, ...) apply from its first epoch, and a note lists those
that differ. Input errors (missing data, malformed annotations, a listed image file that is
missing or not an image, a checkpoint of another model, a training set smaller than one batch per
process, settings torch would refuse) stop the run before anything in OUTPUT_DIR is written. A
non-finite loss stops training (exit status 1), and an image that turns out damaged when read (a
truncated file) stops it (exit status 2) naming the file and image id; either leaves the last
checkpoint as it was.
"""

import argparse
import dataclasses
import errno
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
from smca_kernels.ops import BACKENDS

from .checkpoint import (
    CheckpointError,
    ARCHITECTURE_FIELDS,
    check_compatible,
    config_to_restore,
    is_weights_only,
    load_checkpoint,
    one_line,
    restore,
    rng_state,
    save_checkpoint,
    set_schedule,
    training_changes,
)
from .config import (
    AMP_MODES,
    MATMUL_PRECISIONS,
    BACKBONE_NORMS,
    BACKBONES,
    CLASSIFIERS,
    DYNAMIC_SCALES,
    MODELS,
    MODULATIONS,
    PRESETS,
    SCHEDULES,
    Config,
    fields_of,
    preset_values,
)
from .data import DatasetError, build_dataloader, build_dataset
from .data.transforms import capped_sizes_note
from .distributed import (
    all_gather_object, barrier, check_attention_backend, check_device, cleanup, init_distributed, is_main_process,
    seed_everything,
)
from .engine import COCO_STAT_NAMES, NonFiniteLossError, check_results_path, evaluate, train_one_epoch
from .run_files import OutputError, append_line, check_not_in_use, lock_output_dir, write_text

__all__ = ["get_args_parser", "build_config", "chosen_fields", "load_finetune_weights", "FinetuneReport",
           "set_matmul_precision", "main"]

PROG = "smca-train"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(PROG, description="Train or evaluate SMCA-DETR on a COCO-layout data set.")
    p.add_argument(
        "--preset", choices=sorted(PRESETS), help="a model (smca.config.PRESETS); flags override it"
    )
    p.add_argument(
        "--schedule",
        choices=sorted(SCHEDULES),
        help="a training schedule: lr, epochs, batch and image sizes (smca.config.SCHEDULES; default: the "
        "preset's own, PRESET_SCHEDULES, else smca_50ep); flags override it",
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODELS)
    g.add_argument("--backbone", choices=BACKBONES)
    g.add_argument("--backbone_weights", help="local torchvision ResNet state-dict file (no downloads)")
    g.add_argument(
        "--backbone_norm",
        choices=BACKBONE_NORMS,
        help="frozen: FrozenBatchNorm, stem and layer1 frozen (pretrained weights); batch: all trains (from scratch)",
    )
    g.add_argument("--hidden_dim", type=int)
    g.add_argument("--nheads", type=int)
    g.add_argument("--num_queries", type=int)
    g.add_argument("--enc_layers", type=int)
    g.add_argument("--dec_layers", type=int)
    g.add_argument("--dim_feedforward", type=int)
    g.add_argument("--dropout", type=float)
    g.add_argument(
        "--num_classes", type=int, help="default: the data's largest category id + 1 (--resume: the checkpoint's)"
    )
    g.add_argument("--modulation", choices=MODULATIONS)
    g.add_argument(
        "--dynamic_scale",
        choices=DYNAMIC_SCALES,
        help="the Gaussian's scale, as the paper's code: type1 constant, type2 per head, type3 per head and axis",
    )
    g.add_argument("--beta", type=float, help="bandwidth of the Gaussian prior: precision = scale / sqrt(beta)")
    g.add_argument("--attention_backend", choices=BACKENDS)
    g.add_argument(
        "--no_aux_loss",
        dest="aux_loss",
        action="store_const",
        const=False,
        help="no losses on intermediate decoder layers",
    )
    g.add_argument(
        "--classifier",
        choices=CLASSIFIERS,
        help="focal: sigmoid logits and focal loss (SMCA); softmax: a no-object class and cross-entropy (DETR)",
    )
    g = p.add_argument_group("loss and matching")
    g.add_argument("--eos_coef", type=float, help="weight of the no-object class (softmax classifier)")
    for name in ("cls_loss_coef", "bbox_loss_coef", "giou_loss_coef", "set_cost_class", "set_cost_bbox", "set_cost_giou"):
        g.add_argument(f"--{name}", type=float)
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float)
    g.add_argument("--lr_backbone", type=float)
    g.add_argument("--weight_decay", type=float)
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr_drop", type=int, help="multiply the learning rates by 0.1 every lr_drop epochs")
    g.add_argument("--batch_size", type=int, help="images per process")
    g.add_argument("--clip_max_norm", type=float, help="gradient clipping max norm (0: off)")
    g.add_argument("--seed", type=int)
    g.add_argument("--num_workers", type=int)
    g.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    g.add_argument("--amp", choices=AMP_MODES, help="mixed precision of the forward pass")
    g.add_argument(
        "--matmul_precision",
        choices=MATMUL_PRECISIONS,
        help="float32 matrix products on a GPU, as torch.set_float32_matmul_precision (the smca kernels follow it): "
        "high (default) multiplies in TF32 on tensor cores (Ampere and later), as cuDNN's convolutions already do by "
        "default, several times faster with a ~1e-3 relative error per product that training does not feel; "
        "medium: the same as high on a GPU; highest keeps IEEE float32 (e.g. to compare with a run made "
        "without TF32). No effect on the CPU",
    )
    g = p.add_argument_group("data")
    g.add_argument("--coco_path", help="COCO-layout root: train2017/, val2017/, annotations/instances_*2017.json")
    g.add_argument(
        "--max_size",
        type=int,
        help="cap on the longer image side; as in DETR it wins over --min_sizes and --eval_size, so it alone "
        "shrinks the images",
    )
    g.add_argument("--min_sizes", type=int, nargs="+", help="training shorter sides (longer side capped at --max_size)")
    g.add_argument("--eval_size", type=int, help="evaluation shorter side (longer side capped at --max_size)")
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", help="where to write log.txt and checkpoint.pth (nothing is saved without it)")
    start = g.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        help="checkpoint to continue from (with --eval: to evaluate; a weights-only one too); this run's "
        "training settings apply (a note lists those that differ from the checkpoint's); model flags left "
        "out are the checkpoint's, those given must match it",
    )
    start.add_argument(
        "--finetune",
        metavar="CKPT",
        help="start a new run (epoch 0, fresh optimizer and schedule) from the weights of an smca checkpoint "
        "(training or weights-only, e.g. smca.convert's); model flags left out are the checkpoint's, "
        "num_classes the data's; the class head (another class count) and the queries (another "
        "--num_queries) are re-initialised",
    )
    g.add_argument("--eval", action="store_true", help="only evaluate on val2017 and print COCO's summary")
    g.add_argument(
        "--results_file",
        metavar="FILE",
        help="also write the detections on val2017 to FILE as COCO's results JSON (image_id, category_id as the "
        "annotation file's, bbox [x, y, w, h] in pixels, score): a COCO test-dev submission or another scorer's "
        "input; rewritten atomically by every evaluation; an image-info file without annotations (test-dev's) "
        "is not scored, only written",
    )
    g.add_argument(
        "--no_eval",
        action="store_true",
        help="train without evaluating (no val2017 needed; a data set without one trains so too, with a "
        "note); checkpoints and log.txt are written as usual",
    )
    g.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard scalars to OUTPUT_DIR/tensorboard: each loss term, lr, COCO AP, per epoch",
    )
    g.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bar")
    return p


def set_matmul_precision(precision: str, device: torch.device) -> None:
    """torch.set_float32_matmul_precision(precision) for a run on a CUDA `device` (PyTorch's
    matmuls and the smca kernels then multiply float32 in TF32 unless it is "highest"); a CPU run
    is left as it is."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision(precision)


def _chosen_values(args: argparse.Namespace) -> Dict:
    """The preset's values, overridden by every flag that was given: the Config fields the user chose."""
    values = preset_values(args.preset, args.schedule)
    # Every Config field that has a flag; a flag left out (None) keeps the preset's value.
    for field in dataclasses.fields(Config):
        if getattr(args, field.name, None) is not None:
            values[field.name] = getattr(args, field.name)
    return values


def build_config(args: argparse.Namespace) -> Config:
    """The preset's values, overridden by every flag that was given; Config's defaults for the rest."""
    return Config(**_chosen_values(args))


def chosen_fields(args: argparse.Namespace) -> Set[str]:
    """Names of the Config fields set by a flag or by --preset; the others are Config's defaults,
    which a checkpoint's architecture fields replace (_take_architecture)."""
    return set(_chosen_values(args))


def _set_num_classes(
    cfg: Config, given: Optional[str], categories: Dict[int, str], state: Optional[Dict] = None
) -> tuple[Dict[int, str], Optional[List[int]]]:
    """Set cfg.num_classes and which category id each class stands for (smca.data.class_ids:
    None, the ids themselves, as DETR's COCO head; or the data's ids in increasing order, for
    ids far beyond their count). Returns (the categories the run's checkpoints keep, from which
    smca.predict and a later --resume read the same classes back; the class ids).

    given: None (num_classes from the data), or where cfg.num_classes came from, for the errors:
    "--num_classes", "the checkpoint's num_classes". state: the checkpoint of --resume or
    --finetune. With --resume the classes keep the categories the checkpoint's stand for (its
    own categories; one saved without any: the ids themselves) and every category id of the
    data must be among them. With --finetune a note says so when the class head is kept (as
    many classes) while its classes stand for other category ids than in the checkpoint.
    Raises DatasetError.
    """
    from .data.coco import class_ids

    saved = dict((state or {}).get("categories") or {})
    if given is None:
        ids = class_ids(categories)
        cfg.num_classes = max(categories) + 1 if ids is None else len(ids)
    elif cfg.resume and not saved:
        ids = None  # a checkpoint that names no categories: its classes are the ids themselves
    else:
        try:
            ids = class_ids(saved if cfg.resume else categories, cfg.num_classes)
        except ValueError as err:
            raise DatasetError(f"{given} {cfg.num_classes}: {err}") from None
    outside = sorted(set(categories) - (set(range(cfg.num_classes)) if ids is None else set(ids)))
    if outside and ids is None:
        raise DatasetError(f"{given} {cfg.num_classes} is too small: the data has category id {outside[-1]}")
    if outside:
        raise DatasetError(
            f"{given} {cfg.num_classes}: the data's category ids {outside[:10]} are not among the {len(ids)} the "
            f"checkpoint's classes stand for ({ids[:10]}{' ...' if len(ids) > 10 else ''}); --resume continues "
            "with the checkpoint's categories: start a new run from its weights with --finetune instead"
        )
    if cfg.finetune and saved and state["config"].get("num_classes") == cfg.num_classes and is_main_process():
        try:
            before = class_ids(saved, cfg.num_classes) or list(range(cfg.num_classes))
        except ValueError:
            before = None
        after = ids or list(range(cfg.num_classes))
        if before is not None and before != after:
            changed = [f"class {i}: id {b} -> {a}" for i, (b, a) in enumerate(zip(before, after)) if a != b]
            print(
                f"{PROG}: note: --finetune {cfg.finetune}: its class head is kept ({cfg.num_classes} classes) but "
                f"its classes stand for other category ids here ({', '.join(changed[:5])}"
                f"{' ...' if len(changed) > 5 else ''}); they start from what was learnt for the checkpoint's",
                file=sys.stderr,
            )
    return (saved if cfg.resume and ids is not None else categories), ids


def _checkpoint_config(state: Dict, flag: str, path: str) -> Config:
    """The Config a checkpoint was written with (defaults for fields added since)."""
    try:
        return Config.from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{flag} {path}: the checkpoint's config cannot be read ({err})") from err


# The loss and matching settings: a fine-tuning run keeps the checkpoint's recipe for them (a
# converted DETR checkpoint: DETR's weights 1/5/2 and eos_coef) unless a flag or preset sets them.
LOSS_FIELDS = fields_of("loss")


def _take_architecture(
    cfg: Config, chosen: Set[str], saved: Config, flag: str, path: str, keep=(), fields=ARCHITECTURE_FIELDS
) -> Config:
    """cfg with every one of `fields` (default: ARCHITECTURE_FIELDS) that is not in `chosen` (no
    flag, no preset) nor in `keep` replaced by the checkpoint's (`saved`). Raises CheckpointError
    when the mix is not a valid Config (a flag that does not go with the checkpoint's other settings)."""
    taken = {k: getattr(saved, k) for k in fields if k not in chosen and k not in keep}
    try:
        return dataclasses.replace(cfg, **taken)
    except ValueError as err:
        shown = ", ".join(f"{k} {v!r}" for k, v in taken.items())
        raise CheckpointError(
            f"{flag} {path}: this run's flags do not go with the checkpoint's ({shown}): {err}"
        ) from err


def _architecture_differences(saved: Config, cfg: Config) -> str:
    """"name: checkpoint X, run Y; ..." for the architecture fields (but num_classes and
    num_queries, which fine-tuning may change) where cfg differs from the checkpoint's config."""
    return "; ".join(
        f"{k}: checkpoint {getattr(saved, k)!r}, run {getattr(cfg, k)!r}"
        for k in ARCHITECTURE_FIELDS
        if getattr(saved, k) != getattr(cfg, k) and k not in ("num_classes", "num_queries")
    )


@dataclasses.dataclass
class FinetuneReport:
    """What load_finetune_weights did: the keys loaded from the checkpoint, the keys left at the
    model's initialisation, and a phrase for each re-initialised part."""

    loaded: List[str]
    reinitialised: List[str]
    notes: List[str]

    def line(self, path: str) -> str:
        done = f"re-initialised {', '.join(self.notes)}" if self.notes else "nothing re-initialised"
        return f"{PROG}: fine-tuning from {path}: loaded {len(self.loaded)} tensors; {done}"


def _listed(keys: List[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_finetune_weights(model: torch.nn.Module, state: Dict, path: str = "checkpoint") -> FinetuneReport:
    """Load the weights of checkpoint `state` (load_checkpoint's dict) that fit the freshly built
    `model`. The class head (class_embed.*) keeps its fresh initialisation where its number of
    classes (rows) differs, the query embeddings (query_embed.weight) where the number of queries
    does; any other key missing on either side or of another shape is a CheckpointError naming the
    keys (another architecture). model: the bare model (no DDP wrapper)."""
    weights, ours = state["model"], model.state_dict()
    saved_classifier = state.get("config", {}).get("classifier", "focal")  # absent: before softmax existed

    def classes(rows: int, classifier: str) -> int:  # softmax: one row more, "no object"
        return rows - (classifier == "softmax")

    loaded, reinitialised, notes = [], [], []
    missing, unexpected, other_shape = [], sorted(set(weights) - set(ours)), []
    for key, tensor in ours.items():
        if key not in weights:
            missing.append(key)
        elif weights[key].shape == tensor.shape:
            loaded.append(key)
        elif key.startswith("class_embed.") and weights[key].shape[1:] == tensor.shape[1:]:
            reinitialised.append(key)
            if key == "class_embed.weight":
                change = f"; classifier {saved_classifier} -> {model.classifier}"
                notes.append(
                    f"class_embed (checkpoint {classes(weights[key].shape[0], saved_classifier)} classes, "
                    f"run {classes(tensor.shape[0], model.classifier)}"
                    f"{change if saved_classifier != model.classifier else ''})"
                )
        elif key == "query_embed.weight" and weights[key].shape[1:] == tensor.shape[1:]:
            reinitialised.append(key)
            notes.append(f"query_embed ({weights[key].shape[0]} -> {tensor.shape[0]} queries)")
        else:
            other_shape.append(f"{key} (checkpoint {tuple(weights[key].shape)}, run {tuple(tensor.shape)})")
    if missing or unexpected or other_shape:
        problems = [
            f"{what}: {_listed(keys)}"
            for what, keys in (
                ("of another shape", other_shape),
                ("missing from the checkpoint", missing),
                ("not in this model", unexpected),
            )
            if keys
        ]
        raise CheckpointError(
            f"--finetune {path}: its weights do not fit this run's model (another architecture; leave out the "
            "model flags to take the checkpoint's): " + "; ".join(problems)
        )
    model.load_state_dict({k: weights[k] if k in loaded else v for k, v in ours.items()})
    return FinetuneReport(loaded, reinitialised, notes)


def _steps_per_epoch(num_images: int, batch_size: int, world_size: int) -> int:
    """Batches per process and epoch: DistributedSampler's ceil(num_images / world_size) images
    (all of them for one process), in full batches (drop_last)."""
    return math.ceil(num_images / world_size) // batch_size


def _restored_step(state: Dict, start_epoch: int, num_images: int, main_process: bool) -> int:
    """The optimizer steps a checkpoint was written after. A checkpoint from before they were kept
    has none: estimated as start_epoch epochs at its own batch size and number of processes."""
    if state.get("step") is not None:
        return int(state["step"])
    batch_size, processes = state["config"]["batch_size"], len(state["rng"])
    step = start_epoch * _steps_per_epoch(num_images, batch_size, processes)
    if main_process:
        print(
            f"{PROG}: note: the checkpoint does not record its step count (written by an older smca); "
            f"estimated as {step}: {start_epoch} epochs of {num_images} images at batch size {batch_size} "
            f"on {processes} process{'es' if processes > 1 else ''}",
            file=sys.stderr,
        )
    return step


def _trim_log(path: str, start_epoch: int) -> None:
    """Keep only the log lines of epochs before start_epoch (a resumed run writes the rest again)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["epoch"] < start_epoch:
                keep.append(line)
        except (ValueError, KeyError, TypeError):  # a line cut short by a killed run
            pass
    if len(keep) != len(lines):
        write_text(path, "".join(keep))


class _TensorBoard:
    """Scalars to OUTPUT_DIR/tensorboard when TensorBoard is installed (a warning otherwise), one
    point per epoch (the x axis is the epoch): every train_* and test_* number of the log line
    (the loss and each weighted and unweighted loss term, class error, gradient norm), the COCO
    summary's twelve numbers as test_AP, test_AP50, ..., test_ARl, the learning rate of each
    param group (lr: the transformer's, lr_backbone: the backbone's) and step (optimizer steps).
    A resumed run first drops the points of the epochs it trains again (purge_step)."""

    # The log line's bookkeeping that is no curve.
    SKIPPED = ("epoch", "n_parameters")
    LR_TAGS = ("lr", "lr_backbone")  # SMCADETR.param_groups' order

    def __init__(self, output_dir: str, start_epoch: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print(f"{PROG}: warning: --tensorboard needs the tensorboard package; not logging to it", file=sys.stderr)
            self.writer = None
            return
        self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_epoch or None)

    def log(self, stats: Dict, epoch: int, lrs: Sequence[float] = ()) -> None:
        """stats: the epoch's log line; lrs: the lr of each param group during the epoch."""
        if self.writer is None:
            return
        for key, value in stats.items():
            if key == "train_lr" and lrs:
                continue  # the first param group's: "lr" below
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in self.SKIPPED:
                self.writer.add_scalar(key, value, epoch)
        for name, value in zip(COCO_STAT_NAMES, stats.get("test_coco_eval_bbox") or []):
            self.writer.add_scalar(f"test_{name}", value, epoch)
        for index, lr in enumerate(lrs):
            tag = self.LR_TAGS[index] if index < len(self.LR_TAGS) else f"lr_group{index}"
            self.writer.add_scalar(tag, lr, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _ap_line(coco_stats: Optional[List[float]]) -> str:
    if not coco_stats:
        return ""
    return ", ".join(f"{name} {value:.3f}" for name, value in zip(COCO_STAT_NAMES[:6], coco_stats[:6]))


def _check_no_work_is_overwritten(cfg: Config) -> None:
    """Training writes OUTPUT_DIR/checkpoint.pth: one there from an earlier run may only be
    continued (--resume with that file), never replaced by a run that starts elsewhere."""
    if cfg.eval or not cfg.output_dir:
        return
    existing = os.path.join(cfg.output_dir, "checkpoint.pth")
    if os.path.isfile(existing) and not (cfg.resume and os.path.samefile(cfg.resume, existing)):
        raise CheckpointError(
            f"--output_dir {cfg.output_dir} already holds {existing} from an earlier run, which this run "
            f"would overwrite: continue it with --resume {existing}, or give another --output_dir"
        )


def _validation_set(cfg: Config):
    """(the val split, None), or (None, why there is none) when training goes without evaluation:
    --no_eval, or a data set whose annotations/instances_val2017.json is absent, empty or lists no
    images. Raises DatasetError for a val set that is malformed, and for --eval without one."""
    if cfg.no_eval:
        return None, "--no_eval"
    ann_file = os.path.join(cfg.coco_path or "", "annotations", "instances_val2017.json")
    if cfg.coco_path and os.path.isdir(cfg.coco_path) and not os.path.exists(ann_file):
        why = f"there is no {ann_file}"
    else:
        try:
            return build_dataset("val", cfg), None
        except DatasetError:
            if not _lists_no_images(ann_file):
                raise
        why = f"{ann_file} lists no images"
    if cfg.eval:
        raise DatasetError(
            f"--eval: no validation set to evaluate on: {why}; evaluation reads COCO's val2017/ images and "
            "annotations/instances_val2017.json under --coco_path"
        )
    return None, why


def _lists_no_images(ann_file: str) -> bool:
    """True for an annotation file that is blank or whose "images" list is empty or absent."""
    try:
        with open(ann_file, encoding="utf-8-sig") as f:
            text = f.read()
        return not text.strip() or not json.loads(text).get("images")
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object: build_dataset says so
        return False


def _check_batches(cfg: Config, dataset_train, world_size: int) -> None:
    """DatasetError when the training set holds less than one batch per process: an epoch drops
    its last incomplete batch, as DETR's does, so nothing would train."""
    images = len(dataset_train)
    share = math.ceil(images / world_size)  # DistributedSampler's per process
    if share >= cfg.batch_size:
        return
    where = getattr(dataset_train, "ann_file", "the training set")
    if world_size == 1:
        raise DatasetError(
            f"--batch_size {cfg.batch_size}: {where} lists {images} training image{'s' * (images != 1)}, fewer than "
            f"one batch (an epoch drops its last incomplete batch): give --batch_size {images} or less, or more images"
        )
    raise DatasetError(
        f"--batch_size {cfg.batch_size} on each of {world_size} processes: {where} lists {images} training "
        f"image{'s' * (images != 1)}, {share} per process, fewer than one batch (an epoch drops its last incomplete "
        f"batch): give --batch_size {share} or less, fewer processes, or more images"
    )


def _check_queries(cfg: Config, dataset_train) -> None:
    """A warning when a training image has more objects than the model has queries: the matching
    pairs each query with one object, so in that image some objects are never learnt (allowed, as
    in DETR: a crowded image or two need not set the query count)."""
    objects = {
        image_id: sum(1 for a in anns if not a["iscrowd"] and a["bbox"][2] > 0 and a["bbox"][3] > 0)
        for image_id, anns in dataset_train.coco.imgToAnns.items()
    }
    crowded = sorted((n, image_id) for image_id, n in objects.items() if n > cfg.num_queries)
    if crowded and is_main_process():
        most, image_id = crowded[-1]
        name = dataset_train.coco.imgs[image_id]["file_name"]
        print(
            f"{PROG}: warning: --num_queries {cfg.num_queries}: {len(crowded)} image{'s' * (len(crowded) != 1)} of "
            f"{dataset_train.ann_file} have more objects than queries, which detect one object each (the most: "
            f"image id {image_id}, {name!r}, {most} objects); their objects beyond {cfg.num_queries} are never "
            f"learnt: give --num_queries {most} or more to learn them all",
            file=sys.stderr,
        )


def _check_output_dir_free(cfg: Config, main_process: bool) -> None:
    """OutputError on every process when another run holds cfg.output_dir (rank 0 looks, as it
    alone writes there, and tells the others), found before anything is written."""
    busy = None
    if main_process and cfg.output_dir:
        try:
            check_not_in_use(cfg.output_dir)
        except OutputError as err:
            busy = str(err)
    busy = all_gather_object(busy)[0]
    if busy is not None:
        raise OutputError(busy, cfg.output_dir)


def _lock_run(cfg: Config, main_process: bool):
    """Lock cfg.output_dir for this run (rank 0 only writes, so it alone locks) and check, under
    the lock, that no earlier run's checkpoint would be replaced. Every process gets rank 0's
    verdict, so that all stop together. Returns the lock (rank 0) or None."""
    lock, refusal = None, None
    if main_process and cfg.output_dir:
        try:
            lock = lock_output_dir(cfg.output_dir)
            _check_no_work_is_overwritten(cfg)  # again: another run may have finished meanwhile
        except (OutputError, CheckpointError) as err:
            if lock is not None:
                lock.release()
            refusal = err
    verdict = all_gather_object(None if refusal is None else str(refusal))[0]
    if refusal is not None:
        raise refusal
    if verdict is not None:
        raise OutputError(verdict, cfg.output_dir)
    return lock


def _kept(checkpoint_path: Optional[str], epoch: Optional[int], good: str = "") -> Tuple[str, bool]:
    """Which checkpoint a run that stops leaves, for its error message, and whether there is one
    to --resume from."""
    if checkpoint_path and epoch is not None and os.path.isfile(checkpoint_path):
        return f"The last {good}checkpoint, {checkpoint_path}, is left as it was (epoch {epoch})", True
    return "No checkpoint was written", False


def _write_remedy(err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the folder writable"
    return "fix the cause"


def _error_text(err: Exception) -> str:
    """The error's own message: re-raised from a DataLoader worker process, it comes after the
    worker's traceback."""
    text = str(err).rstrip()
    marker = f"{type(err).__name__}: "
    if text.startswith(f"Caught {type(err).__name__} in DataLoader worker") and marker in text:
        text = text.rsplit(marker, 1)[1]
    return one_line(text)


def run(cfg: Config, chosen: Optional[Set[str]] = None) -> None:
    """Train or evaluate as cfg says: everything main does after parsing.

    chosen: the Config fields the user set (main: by flag, --preset or --schedule); with a
    checkpoint (resume, finetune) the architecture fields not among them are the checkpoint's.
    None: every field that is not None (num_classes None: from the data, or the checkpoint
    resumed). Raises DatasetError, CheckpointError, NonFiniteLossError or OutputError (a file
    that cannot be written, an output folder in use by another run).
    """
    from .models import build_model  # the model stack is heavy; `--help` should not wait for it

    dist_info = init_distributed(cfg.device)
    device = dist_info.device
    main_process = is_main_process()
    # The checkpoint's settings first: the data's sizes, the seed and the loss recipe of a
    # resumed run are its own unless given (--eval then measures the run as it evaluated itself).
    if chosen is None:
        chosen = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) is not None}
    num_classes_from = "--num_classes" if cfg.num_classes is not None and "num_classes" in chosen else None
    state = finetune = None
    if cfg.resume:
        state = load_checkpoint(cfg.resume, flag="--resume")
        if is_weights_only(state) and not cfg.eval:
            origin = f" (converted from {state['converted_from']})" if state.get("converted_from") else ""
            raise CheckpointError(
                f"--resume {cfg.resume}: the checkpoint holds weights only{origin}, no optimizer, schedule or "
                f"epoch to continue training from: start a new training run from its weights with --finetune "
                f"{cfg.resume} (or evaluate it with --eval --resume)"
            )
        saved = _checkpoint_config(state, "--resume", cfg.resume)
        # Settings not given are the checkpoint's own, so that the same flags continue the run it
        # was (a fine-tuned run's loss recipe, the demo's sizes) and --eval measures it as it ran.
        cfg = _take_architecture(
            cfg, chosen, saved, "--resume", cfg.resume, fields=ARCHITECTURE_FIELDS + LOSS_FIELDS + fields_of("training")
        )
        num_classes_from = num_classes_from or "the checkpoint's num_classes"
    elif cfg.finetune:
        finetune = cfg.finetune
        state = load_checkpoint(finetune, flag="--finetune")
        saved = _checkpoint_config(state, "--finetune", finetune)
        # num_classes is the data's (or --num_classes), as for any new run.
        cfg = _take_architecture(
            cfg, chosen, saved, "--finetune", finetune, keep=("num_classes",), fields=ARCHITECTURE_FIELDS + LOSS_FIELDS
        )
    set_matmul_precision(cfg.matmul_precision, device)
    seed_everything((cfg.seed + dist_info.rank) % 2**32)

    # Check every input before anything is written.
    dataset_val, no_val = _validation_set(cfg)
    if dataset_val is None and cfg.results_file is not None:
        raise DatasetError(
            f"--results_file {cfg.results_file}: no evaluation to take detections from ({no_val}); give a "
            "validation set under --coco_path, or leave out --results_file"
        )
    dataset_train = None if cfg.eval else build_dataset("train", cfg)
    if dataset_val is None and not cfg.no_eval and main_process:
        print(f"{PROG}: note: {no_val}: training without evaluation (--no_eval does so on purpose)", file=sys.stderr)
    categories = (dataset_train or dataset_val).categories
    note = capped_sizes_note((cfg.eval_size,) + (() if cfg.eval else cfg.min_sizes), cfg.max_size)
    if note and main_process:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    categories, classes = _set_num_classes(cfg, num_classes_from, categories, state)
    for dataset in (dataset_train, dataset_val):
        if dataset is not None:
            dataset.set_classes(classes, cfg.num_classes)
    if cfg.resume:
        check_compatible(state, cfg, cfg.resume)
    _check_output_dir_free(cfg, main_process)  # a live run's checkpoint is not an earlier run's
    _check_no_work_is_overwritten(cfg)
    if cfg.results_file is not None:
        check_results_path(cfg.results_file)  # not at the first evaluation, an epoch later
    if not cfg.eval:
        _check_batches(cfg, dataset_train, dist_info.world_size)
        _check_queries(cfg, dataset_train)
        if cfg.lr_drop >= cfg.epochs and main_process:
            print(
                f"{PROG}: note: --lr_drop {cfg.lr_drop} is not below --epochs {cfg.epochs}: the learning rate "
                "never drops (it is multiplied by 0.1 every lr_drop epochs)",
                file=sys.stderr,
            )

    if finetune:
        # Every weight comes from the checkpoint (a missing one is an error), the backbone's too.
        if cfg.backbone_weights is not None and main_process:
            print(
                f"{PROG}: note: --backbone_weights {cfg.backbone_weights} is not used: the backbone's weights "
                f"come from --finetune {finetune}",
                file=sys.stderr,
            )
        model, criterion, postprocessor = build_model(config_to_restore(cfg))
        differ = _architecture_differences(saved, cfg)
        try:
            report = load_finetune_weights(model, state, finetune)
        except CheckpointError as err:
            if differ:
                raise CheckpointError(f"{err}. Settings given that differ from the checkpoint's: {differ}") from None
            raise
        if main_process:
            print(report.line(finetune))
            if differ:
                print(
                    f"{PROG}: note: fine-tuning with model settings other than the checkpoint's: {differ}",
                    file=sys.stderr,
                )
        state = None  # a new run: no optimizer, schedule, step or generators from the checkpoint
    else:
        # With --resume the checkpoint's weights replace the pretrained backbone's: its file is not
        # read (it may be gone, or on another machine).
        model, criterion, postprocessor = build_model(config_to_restore(cfg) if state is not None else cfg)
    model.to(device)
    criterion.to(device)
    model_without_ddp = model
    if dist_info.distributed:
        if cfg.backbone_norm == "batch" and device.type == "cuda":
            # Trainable BatchNorm should see the whole batch, not each process's share (SyncBatchNorm
            # runs on GPUs only: CPU processes keep per-process statistics).
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [dist_info.local_rank] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    loader_val = None if dataset_val is None else build_dataloader(
        dataset_val, cfg.batch_size, cfg.num_workers, train=False, distributed=dist_info.distributed
    )
    progress = cfg.progress
    output_dir = cfg.output_dir if cfg.output_dir and main_process else None

    if cfg.eval:
        if state is not None:
            restore(state, model_without_ddp, rank=None)
        lock = _lock_run(cfg, main_process)
        try:
            stats = evaluate(
                model, criterion, postprocessor, loader_val, device, cfg.amp, progress, results_file=cfg.results_file
            )
            if output_dir:
                eval_stats = {f"test_{k}": v for k, v in stats.items()}
                write_text(os.path.join(output_dir, "eval.json"), json.dumps(eval_stats))
        finally:
            if lock is not None:
                lock.release()
        return

    loader_train = build_dataloader(
        dataset_train, cfg.batch_size, cfg.num_workers, train=True, distributed=dist_info.distributed, seed=cfg.seed
    )
    optimizer = torch.optim.AdamW(
        model_without_ddp.param_groups(cfg.lr_backbone), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_drop)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    start_epoch = 0
    step = 0  # optimizer steps taken so far, over every batch size the run had
    if state is not None:
        # This run's settings win over the checkpoint's (its config.json and checkpoints record them).
        run_schedule = [(group["lr"], group["weight_decay"]) for group in optimizer.param_groups]
        same_seed = state["config"].get("seed") == cfg.seed
        start_epoch = restore(
            state,
            model_without_ddp,
            optimizer,
            lr_scheduler,
            scaler,
            dist_info.rank if same_seed else None,
            dist_info.world_size,
        )
        set_schedule(optimizer, lr_scheduler, run_schedule, cfg.lr_drop)
        step = _restored_step(state, start_epoch, len(dataset_train), main_process)
        changes = training_changes(state, cfg)
        if changes and main_process:
            print(
                f"{PROG}: note: resuming with settings that differ from the checkpoint's; they apply from epoch "
                f"{start_epoch} on: " + "; ".join(changes),
                file=sys.stderr,
            )
        if not same_seed and main_process:
            print(
                f"{PROG}: note: with seed {cfg.seed} the random generators restart from it instead of continuing "
                "the checkpoint's (give the checkpoint's seed for an exact continuation)",
                file=sys.stderr,
            )
        elif dist_info.world_size != len(state["rng"]) and main_process:
            print(
                f"{PROG}: note: the checkpoint was written by {len(state['rng'])} processes, this run has "
                f"{dist_info.world_size}: random generators start afresh",
                file=sys.stderr,
            )
    del state

    checkpoint_path = os.path.join(cfg.output_dir, "checkpoint.pth") if cfg.output_dir else None
    # The epoch of the checkpoint in OUTPUT_DIR, for the message of a run that stops: the one
    # resumed (only a resume may find one there), then each one written.
    saved_epoch = start_epoch - 1 if cfg.resume and start_epoch > 0 else None
    tensorboard = None
    lock = _lock_run(cfg, main_process)
    try:
        if output_dir:
            log_path = os.path.join(output_dir, "log.txt")
            _trim_log(log_path, start_epoch)
            write_text(os.path.join(output_dir, "config.json"), json.dumps(cfg.to_dict(), indent=1))
            if cfg.tensorboard:
                tensorboard = _TensorBoard(output_dir, start_epoch)
        if main_process:
            todo = (
                f"epochs {start_epoch}..{cfg.epochs - 1}"
                if start_epoch < cfg.epochs
                else f"nothing to train ({start_epoch} epochs done, --epochs {cfg.epochs})"
            )
            print(
                f"{PROG}: {cfg.model} ({n_parameters / 1e6:.2f}M trainable parameters), "
                f"{len(dataset_train)} training images, {todo}, device {device}"
            )
            if cfg.lr_backbone <= 0 and cfg.backbone_weights is None and not cfg.resume and not finetune:
                print(
                    f"{PROG}: warning: lr_backbone {cfg.lr_backbone} keeps the backbone frozen at random weights; "
                    "give --backbone_weights (smca.pretrain_backbone makes some) or a positive --lr_backbone",
                    file=sys.stderr,
                )
        for epoch in range(start_epoch, cfg.epochs):
            start = time.time()
            if dist_info.distributed:
                loader_train.sampler.set_epoch(epoch)
            lrs = [group["lr"] for group in optimizer.param_groups]  # this epoch's, before the scheduler steps
            train_stats = train_one_epoch(
                model, criterion, loader_train, optimizer, device, epoch, cfg.clip_max_norm, cfg.amp, scaler, progress
            )
            step += len(loader_train)  # train_one_epoch takes one optimizer step per batch
            lr_scheduler.step()
            test_stats = {} if loader_val is None else evaluate(
                model, criterion, postprocessor, loader_val, device, cfg.amp, progress, results_file=cfg.results_file
            )
            log = {
                **{f"train_{k}": v for k, v in train_stats.items()},
                **{f"test_{k}": v for k, v in test_stats.items()},
                "epoch": epoch,
                "step": step,
                "n_parameters": n_parameters,
                "epoch_time": time.time() - start,
            }
            # The checkpoint is the last thing of an epoch: the generators' state it keeps is the
            # one the next epoch starts from. The log line goes first; a resume drops it again
            # if the run stopped before its checkpoint.
            rng_states = all_gather_object(rng_state())
            if output_dir:
                append_line(log_path, json.dumps(log))
                if tensorboard is not None:
                    tensorboard.log(log, epoch, lrs)
                save_checkpoint(
                    checkpoint_path,
                    model=model_without_ddp,
                    optimizer=optimizer,
                    lr_scheduler=lr_scheduler,
                    epoch=epoch,
                    cfg=cfg,
                    step=step,
                    scaler=scaler,
                    categories=categories,
                    rng_states=rng_states,
                )
            saved_epoch = epoch
            if main_process:
                parts = [f"loss {train_stats['loss']:.4f}", _ap_line(test_stats.get("coco_eval_bbox"))]
                print(f"epoch {epoch}: " + ", ".join(p for p in parts if p) + f", {log['epoch_time']:.1f} s")
            barrier()
    except NonFiniteLossError as err:
        kept, resumable = _kept(checkpoint_path, saved_epoch, "good ")
        again = f"continue from it with --resume {checkpoint_path}" if resumable else "start again"
        raise NonFiniteLossError(
            f"{err}. {kept}: {again} with a lower --lr (or --amp off, if it was fp16)"
        ) from None
    except DatasetError as err:  # an image that only decoding shows damaged (smca.data.coco)
        kept, resumable = _kept(checkpoint_path, saved_epoch)
        if resumable:
            kept += f": fix the file (or take it out of the annotations), then continue with --resume {checkpoint_path}"
        raise DatasetError(f"{_error_text(err)}. {kept}") from None
    except OSError as err:  # a file that cannot be written (OutputError): a full disk, a quota, permissions
        kept, resumable = _kept(checkpoint_path, saved_epoch)
        remedy = _write_remedy(err)
        then = f"continue with --resume {checkpoint_path}" if resumable else "start the run again"
        raise OutputError(f"{err}. {kept}: {remedy}, then {then}", getattr(err, "path", None)) from None
    finally:
        if tensorboard is not None:
            tensorboard.close()
        if lock is not None:
            lock.release()


def main(argv: Optional[List[str]] = None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.finetune and args.eval:
        parser.error(f"--finetune starts a training run; to evaluate a checkpoint give --eval --resume {args.finetune}")
    try:
        cfg = build_config(args)
    except ValueError as err:
        parser.error(str(err))
    try:
        check_attention_backend(cfg.attention_backend, check_device(cfg.device))
    except ValueError as err:
        parser.error(str(err))
    try:
        run(cfg, chosen_fields(args))
    except (DatasetError, CheckpointError, OSError) as err:  # OSError: OutputError, a file that cannot be written
        parser.exit(2, f"{PROG}: error: {_error_text(err)}\n")
    except NonFiniteLossError as err:
        parser.exit(1, f"{PROG}: error: {_error_text(err)}\n")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
