"""Export a trained SMCA-DETR checkpoint as one graph of standard ops: ONNX (torch.onnx.export
with dynamo=True) or a torch.export program (torch.export.save):

    python -m smca.export --checkpoint OUT/checkpoint.pth --output model.onnx [--format onnx]
    python -m smca.export --checkpoint OUT/checkpoint.pth --output model.pt2 --format pt2
        [--max_size N] [--opset 18] [--no_check]

The graph takes what SMCADETR.forward takes, (images (B, 3, H, W) float32 ImageNet-normalised
and padded at the bottom and right, pixel_mask (B, H, W) bool, True = padding), with the batch,
height and width dynamic (H and W from the coarsest stride + 1, i.e. 33 (smca, detr) or 65
(smca_ms), up to --max_size, default the checkpoint's max_size; smca.predict.prepare_images
prepares such batches), and returns (pred_logits, pred_boxes) as SMCADETR.forward does
(no auxiliary outputs, no attention). Post-processing (top-k, boxes to pixels) stays outside.

The co-attention is carried through as the operator's reference math (smca_kernels.reference,
pure PyTorch): the exported copy's SMCAAttention modules use attention_backend "reference",
which keeps the level sizes symbolic. The fused kernels are device ops that ONNX cannot
carry; eager inference keeps them.
"""
import argparse
import copy
import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from smca_kernels import SMCAAttention

__all__ = ["ExportModel", "export_model", "export_program", "example_inputs", "check_export", "measure_latency", "main", "FORMATS"]

PROG = "smca.export"
FORMATS = ("onnx", "pt2")
INPUT_NAMES = ["images", "pixel_mask"]
OUTPUT_NAMES = ["pred_logits", "pred_boxes"]
DEFAULT_OPSET = 18


class ExportModel(nn.Module):
    """The detector as exported: (images, pixel_mask) -> (pred_logits, pred_boxes).

    Holds a copy of `model` in eval mode, without auxiliary outputs, whose SMCAAttention modules
    use the reference backend (standard ops; SMCAAttention keeps symbolic level sizes as they
    come); `model` itself is left as it is.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        self.model.aux_loss = False
        for module in self.model.modules():
            if isinstance(module, SMCAAttention):
                module.backend = "reference"

    def forward(self, images: Tensor, pixel_mask: Tensor) -> Tuple[Tensor, Tensor]:
        out = self.model(images, pixel_mask)
        return out["pred_logits"], out["pred_boxes"]


def min_size(model: nn.Module) -> int:
    """The smallest height and width the exported graph takes: the coarsest level two cells
    high and wide (a one-cell map would be specialised by the exporter)."""
    return max(model.decoder.strides) + 1


def example_inputs(max_size: int, batch: int = 2, smallest: int = 2) -> Tuple[Tensor, Tensor]:
    """An example batch for tracing: `batch` images padded to a size between smallest and
    max_size, the second one smaller (nothing is specialised to these sizes)."""
    height = min(max_size, max(smallest + 1, (3 * max_size) // 4 + 1))
    width = min(max_size, max(smallest + 2, max_size - 3))
    images = torch.randn(batch, 3, height, width)
    pixel_mask = torch.zeros(batch, height, width, dtype=torch.bool)
    pixel_mask[1:, (2 * height) // 3 :, :] = True
    pixel_mask[1:, :, (3 * width) // 4 :] = True
    return images, pixel_mask


def _dynamic_shapes(smallest: int, max_size: int):
    batch = torch.export.Dim("batch", min=1)
    height = torch.export.Dim("height", min=smallest, max=max_size)
    width = torch.export.Dim("width", min=smallest, max=max_size)
    return {"images": {0: batch, 2: height, 3: width}, "pixel_mask": {0: batch, 1: height, 2: width}}


def export_program(model: nn.Module, max_size: int) -> torch.export.ExportedProgram:
    """torch.export.export of ExportModel(model) with dynamic batch, height and width
    (min_size(model) to max_size)."""
    wrapped = ExportModel(model).cpu().float()
    smallest = min_size(model)
    with torch.no_grad():
        return torch.export.export(
            wrapped,
            example_inputs(max_size, smallest=smallest),
            dynamic_shapes=_dynamic_shapes(smallest, max_size),
            strict=False,
        )


def export_model(
    model: nn.Module, output: str, fmt: str = "onnx", max_size: Optional[int] = None, opset: int = DEFAULT_OPSET
) -> str:
    """Export `model` (an SMCADETR, any backend and device; a float32 CPU copy is exported, the
    model is left as it is) to `output` as "onnx" or "pt2"; returns output. max_size: the largest
    height and width the graph takes (default model.max_size)."""
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
    max_size = model.max_size if max_size is None else int(max_size)
    if max_size < min_size(model) + 2:
        raise ValueError(f"max_size: expected at least {min_size(model) + 2} for this model, got {max_size}")
    program = export_program(model, max_size)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if fmt == "pt2":
        torch.export.save(program, output)
        return output
    onnx_program = torch.onnx.export(
        program,
        input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES,
        opset_version=opset,
        dynamo=True,
        optimize=True,
        verbose=False,
    )
    onnx_program.save(output)
    return output


def check_export(model: nn.Module, path: str, fmt: str, sizes: Sequence[Tuple[int, int]]) -> List[Tuple[Tuple[int, int], float, float]]:
    """Runs the exported file (onnxruntime on the CPU, or torch.export.load) and `model` in eager
    on random batches of each (H, W) in sizes; -> [(size, logits error, boxes error)], errors as
    max abs difference / max abs value of eager."""
    results = []
    run = _runner(path, fmt)
    generator = torch.Generator().manual_seed(0)
    for height, width in sizes:
        images = torch.randn(2, 3, height, width, generator=generator)
        pixel_mask = torch.zeros(2, height, width, dtype=torch.bool)
        pixel_mask[1, (3 * height) // 4 :] = True
        pixel_mask[1, :, (2 * width) // 3 :] = True
        with torch.no_grad():
            out = model.eval()(images, pixel_mask)
        logits, boxes = run(images, pixel_mask)
        results.append(((height, width), relative_error(logits, out["pred_logits"]), relative_error(boxes, out["pred_boxes"])))
    return results


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = expected.to(torch.float64)
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _runner(path: str, fmt: str):
    """(images, pixel_mask) -> (pred_logits, pred_boxes) tensors from the exported file."""
    if fmt == "pt2":
        module = torch.export.load(path).module()

        def run(images, pixel_mask):
            with torch.no_grad():
                return module(images, pixel_mask)

        return run
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(images, pixel_mask):
        logits, boxes = session.run(OUTPUT_NAMES, {"images": images.numpy(), "pixel_mask": pixel_mask.numpy()})
        return torch.from_numpy(logits), torch.from_numpy(boxes)

    return run


def measure_latency(
    presets: Sequence[str] = ("demo", "smca_r50"),
    size: Tuple[int, int] = (800, 1066),
    runs: int = 5,
    compile: bool = True,
    workdir: Optional[str] = None,
) -> List[dict]:
    """CPU latency of one image of `size` for models of the presets (random weights, 91
    classes): eager with the fused kernel (backend "auto"), torch.compile of that, and
    onnxruntime on the ONNX export; the median of `runs` timed calls after two warm-up calls.
    Prints and returns one dict per preset (milliseconds)."""
    import statistics
    import tempfile
    import time

    from .config import Config, preset_values
    from .models import build_model

    threads = torch.get_num_threads()
    images = torch.randn(1, 3, *size)
    pixel_mask = torch.zeros(1, *size, dtype=torch.bool)

    def median_ms(call) -> float:
        for _ in range(2):
            call()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    rows = []
    for name in presets:
        torch.manual_seed(0)
        model, _, _ = build_model(Config(**preset_values(name), num_classes=91, device="cpu"))
        model.eval()
        row = {"preset": name, "size": f"{size[0]}x{size[1]}", "threads": threads}
        with torch.no_grad():
            row["eager_ms"] = median_ms(lambda: model(images, pixel_mask))
            if compile:
                compiled = torch.compile(model)
                start = time.perf_counter()
                compiled(images, pixel_mask)
                row["compile_s"] = time.perf_counter() - start
                row["compiled_ms"] = median_ms(lambda: compiled(images, pixel_mask))
        import onnxruntime

        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            path = export_model(model, os.path.join(tmp, "model.onnx"), "onnx", max(max(size), model.max_size))
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            feed = {"images": images.numpy(), "pixel_mask": pixel_mask.numpy()}
            row["onnxruntime_ms"] = median_ms(lambda: session.run(None, feed))
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(PROG, description="Export an SMCA-DETR checkpoint to ONNX or a torch.export program.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True, help="the file to write (model.onnx, model.pt2)")
    p.add_argument("--format", choices=FORMATS, help="default: from the output's extension (.pt2: pt2), else onnx")
    p.add_argument("--max_size", type=int, help="largest image height and width (default: the checkpoint's max_size)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    p.add_argument("--no_check", action="store_true", help="skip running the export against eager")
    args = p.parse_args(argv)
    from .checkpoint import CheckpointError
    from .predict import load_model

    fmt = args.format or ("pt2" if args.output.endswith(".pt2") else "onnx")
    try:
        model, cfg, _ = load_model(args.checkpoint, "cpu", attention_backend="reference")
    except CheckpointError as err:
        p.exit(2, f"{PROG}: error: {err}\n")
    max_size = cfg.max_size if args.max_size is None else args.max_size
    export_model(model, args.output, fmt, max_size, args.opset)
    print(f"{PROG}: wrote {args.output} ({fmt}, images up to {max_size} x {max_size}, batch dynamic)")
    if not args.no_check:
        small = max(min_size(model), max_size // 2)
        sizes = [(max_size, small), (small + 7, max_size - 5)]
        try:
            for size, err_logits, err_boxes in check_export(model, args.output, fmt, sizes):
                print(f"{PROG}: {size[0]} x {size[1]}: relative error pred_logits {err_logits:.1e}, pred_boxes {err_boxes:.1e}")
        except ImportError as err:
            print(f"{PROG}: not checked ({err})")


if __name__ == "__main__":
    main()
