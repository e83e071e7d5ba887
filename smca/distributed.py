"""Multi-process training with torchrun: set-up, ranks, reductions, and seeding; the device and
attention backend a command line asks for, checked against this machine.

torchrun (`torchrun --nproc_per_node N -m smca.train ...`, or with --nnodes and a rendezvous
for several machines) starts one process per GPU and sets RANK, LOCAL_RANK and WORLD_SIZE.
Without them everything here is a no-op, so single-process code needs no special case.
"""

import os
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "check_device",
    "check_attention_backend",
    "DistInfo",
    "init_distributed",
    "cleanup",
    "is_main_process",
    "get_rank",
    "get_world_size",
    "all_reduce_mean",
    "all_gather_object",
    "barrier",
    "seed_everything",
]


def check_device(name: str) -> torch.device:
    """torch.device(name) for --device, checked against this machine. Raises ValueError naming
    the flag: a string that is no device, CUDA where there is none, a CUDA index beyond the count."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_attention_backend(backend: Optional[str], device: torch.device) -> None:
    """ValueError naming --attention_backend when a fused backend chosen by name cannot run on
    `device` here ("auto", "reference" and None always can)."""
    from smca_kernels import available_backends

    if backend in (None, "auto", "reference"):
        return
    available = available_backends(device)
    if backend not in available:
        raise ValueError(
            f"--attention_backend {backend}: not available for {device.type} tensors here; available: "
            f"{', '.join(['auto'] + available)}"
        )


@dataclass
class DistInfo:
    distributed: bool
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(device: str) -> DistInfo:
    """Join the process group when launched by torchrun; pick this process's device.

    device: "cuda" or "cpu" (or "cuda:N" for single-process runs). Under torchrun with CUDA
    each process takes GPU LOCAL_RANK and the NCCL backend; on CPU the gloo backend.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return DistInfo(False, 0, 1, 0, torch.device(device))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(local_rank)
        this_device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        this_device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(True, rank, world_size, local_rank, this_device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Only rank 0 logs, writes files and evaluates."""
    return get_rank() == 0


def all_reduce_mean(values: Dict[str, float], device: torch.device) -> Dict[str, float]:
    """The mean of each value over all processes (the values themselves when not distributed).

    Every process must pass the same keys.
    """
    if get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    stacked /= get_world_size()
    return dict(zip(keys, stacked.tolist()))


def all_gather_object(obj: Any) -> List[Any]:
    """[obj of rank 0, obj of rank 1, ...]; [obj] when not distributed."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random (every generator training draws from); each process passes
    its own seed (the run's seed + rank)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
