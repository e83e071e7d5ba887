"""smca.predict on real photographs: scikit-image ships a few in its wheel (skimage.data).

Colour and grey, landscape and portrait, a portrait stored sideways with an EXIF orientation (as
phones write them), PNG and JPEG, sizes from 300 to 640 pixels: the pipeline reads each as a
person sees it, resizes it as evaluation does and returns boxes inside that picture. The model
has random weights: what is checked is the pipeline, not what it finds.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from smca.checkpoint import save_weights
from smca.config import Config
from smca.models import build_model
from smca.predict import load_model, main, predict

data = pytest.importorskip("skimage.data")

EXIF_ORIENTATION = 0x0112
ROTATED_90_CW = 6  # the viewer turns the stored pixels 90 degrees clockwise


@pytest.fixture(scope="module")
def photographs(tmp_path_factory):
    """{file: (height, width) as a person sees it}."""
    folder = tmp_path_factory.mktemp("photos")
    files = {}
    for name, pixels, suffix in (
        ("coffee", data.coffee(), ".jpg"),  # 400 x 600 colour, landscape
        ("rocket", data.rocket(), ".png"),  # 427 x 640 colour
        ("camera", data.camera(), ".png"),  # 512 x 512 grey
        ("coins", data.coins(), ".jpg"),  # 303 x 384 grey
    ):
        path = str(folder / f"{name}{suffix}")
        Image.fromarray(pixels).save(path)
        files[path] = pixels.shape[:2]
    # chelsea (300 x 451) stored sideways with the EXIF tag a phone writes: shown 300 x 451 again
    stored = np.ascontiguousarray(np.rot90(data.chelsea(), k=1))  # 451 x 300, turned left
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATED_90_CW
    path = str(folder / "chelsea_sideways.jpg")
    Image.fromarray(stored).save(path, exif=exif)
    files[path] = data.chelsea().shape[:2]
    return files


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = Config(
        backbone="resnet18", hidden_dim=32, nheads=4, num_queries=10, enc_layers=1, dec_layers=2, dim_feedforward=64,
        num_classes=5, device="cpu", eval_size=160, max_size=240,
    )
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pth")
    save_weights(path, build_model(cfg)[0], cfg, {i: f"class {i}" for i in range(5)})
    return path


def test_predict_cli_on_photographs(photographs, checkpoint, tmp_path, capsys):
    out = tmp_path / "pred"
    main(["--checkpoint", checkpoint, "--images", *photographs, "--output_dir", str(out), "--threshold", "0.0",
          "--max_detections", "5", "--attention_queries", "0", "1"])
    report = json.loads((out / "detections.json").read_text())
    assert [entry["file"] for entry in report["images"]] == list(photographs)
    for entry in report["images"]:
        height, width = photographs[entry["file"]]
        assert (entry["height"], entry["width"]) == (height, width), entry["file"]
        assert len(entry["detections"]) == 5
        for detection in entry["detections"]:
            x1, y1, x2, y2 = detection["box_xyxy"]
            assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height, (entry["file"], detection)
    for path in photographs:
        stem = path.rsplit("/", 1)[1].rsplit(".", 1)[0]
        assert (out / f"{stem}.png").is_file() and (out / f"{stem}_attention.png").is_file()
    assert "25 detections in 5 images" in capsys.readouterr().out


def test_predict_function_on_photograph_tensors(photographs, checkpoint):
    """The Python path: uint8 and float pictures, one batch of different sizes; the boxes are in
    each picture's own pixels, the same as one picture at a time."""
    model, _, _ = load_model(checkpoint)
    coffee, cat = torch.from_numpy(data.coffee()).permute(2, 0, 1), torch.from_numpy(data.chelsea()).permute(2, 0, 1)
    together = predict(model, [coffee, cat.float() / 255], threshold=0.0)
    alone = [predict(model, [image], threshold=0.0)[0] for image in (coffee, cat)]
    for batch_result, single in zip(together, alone):
        # padding to the batch's size changes the masked features only (to float rounding)
        torch.testing.assert_close(batch_result["boxes"], single["boxes"], rtol=1e-4, atol=1e-2)
    assert together[0]["boxes"][:, 2].max() <= 600 * 1.0001 and together[1]["boxes"][:, 3].max() <= 300 * 1.0001


def test_bad_inputs_are_named_before_anything_is_written(photographs, checkpoint, tmp_path, capsys):
    model, _, _ = load_model(checkpoint)
    with pytest.raises(TypeError, match="images: expected \\(3, H, W\\) tensors .*read_image, got ndarray"):
        predict(model, data.coffee())  # a numpy array
    with pytest.raises(ValueError, match=r"float pictures must be in \[0, 1\], got values in \[0, 255\]"):
        predict(model, [torch.from_numpy(data.coffee()).permute(2, 0, 1).float()])
    out = tmp_path / "pred"
    image = next(iter(photographs))
    for flags, message in ((["--attention_queries", "10"], "query indices \\[10\\]: the model has queries 0..9"),
                           (["--attention_queries", "--attention_layer", "2"], "attention layer 2: the model has decoder layers 0..1")):
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", checkpoint, "--images", image, "--output_dir", str(out), *flags])
        assert exit_info.value.code == 2 and message.replace("\\", "") in capsys.readouterr().err.replace("\\", "")
        assert not out.exists()
