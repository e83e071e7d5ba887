"""Checkpoints: atomic writes and an exact resume.

A checkpoint is a dict saved with torch.save and read back with weights_only=True, so it holds
only tensors and plain data:
    format, epoch (the last finished epoch), model, optimizer, lr_scheduler, scaler (or None),
    rng (per process rank: python, numpy, torch and, when CUDA is in use, cuda generator states),
    config (Config.to_dict(): a plain dict, never a pickled object), categories ({id: name}).
It is written to a temporary file in the same directory and moved over the old one with
os.replace, so a crash while saving leaves the previous checkpoint intact.

Resuming restores every generator, so on CPU (num_workers 0) a run stopped after epoch k and
resumed ends with the same weights, bit for bit, as a run straight through.
"""

import os
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "ARCHITECTURE_FIELDS",
    "rng_state",
    "save_atomically",
    "save_checkpoint",
    "load_checkpoint",
    "check_compatible",
    "restore",
]

FORMAT = "smca-checkpoint-1"
# Config fields that change the weights' shapes or what the weights compute: a checkpoint
# must agree with the run on all of them.
ARCHITECTURE_FIELDS = (
    "model",
    "backbone",
    "backbone_norm",
    "hidden_dim",
    "nheads",
    "num_queries",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "num_classes",
    "modulation",
    "beta",
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
    of one: a temporary file beside it, flushed to disk, then renamed over it."""
    # Same directory, so os.replace is an atomic rename; the process id keeps writers apart.
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp_path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def save_checkpoint(
    path: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    epoch: int,
    cfg,
    scaler: Optional[torch.amp.GradScaler] = None,
    categories: Optional[Dict[int, str]] = None,
    rng_states: Optional[List[Dict[str, Any]]] = None,
) -> None:
    """Write the training state after `epoch` to `path` atomically (temporary file + os.replace).

    model: the bare model (not the DDP wrapper), so that the keys carry no "module." prefix.
    rng_states: rng_state() of every process, by rank (default: this process's only).
    """
    state = dict(
        format=FORMAT,
        epoch=int(epoch),
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        lr_scheduler=lr_scheduler.state_dict(),
        scaler=scaler.state_dict() if scaler is not None else None,
        rng=rng_states if rng_states is not None else [rng_state()],
        config=cfg.to_dict(),
        categories=dict(categories or {}),
    )
    save_atomically(state, path)


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by save_checkpoint. Raises CheckpointError when it is missing,
    truncated or corrupt, or not one of ours."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001  a damaged file fails in many ways (zip, pickle, decoding)
        why = f"{type(err).__name__}: {err}"
        raise CheckpointError(
            f"checkpoint {path!r} cannot be read: corrupt, truncated or not written by smca ({why})"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not an smca checkpoint (no {FORMAT!r} format tag)")
    return state


def check_compatible(state: Dict[str, Any], cfg, path: str = "checkpoint") -> None:
    """Raise CheckpointError naming every architecture field where the checkpoint and cfg differ."""
    saved = state["config"]
    current = cfg.to_dict()
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, run {current[k]!r}"
        for k in ARCHITECTURE_FIELDS
        if saved.get(k) != current[k]
    ]
    if diffs:
        raise CheckpointError(f"{path} is of another model or configuration: " + "; ".join(diffs))


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

    rank, world_size: this process's; its generators are restored when the checkpoint was
    written by as many processes (rank None: leave the generators alone). Call it after
    everything that draws random numbers while being built (model, data loaders), so that the
    restored generators are the ones the next epoch uses.
    """
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights do not fit the model: {err}") from err
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if rank is not None and len(state["rng"]) == world_size:
        set_rng_state(state["rng"][rank])
    return int(state["epoch"]) + 1
