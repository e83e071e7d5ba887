"""smca.export: the whole detector as ONNX (onnxruntime) and as a torch.export program, with
dynamic batch, height and width, against eager with the reference and the fused backend."""
import pytest
import torch
import torch.nn.functional as F

from smca.checkpoint import save_weights
from smca.export import export_model, main, min_size, relative_error
from smca.models import build_model
from smca.models.detector import resize_mask
from smca.predict import load_model

from test_model import tiny_config

MAX_SIZE = 96
# (batch, height, width): none is the export example's size (72 x 93), aspect ratios 2:3 to 3:2
CASES = [(2, 64, 96), (1, 96, 64), (3, 77, 90), (2, 40, 41)]
TOLERANCE = 1e-4


def _batch(batch, height, width, seed):
    """Random normalised images with decreasing content (the last ones padded), and the mask."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=generator)
    pixel_mask = torch.zeros(batch, height, width, dtype=torch.bool)
    for b in range(1, batch):
        pixel_mask[b, height - (height * b) // (2 * batch) :] = True
        pixel_mask[b, :, width - (width * b) // (3 * batch) :] = True
    images = images.masked_fill(pixel_mask[:, None], 0.0)
    return images, pixel_mask


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny SMCA-DETR with random weights saved as a checkpoint of the default ("auto")
    backend, as training writes it; its eager models with the reference and the fused backend."""
    torch.manual_seed(0)
    cfg = tiny_config(attention_backend="auto", max_size=MAX_SIZE)
    model, _, _ = build_model(cfg)
    path = str(tmp_path_factory.mktemp("export") / "checkpoint.pth")
    save_weights(path, model, cfg, {1: "one"})
    reference, _, _ = load_model(path, attention_backend="reference")
    fused, _, _ = load_model(path)
    assert {m.backend for m in fused.modules() if hasattr(m, "backend")} == {"auto"}
    return path, {"reference": reference, "fused": fused}


def _eager(model, images, pixel_mask):
    with torch.no_grad():
        out = model(images, pixel_mask)
    return out["pred_logits"], out["pred_boxes"]


def _check(run, models, label):
    for index, (batch, height, width) in enumerate(CASES):
        images, pixel_mask = _batch(batch, height, width, seed=index)
        logits, boxes = run(images, pixel_mask)
        for backend, model in models.items():
            expected_logits, expected_boxes = _eager(model, images, pixel_mask)
            assert logits.shape == expected_logits.shape and boxes.shape == expected_boxes.shape
            err_logits = relative_error(logits, expected_logits)
            err_boxes = relative_error(boxes, expected_boxes)
            where = f"{label} vs eager {backend}, batch {batch}, {height} x {width}"
            assert err_logits < TOLERANCE, f"{where}: pred_logits relative error {err_logits:.2e}"
            assert err_boxes < TOLERANCE, f"{where}: pred_boxes relative error {err_boxes:.2e}"


def test_onnx_matches_eager(checkpoint, tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path, models = checkpoint
    output = str(tmp_path / "model.onnx")
    main(["--checkpoint", path, "--output", output, "--no_check"])

    graph = onnx.load(output)
    assert [i.name for i in graph.graph.input] == ["images", "pixel_mask"]
    assert [o.name for o in graph.graph.output] == ["pred_logits", "pred_boxes"]
    # only standard ops: the co-attention is its reference math, no custom domain
    domains = {node.domain for node in graph.graph.node} | {f.domain for f in graph.functions}
    assert domains <= {"", "ai.onnx"}, domains
    images_shape = graph.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for i, d in enumerate(images_shape) if i != 1), "batch, height, width: dynamic"

    session = onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"])

    def run(images, pixel_mask):
        logits, boxes = session.run(None, {"images": images.numpy(), "pixel_mask": pixel_mask.numpy()})
        return torch.from_numpy(logits), torch.from_numpy(boxes)

    _check(run, models, "onnxruntime")


def test_pt2_matches_eager(checkpoint, tmp_path):
    path, models = checkpoint
    output = str(tmp_path / "model.pt2")
    export_model(models["reference"], output, "pt2")
    program = torch.export.load(output)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("smca" in t for t in targets), "no device op in the exported graph"
    module = program.module()

    def run(images, pixel_mask):
        with torch.no_grad():
            return module(images, pixel_mask)

    _check(run, models, "torch.export")
    # the exported model is a copy: the caller's attention modules are left as they were
    assert all("forward" not in vars(m) for m in models["reference"].modules())


def test_export_rejects_a_too_small_max_size(checkpoint, tmp_path):
    _, models = checkpoint
    with pytest.raises(ValueError, match="max_size"):
        export_model(models["reference"], str(tmp_path / "x.pt2"), "pt2", max_size=min_size(models["reference"]))
    with pytest.raises(ValueError, match="format"):
        export_model(models["reference"], str(tmp_path / "x.bin"), "tflite")


def test_resize_mask_is_nearest_interpolation():
    """The detector's mask resizing (indexing, for symbolic sizes) picks the cells that
    F.interpolate(mode="nearest") picks, for every feature size the strides give and more."""
    generator = torch.Generator().manual_seed(0)
    for in_size in list(range(1, 140)) + [799, 800, 1066, 1333]:
        mask = torch.rand(2, in_size, 3, generator=generator) > 0.5
        sizes = {-(-in_size // s) for s in (8, 16, 32, 64)} | {in_size, 2 * in_size, in_size + 1, max(1, in_size // 3)}
        for out_size in sizes:
            expected = F.interpolate(mask[None].float(), size=(out_size, 3)).to(torch.bool)[0]
            assert torch.equal(resize_mask(mask, (out_size, 3)), expected), (in_size, out_size)
        # both axes at once, as the detector resizes (B, H, W)
        square = torch.rand(1, in_size, in_size + 5, generator=generator) > 0.5
        size = (-(-in_size // 32), -(-(in_size + 5) // 32))
        expected = F.interpolate(square[None].float(), size=size).to(torch.bool)[0]
        assert torch.equal(resize_mask(square, size), expected), in_size
