"""Training curves as a picture, from the log.txt of one or more runs (as DETR's
util/plot_utils.py plot_logs):

    python -m smca.plot_logs RUN_DIR [RUN_DIR ...] [--output curves.png] [--fields F ...] [--x step|epoch]

One figure, one panel per quantity, one colour per run: the loss terms and class error on the
training set (solid) and on val (dashed), and the COCO AP on val, against optimizer steps (the log's
"step"; --x epoch: against epochs). RUN_DIR is a training run's --output_dir (or its log.txt
itself); each line of log.txt is the JSON smca.train appends after every epoch: train_* and
test_* numbers, test_coco_eval_bbox (COCO's 12 summary numbers), epoch and step. A field is a log
key without its train_/test_ prefix (loss, loss_ce, loss_bbox_0, class_error, grad_norm, lr, ...)
or a COCO summary name (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl).
"""

import argparse
import json
import math
import os
from typing import Dict, List, Optional, Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = ["PlotLogsError", "DEFAULT_FIELDS", "read_log", "plot_logs", "main"]

PROG = "smca-plot-logs"
DEFAULT_FIELDS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "AP")
# COCO's summary (smca.engine.COCO_STAT_NAMES; repeated here so that plotting needs no torch).
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class PlotLogsError(ValueError):
    """A run directory without a readable log, or a field no run has."""


def _log_path(run_dir: str) -> str:
    if os.path.isfile(run_dir):
        return run_dir
    if not os.path.isdir(run_dir):
        raise PlotLogsError(f"RUN_DIR {run_dir!r}: no such directory")
    path = os.path.join(run_dir, "log.txt")
    if not os.path.isfile(path):
        raise PlotLogsError(f"RUN_DIR {run_dir!r}: no log.txt in it (is it a training run's --output_dir?)")
    return path


def read_log(run_dir: str) -> List[Dict]:
    """The JSON lines of a run's log.txt (run_dir: the run's output directory or the file), in
    order; a line cut short by a killed run is skipped. Raises PlotLogsError naming run_dir when
    there is no log or it holds no epoch."""
    path = _log_path(run_dir)
    lines = []
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                lines.append(entry)
    if not lines:
        raise PlotLogsError(f"RUN_DIR {run_dir!r}: {path} holds no epoch's log line")
    return lines


def _series(lines: Sequence[Dict], key: str) -> Optional[List[float]]:
    """The values of `key` (a log key, or test_<COCO name>) per line, NaN where a line lacks it;
    None when no line has it. COCO's -1 (no such objects) is NaN too."""
    coco = key.startswith("test_") and key[len("test_"):] in COCO_STAT_NAMES
    values, found = [], False
    for line in lines:
        if coco:
            stats = line.get("test_coco_eval_bbox") or []
            index = COCO_STAT_NAMES.index(key[len("test_"):])
            value = stats[index] if index < len(stats) else None
            value = None if value is not None and value < 0 else value
        else:
            value = line.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values.append(float(value))
            found = True
        else:
            values.append(math.nan)
    return values if found else None


def _names(run_dirs: Sequence[str]) -> List[str]:
    """A short legend name per run: its folder's name, or the path where two share a name."""
    def folder(path: str) -> str:
        path = os.path.normpath(path)
        if os.path.basename(path) == "log.txt":
            path = os.path.dirname(path) or "."
        return os.path.basename(os.path.abspath(path))

    names = [folder(r) for r in run_dirs]
    return [n if names.count(n) == 1 else r for n, r in zip(names, run_dirs)]


def _keys(field: str) -> List[str]:
    """The log keys of a panel: test_<COCO name> for AP and the like, else train_ and test_."""
    return [f"test_{field}"] if field in COCO_STAT_NAMES else [f"train_{field}", f"test_{field}"]


def plot_logs(
    run_dirs: Sequence[str], fields: Optional[Sequence[str]] = None, x: str = "step", columns: int = 3
) -> Figure:
    """A Figure with one panel per field and one colour per run: train_<field> solid, test_<field>
    dashed (a COCO name: the val value only). fields None: those of DEFAULT_FIELDS that some run
    logs (runs without evaluation, --no_eval, have no AP). x: "step" (optimizer steps) or "epoch".
    Raises PlotLogsError for a run without a readable log, one without `x`, or a field given that
    no run logs."""
    if not run_dirs:
        raise PlotLogsError("no RUN_DIR given")
    if x not in ("step", "epoch"):
        raise PlotLogsError(f"x: 'step' or 'epoch', not {x!r}")
    logs = [read_log(r) for r in run_dirs]
    for run_dir, lines in zip(run_dirs, logs):
        if any(not isinstance(line.get(x), (int, float)) for line in lines):
            other = "epoch" if x == "step" else "step"
            raise PlotLogsError(f"RUN_DIR {run_dir!r}: its log.txt lacks {x!r} on some lines (try --x {other})")
    if fields is None:
        fields = [f for f in DEFAULT_FIELDS if any(_series(lines, k) for lines in logs for k in _keys(f))]
        if not fields:
            raise PlotLogsError(f"no run's log.txt has any of {', '.join(DEFAULT_FIELDS)}: give --fields")
    names = _names(run_dirs)
    colours = [f"C{i % 10}" for i in range(len(run_dirs))]

    columns = max(1, min(columns, len(fields)))
    rows = math.ceil(len(fields) / columns)
    fig = Figure(figsize=(4.3 * columns, 3.2 * rows), layout="constrained")
    axes = list(fig.subplots(rows, columns, squeeze=False).flat)
    splits = False
    for ax, field in zip(axes, fields):
        keys = _keys(field)
        drawn = False
        for lines, colour in zip(logs, colours):
            xs = [line[x] for line in lines]
            for key in keys:
                values = _series(lines, key)
                if values is None:
                    continue
                style = "--" if key.startswith("test_") and len(keys) == 2 else "-"
                splits = splits or style == "--"
                ax.plot(xs, values, style, color=colour, marker="o", markersize=3)
                drawn = True
        if not drawn:
            raise PlotLogsError(
                f"field {field!r}: no run's log.txt has {' or '.join(keys)} ({', '.join(map(repr, run_dirs))})"
            )
        ax.set_title(f"{field} (val)" if field in COCO_STAT_NAMES else field, fontsize=10)
        ax.set_xlabel("optimizer steps" if x == "step" else "epoch")
        ax.grid(alpha=0.3)
    for ax in axes[len(fields):]:  # panels left over in the last row
        ax.set_axis_off()
    handles = [Line2D([], [], color=c, marker="o", markersize=3, label=n) for c, n in zip(colours, names)]
    if splits:
        handles += [
            Line2D([], [], color="0.3", linestyle="-", label="train"),
            Line2D([], [], color="0.3", linestyle="--", label="val"),
        ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=9)
    return fig


def main(argv: Optional[List[str]] = None) -> None:
    """The command line (console script smca-plot-logs)."""
    p = argparse.ArgumentParser(PROG, description="Plot loss terms, class error and AP of training runs (log.txt).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a training run's --output_dir (or its log.txt)")
    p.add_argument("--output", default="curves.png", help="the picture to write (default: curves.png)")
    p.add_argument(
        "--fields",
        nargs="+",
        help=f"quantities, one panel each (default: those of {' '.join(DEFAULT_FIELDS)} that a run logs)",
    )
    p.add_argument("--x", choices=("step", "epoch"), default="step", help="the horizontal axis (default: step)")
    p.add_argument("--dpi", type=int, default=110)
    args = p.parse_args(argv)
    try:
        fig = plot_logs(args.run_dirs, args.fields, args.x)
    except PlotLogsError as err:
        p.exit(2, f"{PROG}: error: {err}\n")
    folder = os.path.dirname(args.output)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(args.output, dpi=args.dpi)
    panels = sum(ax.axison for ax in fig.axes)
    print(f"{len(args.run_dirs)} run{'s' if len(args.run_dirs) > 1 else ''}, {panels} panels: {args.output}")


if __name__ == "__main__":
    main()
