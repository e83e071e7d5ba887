"""The convergence study: SMCA-DETR (single- and multi-scale) against plain DETR, same code,
data, seeds and budget; COCO AP against training steps.

The models (MODELS below: each name's smca.train flags, the only flags that differ between runs):
smca and smca_ms (SMCA, single- and multi-scale); detr, the SMCA paper's baseline (SMCA's code
and recipe, focal classifier, with the Gaussian off); detr_softmax, DETR as published (the same,
but DETR's softmax classifier with a no-object class: cross-entropy with eos_coef 0.1, class
cost -probability, loss and cost weights 1). detr is the baseline of "steps to reach".

    python benchmarks/convergence.py                      # the built-in data, ~40 min on 2 CPU cores
    python benchmarks/convergence.py --device cuda --epochs 60 --num_train 4096
    python benchmarks/convergence.py --coco_path /data/coco --backbone_weights resnet50.pth \\
        --work_dir runs/coco --device cuda --epochs 50 --lr_drop 40 -- --preset smca_r50

What it does, each step skipped when its output is already there (so a killed study resumes):
 1. makes the built-in synthetic data set under WORK_DIR/data (unless --coco_path), as the
    demo does (smca.demo.SHAPES: one hue per category, see there why);
 2. pretrains the backbone on it, WORK_DIR/backbone.pth (smca.pretrain_backbone; unless
    --backbone_weights): SMCA and DETR fine-tune a pretrained backbone, and without one both
    models would spend the budget learning features, which is not what is compared here;
 3. trains every model of --models with every seed of --seeds through smca.train, same flags
    but the model's (MODELS) and --seed, --jobs runs at a time (each with its share of the CPU
    threads), into WORK_DIR/runs/MODEL_seedSEED (a run with a checkpoint is resumed); smca.train
    evaluates COCO AP after every epoch;
 4. writes benchmarks/results/convergence.csv (model, seed, step, ap: COCO AP@[.5:.95] in
    0..1 after `step` optimizer steps), a plot of AP against steps (mean over seeds, band from
    the lowest to the highest seed), and prints each model's final AP, the steps each model
    needs to reach the baseline's (detr's) final AP when the baseline is among --models, and how
    much of a confident query's attention falls inside its own box (attention_in_box).

Flags after `--` go to smca.train unchanged, so the study scales to a GPU and to COCO without
editing this file. On the built-in data they override STUDY_TRAIN_ARGS below; with --coco_path
they are all that is passed besides the study's own (choose the recipe there, e.g. --preset
smca_r50: the paper's, with the backbone fine-tuned at its lr_backbone). A model's own flags
(MODELS) come last and win over both.
"""

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

from smca.config import lr_drop_for

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
# Study model name -> (label for the plot and the printout, smca.train flags). The flags come
# after every other flag, so they win ("the last of a flag wins"); on the built-in data they sit
# on top of STUDY_TRAIN_ARGS, so the four runs differ only in these.
MODELS: Dict[str, Tuple[str, List[str]]] = {
    "smca": ("SMCA, single scale", ["--model", "smca"]),
    "smca_ms": ("SMCA, multi-scale", ["--model", "smca_ms"]),
    "detr": ("DETR, SMCA's baseline: Gaussian off, focal classifier", ["--model", "detr"]),
    "detr_softmax": (
        "DETR as published: softmax classifier with a no-object class",
        # smca.config PRESETS["detr_r50_published"]'s classifier and loss, on the study's model
        ["--model", "detr", "--classifier", "softmax", "--cls_loss_coef", "1", "--set_cost_class", "1"]
        + ["--eos_coef", "0.1"],
    ),
}
BASELINE = "detr"

# smca.train flags of the study on the built-in data: the demo model (ResNet-18, d 64, 2 encoder
# and 3 decoder layers, 50 queries, lr 1e-3) at the synthetic images' scale, on a pretrained
# backbone that stays frozen (lr_backbone 0), so that every step trains the transformer, the
# part that differs between the models.
STUDY_TRAIN_ARGS = ["--preset", "demo"]


def model_flags(model: str) -> List[str]:
    """The smca.train flags that make `model` of the study (a name of MODELS)."""
    return list(MODELS[model][1])


def model_label(model: str) -> str:
    """The name and what it is, for the plot's legend and the printout (the name for a model
    outside MODELS, as in a CSV of another study)."""
    return f"{model}: {MODELS[model][0]}" if model in MODELS else model


def _run(cmd: List[str], log: str, threads: int) -> subprocess.Popen:
    """Start cmd with its output in `log` and `threads` OpenMP threads."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log, "a") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _train_all(
    runs: List[Tuple[str, int]], args: argparse.Namespace, train_args: List[str], backbone: Optional[str]
) -> None:
    """Train every (model, seed) of runs, args.jobs at a time; raise naming the runs that failed.

    train_args: smca.train flags common to every run (the model and seed are added per run);
    backbone: the --backbone_weights of every run, if any."""
    threads = args.threads or (max(1, (os.cpu_count() or 1) // args.jobs) if args.device == "cpu" else 1)
    pending = list(runs)
    active: Dict[Tuple[str, int], subprocess.Popen] = {}
    failed = []
    while pending or active:
        while pending and len(active) < args.jobs:
            model, seed = pending.pop(0)
            out = _run_dir(args.work_dir, model, seed)
            os.makedirs(out, exist_ok=True)
            cmd = [sys.executable, "-m", "smca.train", "--coco_path", args.coco_path, "--output_dir", out]
            cmd += ["--device", args.device]
            cmd += ["--epochs", str(args.epochs), "--lr_drop", str(args.lr_drop or lr_drop_for(args.epochs))]
            cmd += ["--num_workers", str(args.num_workers), "--no_progress"]
            cmd += ["--backbone_weights", backbone] if backbone else []
            cmd += [*train_args, *model_flags(model), "--seed", str(seed)]  # the last of a flag wins
            if os.path.isfile(_checkpoint(args.work_dir, model, seed)):
                cmd += ["--resume", _checkpoint(args.work_dir, model, seed)]
            print(f"training {model} seed {seed} -> {out}", flush=True)
            active[(model, seed)] = _run(cmd, os.path.join(out, "stdout.txt"), threads)
        time.sleep(1)
        for key, proc in list(active.items()):
            if proc.poll() is not None:
                del active[key]
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"  {key[0]} seed {key[1]}: {status}", flush=True)
                if proc.returncode != 0:
                    failed.append(key)
    if failed:
        logs = ", ".join(os.path.join(_run_dir(args.work_dir, m, s), "stdout.txt") for m, s in failed)
        raise RuntimeError(f"{len(failed)} training run(s) failed; see {logs}")


def _run_dir(work_dir: str, model: str, seed: int) -> str:
    return os.path.join(work_dir, "runs", f"{model}_seed{seed}")


def _checkpoint(work_dir: str, model: str, seed: int) -> str:
    return os.path.join(_run_dir(work_dir, model, seed), "checkpoint.pth")


def read_curves(work_dir: str, runs: Sequence[Tuple[str, int]]) -> List[Dict]:
    """Rows dict(model, seed, step, ap) from each run's log.txt, in run and step order."""
    rows = []
    for model, seed in runs:
        with open(os.path.join(_run_dir(work_dir, model, seed), "log.txt")) as f:
            for line in f:
                entry = json.loads(line)
                rows.append(dict(model=model, seed=seed, step=entry["step"], ap=entry["test_coco_eval_bbox"][0]))
    return rows


def mean_curves(rows: Sequence[Dict]) -> Dict[str, Tuple[List[int], List[float], List[float], List[float]]]:
    """model -> (steps, mean AP, lowest AP, highest AP) over seeds, at the steps every seed has."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        by_step: Dict[int, List[float]] = {}
        for r in rows:
            if r["model"] == model:
                by_step.setdefault(r["step"], []).append(r["ap"])
        seeds = max(len(v) for v in by_step.values())
        steps = sorted(s for s, v in by_step.items() if len(v) == seeds)
        out[model] = (
            steps,
            [sum(by_step[s]) / seeds for s in steps],
            [min(by_step[s]) for s in steps],
            [max(by_step[s]) for s in steps],
        )
    return out


def steps_to_reach(steps: Sequence[int], ap: Sequence[float], target: float) -> Optional[int]:
    """The first evaluated step at which ap >= target, None if never."""
    return next((s for s, a in zip(steps, ap) if a >= target), None)


def attention_in_box(checkpoint: str, image_dir: str, num_images: int = 48, top: int = 5) -> float:
    """How much a confident query reads its own object: the mean share of its cross-attention
    (last decoder layer, head-averaged, all levels on the finest grid) that falls on feature
    cells whose centres lie inside its own predicted box, over the `top` best-scoring queries of
    the first `num_images` images of image_dir. Attention spread evenly over the image gives
    about the box's share of the image."""
    import torch

    from smca.data.image import read_image
    from smca.predict import attention_maps, load_model

    model, _, _ = load_model(checkpoint)
    queries = range(model.query_embed.num_embeddings)
    shares = []
    for name in sorted(os.listdir(image_dir))[:num_images]:
        image = read_image(os.path.join(image_dir, name))
        maps = attention_maps(model, [image], queries)
        height, width = maps["image_sizes"][0].tolist()  # the resized image inside the padded input
        rows, cols = maps["feature_size"]
        # Cell centres in the original image's pixels.
        ys = (torch.arange(rows) + 0.5) * maps["stride"] * image.shape[1] / height
        xs = (torch.arange(cols) + 0.5) * maps["stride"] * image.shape[2] / width
        for k in maps["scores"][0].topk(top).indices.tolist():
            x0, y0, x1, y1 = maps["boxes"][0, k].tolist()
            inside = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
            attention = maps["attention"][0, k]
            shares.append(float(attention[inside].sum() / attention.sum()))
    return sum(shares) / len(shares)


def summarize(
    rows: Sequence[Dict], baseline: str = BASELINE, attention: Optional[Dict[str, float]] = None
) -> List[Dict]:
    """Per model: final AP (mean, per seed), the steps to reach the baseline's final mean AP
    (None when never reached or when the baseline was not run) and, when given, its
    attention_in_box (model -> value)."""
    curves = mean_curves(rows)
    target = curves[baseline][1][-1] if baseline in curves else None
    summary = []
    for model, (steps, mean, _, _) in curves.items():
        finals = [r["ap"] for r in rows if r["model"] == model and r["step"] == steps[-1]]
        reach = steps_to_reach(steps, mean, target) if target is not None else None
        summary.append(
            dict(
                model=model,
                final_step=steps[-1],
                final_ap=mean[-1],
                final_ap_seeds=finals,
                steps_to_baseline=reach,
                fraction_of_budget=None if reach is None else reach / steps[-1],
                attention_in_box=(attention or {}).get(model),
            )
        )
    return summary


def format_summary(summary: Sequence[Dict], baseline: str = BASELINE) -> str:
    """A Markdown table of summarize's output."""
    lines = [
        f"| model | final AP (mean) | per seed | steps to reach {baseline}'s final AP | fraction of the budget "
        "| attention inside own box |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    ran = any(s["model"] == baseline for s in summary)
    for s in summary:
        reach = "-" if not ran else "never" if s["steps_to_baseline"] is None else str(s["steps_to_baseline"])
        fraction = "" if s["fraction_of_budget"] is None else f"{s['fraction_of_budget']:.2f}"
        seeds = " / ".join(f"{a:.3f}" for a in s["final_ap_seeds"])
        inside = "" if s["attention_in_box"] is None else f"{s['attention_in_box']:.0%}"
        lines.append(f"| {s['model']} | {s['final_ap']:.3f} | {seeds} | {reach} | {fraction} | {inside} |")
    return "\n".join(lines)


def plot(rows: Sequence[Dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, (steps, mean, low, high) in mean_curves(rows).items():
        (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=model_label(model))
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training steps")
    ax.set_ylabel("COCO AP@[.5:.95]")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s [options] [-- smca.train flags]")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=20, help="training epochs of every run (AP after each)")
    p.add_argument("--lr_drop", type=int, help="lr x0.1 after this many epochs (default: 80%% of --epochs)")
    p.add_argument("--work_dir", default=os.path.join(ROOT, "runs", "convergence"))
    p.add_argument("--coco_path", help="a COCO-layout data set instead of the built-in one")
    p.add_argument("--num_train", type=int, default=512, help="built-in data: training images")
    p.add_argument("--num_val", type=int, default=128, help="built-in data: validation images")
    p.add_argument(
        "--backbone_weights", help="a pretrained torchvision ResNet state dict (built-in data: skips pretraining)"
    )
    p.add_argument("--backbone_steps", type=int, default=600, help="built-in data: backbone pretraining steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, help="runs at a time (default: 2 on CPU, 1 on a GPU)")
    p.add_argument("--threads", type=int, help="CPU threads per run (default: the cores shared by --jobs runs)")
    p.add_argument("--num_workers", type=int, default=1, help="data-loading processes per run")
    p.add_argument("--results", default=RESULTS, help="where convergence.csv and .png go")
    args = p.parse_args(argv[:split])
    train_args = argv[split + 1 :]
    for name in ("work_dir", "coco_path", "backbone_weights", "results"):  # the runs start in ROOT
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    args.jobs = args.jobs or (2 if args.device == "cpu" else 1)
    start = time.time()

    synthetic = args.coco_path is None
    backbone = args.backbone_weights
    if synthetic:
        from smca.demo import shapes_backbone, shapes_data

        args.coco_path = shapes_data(args.work_dir, args.num_train, args.num_val)
        if backbone is None:
            steps = args.backbone_steps
            backbone = shapes_backbone(args.work_dir, args.coco_path, steps, args.device, args.num_workers)

    runs = [(model, seed) for model in args.models for seed in args.seeds]
    _train_all(runs, args, (STUDY_TRAIN_ARGS if synthetic else []) + train_args, backbone)
    rows = read_curves(args.work_dir, runs)

    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "convergence.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["model", "seed", "step", "ap"])
        writer.writeheader()
        writer.writerows(dict(r, ap=round(r["ap"], 5)) for r in rows)
    machine = f"{os.cpu_count()}-core CPU" if args.device == "cpu" else _gpu_name()
    data = "built-in shapes" if synthetic else os.path.basename(os.path.normpath(args.coco_path))
    title = f"{data}, seeds {args.seeds}, {args.epochs} epochs, {machine} ({platform.machine()}); band: seeds' min..max"
    plot(rows, os.path.join(args.results, "convergence.png"), title)
    val_images = os.path.join(args.coco_path, "val2017")
    attention = {
        model: sum(attention_in_box(_checkpoint(args.work_dir, model, s), val_images) for s in args.seeds)
        / len(args.seeds)
        for model in args.models
    }
    print(format_summary(summarize(rows, attention=attention)))
    print("\n" + "\n".join(f"{model_label(m)} ({' '.join(model_flags(m))})" for m in args.models))
    print(f"\n{len(runs)} runs in {(time.time() - start) / 60:.1f} min; CSV and plot in {args.results}")


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


if __name__ == "__main__":
    main()
