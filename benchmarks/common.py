"""What every benchmark here records beside its figures: the device's name, what the CPU figures
depend on (model, ISA levels, FMA peak), and CSV rows."""
import csv
import os
import platform
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["device_name", "cpu_description", "write_csv"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            return models[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description(threads: int) -> dict:
    """What the CPU figures depend on: the CPU model and its vector ISA, the ISA level smca's
    C++ kernels run at (csrc/cpu/isa.h, SMCA_CPU_ISA), ATen's and the libraries' (ATEN_CPU_CAPABILITY,
    ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS), and the float32 FMA peak of `threads` threads at
    the kernels' level: measured (a loop of independent FMAs, so at the clock the cores really
    run) and nominal (threads x the clock /proc/cpuinfo states x 2 FMA units x lanes x 2 flops)."""
    flags, mhz = set(), None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags" and not flags:
                    flags = set(value.split())
                elif key.strip() == "cpu MHz" and mhz is None:
                    mhz = float(value)
    except OSError:
        pass
    isa = ("avx512" if "avx512f" in flags else "avx2+fma" if {"avx2", "fma"} <= flags
           else "neon" if platform.machine() in ("aarch64", "arm64") else platform.machine())
    info = dict(cpu=device_name(torch.device("cpu")), cpu_isa=isa, aten_capability=torch.backends.cpu.get_cpu_capability(),
                onednn_max_cpu_isa=os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
                mkl_enable_instructions=os.environ.get("MKL_ENABLE_INSTRUCTIONS", ""),
                smca_cpu_isa=torch.ops.smca._cpu_isa(),
                fma_peak_gflops=round(max(torch.ops.smca._cpu_fma_peak_gflops() for _ in range(3)), 1),
                nominal_peak_gflops=None)
    if mhz:
        lanes = {"avx512": 16, "avx2": 8}.get(info["smca_cpu_isa"], 4)
        info["nominal_peak_gflops"] = round(threads * mhz / 1e3 * 2 * lanes * 2, 1)
    return info


def write_csv(path: Path, rows: List[Dict], fields: Sequence[str], meta: Optional[Dict] = None, append: bool = False) -> None:
    """rows as CSV with columns `meta`'s keys then `fields` (None written empty), each row with
    meta's values; append: add to the file (a header only for a new one), else replace it."""
    meta = meta or {}
    keys = list(meta) + list(fields)
    new_file = not (append and os.path.exists(path))
    with open(path, "a" if append else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({**meta, **{k: "" if row.get(k) is None else row[k] for k in keys if k in row}})
