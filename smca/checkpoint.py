"""Checkpoints: atomic writes and an exact resume.

A checkpoint is a dict saved with torch.save and read back with weights_only=True, so it holds
only tensors and plain data:
    format, epoch (the last finished epoch), step (optimizer steps taken up to the end of that
    epoch, over every batch size the run had; None in checkpoints written before it was kept),
    model, optimizer, lr_scheduler, scaler (or None), rng (per process rank: python, numpy,
    torch and, when CUDA is in use, cuda generator states), config (Config.to_dict(): a plain
    dict, never a pickled object), categories ({id: name}).
A weights-only checkpoint (save_weights: smca.convert's output) has epoch, step, optimizer,
lr_scheduler and scaler None, no rng states, and converted_from naming its origin; it serves
prediction, evaluation and fine-tuning, not --resume of training.
It is written to a temporary file in the same directory and moved over the old one with
os.replace, so a crash or a failed write (a full disk) while saving leaves the previous
checkpoint intact and no temporary file (smca.run_files.write_atomically).

Resuming restores every generator, so on CPU (num_workers 0) a run stopped after epoch k and
resumed ends with the same weights, bit for bit, as a run straight through. A resumed run's own
settings win over the checkpoint's: set_schedule applies its lr, lr_backbone, weight_decay and
lr_drop to the restored optimizer and scheduler, and training_changes lists the settings that
differ (architecture fields must agree: check_compatible).

A checkpoint is enough on its own: every model that receives a checkpoint's weights (predict,
--eval --resume, --resume, --finetune) is built from config_to_restore(cfg), which does not read
the pretrained backbone file (backbone_weights) the config names, so a checkpoint works from any
folder and on another machine.
"""

import dataclasses
import os
import random
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .config import fields_of
from .run_files import write_atomically

__all__ = [
    "CheckpointError",
    "ARCHITECTURE_FIELDS",
    "rng_state",
    "save_atomically",
    "save_checkpoint",
    "save_weights",
    "is_weights_only",
    "load_checkpoint",
    "one_line",
    "check_compatible",
    "config_to_restore",
    "training_changes",
    "restore",
    "set_schedule",
]

FORMAT = "smca-checkpoint-1"
# Config fields a checkpoint must agree on with a run (they shape the weights or what they
# compute), and those a resumed run may change (each applies from its first epoch on): the
# fields' kinds in smca.config. The others are where and how the run executes, or epochs (the
# run's length, which a resume usually extends).
ARCHITECTURE_FIELDS = fields_of("architecture")
TRAINING_FIELDS = fields_of("training") + fields_of("loss")


_CONVERT_HINT = (
    "A checkpoint saved by SMCA-DETR's or DETR's main.py is converted first: "
    "python -m smca.convert --source {smca-detr,detr} --input FILE --output OUT.pth"
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or of another model or configuration."""


def rng_state() -> Dict[str, Any]:
    """Every generator a training step draws from, as plain data and tensors."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = dict(
        python=random.getstate(),
        numpy=dict(
            keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss), gauss=float(gauss)
        ),
        torch=torch.get_rng_state(),
    )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomically(obj: Any, path: str) -> None:
    """torch.save(obj) to `path` so that a crash leaves the old file or the new one, never half
    of one: a temporary file beside it, flushed to disk, then renamed over it. Raises
    smca.run_files.OutputError naming `path` and the reason (e.g. "No space left on device")
    when it cannot be written; the old file is then left as it was, and no temporary file."""
    write_atomically(path, lambda f: torch.save(obj, f))


def save_checkpoint(
    path: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    epoch: int,
    cfg,
    step: Optional[int] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    categories: Optional[Dict[int, str]] = None,
    rng_states: Optional[List[Dict[str, Any]]] = None,
) -> None:
    """Write the training state after `epoch` to `path` atomically (temporary file + os.replace).

    model: the bare model (not the DDP wrapper), so that the keys carry no "module." prefix.
    step: optimizer steps taken up to the end of `epoch`, from the run's start.
    rng_states: rng_state() of every process, by rank (default: this process's only).
    """
    state = dict(
        format=FORMAT,
        epoch=int(epoch),
        step=None if step is None else int(step),
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        lr_scheduler=lr_scheduler.state_dict(),
        scaler=scaler.state_dict() if scaler is not None else None,
        rng=rng_states if rng_states is not None else [rng_state()],
        config=cfg.to_dict(),
        categories=dict(categories or {}),
    )
    save_atomically(state, path)


def save_weights(
    path: str, model: torch.nn.Module, cfg, categories: Dict[int, str], converted_from: Optional[str] = None
) -> None:
    """Write a weights-only checkpoint (no training state) to `path` atomically: what
    smca.convert writes; load_checkpoint reads it. converted_from: the origin, for people."""
    state = dict(
        format=FORMAT,
        epoch=None,
        step=None,
        model=model.state_dict(),
        optimizer=None,
        lr_scheduler=None,
        scaler=None,
        rng=[],
        config=cfg.to_dict(),
        categories=dict(categories),
        converted_from=converted_from,
    )
    save_atomically(state, path)


def is_weights_only(state: Dict[str, Any]) -> bool:
    """True for a checkpoint without training state (save_weights), which --resume cannot continue."""
    return state.get("optimizer") is None


_TERMINAL_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b")
# torch.load(weights_only=True)'s refusal of a pickled class: "Unsupported global: GLOBAL argparse.Namespace".
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def one_line(text: str) -> str:
    """A library's error text as one plain line: terminal escapes (torch's bold) dropped,
    line breaks and tabs made single spaces."""
    return " ".join(_TERMINAL_ESCAPE.sub("", text).split())


def load_checkpoint(path: str, map_location: Any = "cpu", flag: Optional[str] = None) -> Dict[str, Any]:
    """Read a checkpoint written by save_checkpoint (or smca.convert). Raises CheckpointError
    when it is missing, truncated or corrupt, or not one of ours; flag: the option that named
    `path` ("--resume"), which the error then names too."""
    name = f"{flag} {path}" if flag else f"checkpoint {path!r}"
    if not os.path.isfile(path):
        remedy = ": give the checkpoint.pth of an earlier run, or an smca.convert output" if flag else ""
        raise CheckpointError(f"{name} does not exist{remedy}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001  a damaged file fails in many ways (zip, pickle, decoding)
        pickled = _UNSUPPORTED_GLOBAL.search(str(err))
        if pickled:  # torch's text says how to load it unsafely; the remedy here is to convert it
            raise CheckpointError(
                f"{name} is not an smca checkpoint: it holds pickled Python objects ({pickled.group(1)}), which "
                f"smca's never do and which are not unpickled. {_CONVERT_HINT}"
            ) from err
        why = one_line(f"{type(err).__name__}: {err}")
        raise CheckpointError(
            f"{name} cannot be read: corrupt, truncated or not written by smca ({why}). {_CONVERT_HINT}"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{name} is not an smca checkpoint (no {FORMAT!r} format tag). {_CONVERT_HINT}")
    return state


def _saved_config(state: Dict[str, Any], cfg) -> Dict[str, Any]:
    """The checkpoint's config with the defaults of fields added since it was written (a field
    absent from an older checkpoint had its default's meaning then)."""
    return type(cfg).from_dict(state["config"]).to_dict()


def check_compatible(state: Dict[str, Any], cfg, path: str = "checkpoint") -> None:
    """Raise CheckpointError naming every architecture field where the checkpoint and cfg differ."""
    saved = _saved_config(state, cfg)
    current = cfg.to_dict()
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, run {current[k]!r}"
        for k in ARCHITECTURE_FIELDS
        if saved.get(k) != current[k]
    ]
    if diffs:
        raise CheckpointError(f"{path} is of another model or configuration: " + "; ".join(diffs))


def training_changes(state: Dict[str, Any], cfg) -> List[str]:
    """"name: checkpoint X, run Y" for every TRAINING_FIELDS setting where cfg differs from the
    checkpoint. lr, lr_backbone, weight_decay and lr_drop are read from the optimizer and
    scheduler state (param groups as SMCADETR.param_groups orders them: the rest at lr, the
    backbone at lr_backbone), which is what the checkpoint trained with, whatever its config says."""
    saved = _saved_config(state, cfg)
    groups = state["optimizer"]["param_groups"]
    if len(groups) == 2 and all("initial_lr" in g for g in groups):
        saved.update(
            lr=groups[0]["initial_lr"], lr_backbone=groups[1]["initial_lr"], weight_decay=groups[0]["weight_decay"]
        )
    saved["lr_drop"] = state["lr_scheduler"].get("step_size", saved.get("lr_drop"))
    current = cfg.to_dict()
    return [
        f"{k}: checkpoint {saved.get(k)!r}, run {current[k]!r}" for k in TRAINING_FIELDS if saved.get(k) != current[k]
    ]


def config_to_restore(cfg):
    """cfg for building a model that a checkpoint's weights then fill: backbone_weights None, so
    that the pretrained backbone file it names is not read (the checkpoint holds the backbone's
    weights; the file may be gone, or be on another machine)."""
    return dataclasses.replace(cfg, backbone_weights=None)


def _load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Dict[str, Any]) -> None:
    """optimizer.load_state_dict(saved), except that a param group empty on one side (the
    backbone's, frozen by lr_backbone 0 in the checkpoint or in this run) starts afresh."""
    ours = optimizer.state_dict()["param_groups"]
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    our_sizes = [len(g["params"]) for g in ours]
    if sizes == our_sizes:
        optimizer.load_state_dict(saved)
        return
    if len(sizes) != len(our_sizes) or any(a and b and a != b for a, b in zip(sizes, our_sizes)):
        raise CheckpointError(
            f"the checkpoint's optimizer has parameter groups of {sizes} tensors, this run's {our_sizes}"
        )
    groups, per_parameter = [], {}
    for old, new in zip(saved["param_groups"], ours):
        if len(old["params"]) == len(new["params"]):
            pairs = zip(old["params"], new["params"])
            per_parameter.update({n: saved["state"][o] for o, n in pairs if o in saved["state"]})
        groups.append(dict(old, params=new["params"]))
    optimizer.load_state_dict(dict(state=per_parameter, param_groups=groups))


def restore(
    state: Dict[str, Any],
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    lr_scheduler=None,
    scaler: Optional[torch.amp.GradScaler] = None,
    rank: Optional[int] = 0,
    world_size: int = 1,
) -> int:
    """Load a checkpoint's state into the given objects; returns the epoch to start from.

    The optimizer and scheduler come back with the checkpoint's hyperparameters (set_schedule
    applies a run's own); a param group that is empty on one side (the backbone frozen with
    lr_backbone 0, in the checkpoint or in this run) starts with no optimizer state.
    rank, world_size: this process's; its generators are restored when the checkpoint was
    written by as many processes (rank None: leave the generators alone). Call it after
    everything that draws random numbers while being built (model, data loaders), so that the
    restored generators are the ones the next epoch uses. Raises CheckpointError when the
    weights or the optimizer's parameter groups do not fit.
    """
    if optimizer is not None and is_weights_only(state):
        raise CheckpointError(
            "the checkpoint holds weights only (no optimizer or schedule"
            + (f"; converted from {state['converted_from']}" if state.get("converted_from") else "")
            + "): start a training run from it with --finetune"
        )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights do not fit the model: {one_line(str(err))}") from err
    if optimizer is not None:
        _load_optimizer_state(optimizer, state["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if rank is not None and len(state["rng"]) == world_size:
        set_rng_state(state["rng"][rank])
    return 0 if state["epoch"] is None else int(state["epoch"]) + 1


def set_schedule(
    optimizer: torch.optim.Optimizer, lr_scheduler, groups: Sequence[Tuple[float, float]], lr_drop: int
) -> None:
    """Apply a run's schedule to a restored optimizer and StepLR: per param group its base lr and
    weight decay (`groups`, as (lr, weight_decay) in the optimizer's group order), and lr_drop.
    The lr of the next epoch follows from the epochs done: base_lr * gamma ** (last_epoch //
    lr_drop), the schedule a run with these settings from the start would be at. Leaves both
    untouched where they already agree, so that an unchanged resume stays bit for bit exact.
    Raises ValueError when `groups` does not have one pair per param group."""
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"groups: expected {len(optimizer.param_groups)} (lr, weight_decay) pairs, got {len(groups)}")
    current = [(g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups]
    if current == [tuple(g) for g in groups] and lr_scheduler.step_size == lr_drop:
        return
    lr_scheduler.step_size = lr_drop
    lr_scheduler.base_lrs = [lr for lr, _ in groups]
    drops = lr_scheduler.last_epoch // lr_drop
    for group, (lr, weight_decay) in zip(optimizer.param_groups, groups):
        group.update(initial_lr=lr, weight_decay=weight_decay, lr=lr * lr_scheduler.gamma**drops)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports
