"""One SMCA-DETR training step (forward, loss, backward, optimizer step) with the fused attention
kernels (attention_backend "auto") against the pure-PyTorch reference ("reference").

    python benchmarks/bench_train_step.py                      # the demo model on CPU (or CUDA)
    python benchmarks/bench_train_step.py --preset smca_r50 --device cuda --batch_size 2 --height 800 --width 1216

Each backend runs in a fresh subprocess, so its memory figures are its own. Reported: median and
minimum step time over --repeats steps after --warmup steps, and peak memory of a step above what
the model, optimizer and batch already hold: on CUDA torch.cuda.max_memory_allocated after
reset_peak_memory_stats; on CPU the growth of the process's peak resident set (ru_maxrss) over its
resident set before the first step. On CPU it also records the CPU model and the ISA levels of
smca's C++ kernels (SMCA_CPU_ISA) and of ATen (ATEN_CPU_CAPABILITY): set those and
ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS to time an AVX2 machine on an AVX-512 one. Prints a
table and appends to benchmarks/results/train_step.csv.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from common import write_csv  # this folder: the scripts' shared helpers

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "train_step.csv")
FIELDS = [
    "device",
    "device_name",
    "cpu_isa",
    "aten_capability",
    "model",
    "backend",
    "resolved_backend",
    "batch",
    "height",
    "width",
    "queries",
    "median_ms",
    "min_ms",
    "peak_mem_mib",
    "torch",
]


def _resident_mib() -> float:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args: argparse.Namespace) -> None:
    """Measure one backend in this process; print one JSON line."""
    import torch

    from common import device_name  # this folder: the scripts' shared helpers
    from smca.config import Config, preset_values
    from smca.models import build_model
    from smca_kernels import available_backends

    device = torch.device(args.device)
    cfg = Config(**{**preset_values(args.preset), "num_classes": 7, "attention_backend": args.backend, "device": args.device})
    torch.manual_seed(0)
    model, criterion, _ = build_model(cfg)
    model.to(device).train()
    criterion.to(device)
    optimizer = torch.optim.AdamW(model.param_groups(cfg.lr_backbone), lr=cfg.lr, weight_decay=cfg.weight_decay)
    images = torch.randn(args.batch_size, 3, args.height, args.width, device=device)
    pixel_mask = torch.zeros(args.batch_size, args.height, args.width, dtype=torch.bool, device=device)
    targets = [
        dict(labels=torch.randint(1, 7, (5,), device=device), boxes=torch.rand(5, 4, device=device) * 0.5 + 0.25)
        for _ in range(args.batch_size)
    ]

    def step() -> None:
        losses = criterion(model(images, pixel_mask), targets)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_max_norm)
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    baseline = _resident_mib()
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        static = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - static) / 2**20
    else:
        # ru_maxrss is in KiB on Linux.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline
    if args.backend == "auto":
        resolved = (
            available_backends(device)[0]
            if device.type == "cuda"
            else "cpu" if "cpu" in available_backends(device) else "reference"
        )
    else:
        resolved = args.backend
    print(
        json.dumps(
            dict(
                device=device.type,
                device_name=device_name(device),
                cpu_isa=torch.ops.smca._cpu_isa() if device.type == "cpu" else "",
                aten_capability=torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else "",
                model=cfg.model,
                backend=args.backend,
                resolved_backend=resolved,
                batch=args.batch_size,
                height=args.height,
                width=args.width,
                queries=cfg.num_queries,
                median_ms=round(1000 * statistics.median(times), 2),
                min_ms=round(1000 * min(times), 2),
                peak_mem_mib=round(peak, 1),
                torch=torch.__version__,
            )
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo", help="smca.config.PRESETS name (default: demo)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backends", nargs="+", default=["auto", "reference"])
    p.add_argument("--output", default=RESULTS, help="CSV file (rows are appended)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        child(args)
        return

    rows = []
    common = [
        "--preset",
        args.preset,
        "--device",
        args.device,
        "--batch_size",
        str(args.batch_size),
        "--height",
        str(args.height),
        "--width",
        str(args.width),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
    ]
    for backend in args.backends:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", "--backend", backend] + common,
            capture_output=True,
            text=True,
            cwd=os.path.dirname(HERE),
        )
        if out.returncode != 0:
            sys.exit(f"backend {backend!r} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    header = f"{'backend':<20} {'median ms':>10} {'min ms':>10} {'peak MiB':>10}"
    isa = f", smca kernels {rows[0]['cpu_isa']}, ATen {rows[0]['aten_capability']}" if args.device == "cpu" else ""
    print(
        f"{args.preset} training step, batch {args.batch_size} x {args.height}x{args.width}, "
        f"{rows[0]['device_name']} ({args.device}{isa}), torch {rows[0]['torch']}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        name = f"{r['backend']} ({r['resolved_backend']})" if r["backend"] == "auto" else r["backend"]
        print(f"{name:<20} {r['median_ms']:>10.1f} {r['min_ms']:>10.1f} {r['peak_mem_mib']:>10.1f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_csv(args.output, rows, FIELDS, append=True)
    print(f"appended {len(rows)} rows to {args.output}")


if __name__ == "__main__":
    main()
