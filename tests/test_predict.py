"""smca.predict with what users give it: outputs that never replace an input or a file predict
did not write, folders and glob patterns among other files, and models in any dtype."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from smca.checkpoint import save_weights
from smca.config import Config
from smca.models import build_model
from smca.predict import (
    ImageError, attention_maps, check_outputs, image_files, load_model, main, output_names, predict, predict_files,
)

TINY = dict(
    backbone="resnet18", hidden_dim=32, nheads=4, num_queries=10, enc_layers=1, dec_layers=2, dim_feedforward=64,
    num_classes=5, device="cpu", eval_size=64, max_size=96,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = Config(**TINY)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "model.pth")
    save_weights(path, build_model(cfg)[0], cfg, {i: f"class {i}" for i in range(5)})
    return path


def _picture(path, seed=0, size=(40, 60)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return str(path)


def _snapshot(folder):
    """{relative path: (is a link, sha256 of the content)} of everything under folder."""
    result = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            content = b"" if os.path.isdir(path) or not os.path.exists(path) else open(path, "rb").read()
            result[os.path.relpath(path, folder)] = (os.path.islink(path), hashlib.sha256(content).hexdigest())
    return result


def _run(checkpoint, *argv):
    main(["--checkpoint", checkpoint, "--device", "cpu", *argv])


def _refused(checkpoint, capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _run(checkpoint, *argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("case", ["hardlink", "someone_elses"])
def test_no_output_replaces_an_input_or_a_file_predict_did_not_write(checkpoint, tmp_path, capsys, case):
    """An output name that lands on an existing file in another folder: the run stops before
    writing anything, naming the file; every file stays as it was."""
    photos = tmp_path / "photos"
    photos.mkdir()
    photo = _picture(photos / "photo.png")
    argv = ["--images", photo, "--output_dir", str(tmp_path / "pred")]
    (tmp_path / "pred").mkdir()
    if case == "hardlink":
        os.link(photo, tmp_path / "pred" / "photo.png")
        message = f"writing photo.png would replace the input image '{photo}'"
    else:  # a file of the same name that is not an input
        _picture(tmp_path / "pred" / "photo.png", seed=3)
        message = "already holds photo.png, which smca.predict did not write"
    before = _snapshot(tmp_path)
    err = _refused(checkpoint, capsys, *argv)
    assert message in err and "give another --output_dir" in err, err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["own_folder", "linked_folder", "attention_picture"])
def test_outputs_beside_the_images_never_take_an_input_name(checkpoint, tmp_path, monkeypatch, case):
    """The issue's example (run where photo.png is, --output_dir .), the folder through a link,
    and an input named like another's attention picture: the pictures take free names, the
    inputs stay as they were."""
    photos = tmp_path / "photos"
    photos.mkdir()
    photo = _picture(photos / "photo.png")
    argv, drawn = ["--images", photo, "--output_dir", str(tmp_path / "pred")], ["photo_1.png"]
    if case == "own_folder":
        monkeypatch.chdir(photos)
        argv = ["--images", "photo.png", "--output_dir", "."]
    elif case == "linked_folder":
        os.symlink(photos, tmp_path / "pred")
    else:  # a's attention picture would be the other input
        other = _picture(photos / "a_attention.png", seed=1)
        a = _picture(photos / "a.jpg", seed=2)
        argv = ["--images", a, other, "--output_dir", str(photos), "--attention_queries"]
        drawn = ["a_1.png", "a_1_attention.png", "a_attention_1.png", "a_attention_1_attention.png"]
    inputs = {p: open(p, "rb").read() for p in map(str, photos.iterdir())}
    _run(checkpoint, *argv)
    assert {p: open(p, "rb").read() for p in inputs} == inputs
    assert sorted(set(os.listdir(photos)) - {os.path.basename(p) for p in inputs}) == sorted(drawn + ["detections.json"])


def test_output_dir_may_be_the_images_folder_and_a_rerun_replaces_only_its_own(checkpoint, tmp_path, capsys):
    """Outputs beside the images when no name collides; a rerun on the folder skips the pictures
    it drew (a note each) and replaces its own files by new ones: a hardlink made to an earlier
    output keeps that output's content."""
    x, y = _picture(tmp_path / "x.jpg", seed=0), _picture(tmp_path / "y.jpg", seed=1)
    inputs = {path: open(path, "rb").read() for path in (x, y)}
    _run(checkpoint, "--images", str(tmp_path), "--output_dir", str(tmp_path), "--threshold", "0")
    assert sorted(os.listdir(tmp_path)) == ["detections.json", "x.jpg", "x.png", "y.jpg", "y.png"]
    kept = tmp_path / "kept.png.bak"
    os.link(tmp_path / "x.png", kept)
    first = kept.read_bytes()
    capsys.readouterr()
    again = ["--threshold", "0", "--max_detections", "1"]
    _run(checkpoint, "--images", str(tmp_path), "--output_dir", str(tmp_path), *again)
    err = capsys.readouterr().err
    for drawn in ("x.png", "y.png"):
        assert f"skipping {tmp_path / drawn}: a picture smca.predict drew" in err
    report = json.loads((tmp_path / "detections.json").read_text())
    assert [(entry["file"], entry["picture"]) for entry in report["images"]] == [(x, "x.png"), (y, "y.png")]
    assert all(len(entry["detections"]) == 1 for entry in report["images"])
    assert kept.read_bytes() == first and (tmp_path / "x.png").read_bytes() != first  # new file, caption changed
    assert {path: open(path, "rb").read() for path in (x, y)} == inputs


def test_images_sharing_a_name_get_pictures_of_their_own(checkpoint, tmp_path):
    """a.jpg and a.png, a.png in another folder, A.PNG (one file on a case-insensitive disk) and
    a_attention.jpg (the attention picture of a): one picture each, detections.json says whose."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    images = [
        _picture(tmp_path / "one" / "a.jpg", 0), _picture(tmp_path / "one" / "a.png", 1),
        _picture(tmp_path / "two" / "a.png", 2), _picture(tmp_path / "two" / "A.PNG", 3),
        _picture(tmp_path / "two" / "a_attention.jpg", 4), _picture(tmp_path / "two" / "a_1.jpg", 5),
    ]
    names = output_names(images)
    files = [f"{n}.png".casefold() for n in names] + [f"{n}_attention.png".casefold() for n in names]
    assert len(set(files)) == len(files), names
    out = tmp_path / "pred"
    _run(checkpoint, "--images", *images, "--output_dir", str(out), "--attention_queries", "0")
    report = json.loads((out / "detections.json").read_text())
    assert [entry["file"] for entry in report["images"]] == images
    assert [entry["picture"] for entry in report["images"]] == [f"{n}.png" for n in names]
    pictures = [f"{n}.png" for n in names] + [f"{n}_attention.png" for n in names]
    assert sorted(os.listdir(out)) == sorted(["detections.json"] + pictures)


def test_folders_and_patterns_take_the_images_among_other_files(tmp_path):
    """Folders and glob patterns give their images, sorted, each file once; every other entry
    is skipped with a one-line note naming it and saying why; files named are taken as they are."""
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    a, b = _picture(folder / "a.png"), _picture(folder / "b.jpg", 1)
    _picture(folder / "sub" / "c.png", 2)
    (folder / "notes.txt").write_text("not a picture")
    (folder / "meta.json").write_text("{}")
    (folder / "fake.jpg").write_text("text with an image extension")
    (folder / "empty.png").write_bytes(b"")
    (folder / "hdf5.png").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(32))  # a format PIL knows but cannot decode
    _picture(folder / ".hidden.png", 3)
    os.symlink(a, folder / "link.png")  # the same file as a.png
    os.link(b, folder / "c_hardlink.jpg")  # the same file as b.jpg
    os.symlink(folder / "gone.png", folder / "dangling.png")
    notes = []
    found = image_files([str(folder), str(folder / "*"), a, str(folder / "sub")], note=notes.append)
    assert found == [a, b, str(folder / "sub" / "c.png")]
    expected = {
        ".hidden.png": "a hidden file", "notes.txt": "not an image file name (.txt)",
        "meta.json": "not an image file name (.json)", "fake.jpg": "cannot be opened as an image",
        "empty.png": "is empty (0 bytes)", "hdf5.png": "is HDF5 data, a format PIL recognises but cannot decode",
        "sub": "a folder", "link.png": f"the same file as {a}", "c_hardlink.jpg": f"the same file as {b}",
        "dangling.png": "a link to nothing",
    }
    for name, reason in expected.items():
        lines = [n for n in notes if n.startswith(f"skipping {folder / name}: ")]
        assert lines and all(reason in line for line in lines), (name, notes)
    assert notes.count(f"skipping {a}: given again") == 2  # through the pattern, then by name
    # the folder's 10; the pattern's 11 (all but the hidden file, and a.png, b.jpg again); a.png named
    assert len(notes) == 10 + 11 + 1
    # A file named is not searched or filtered: read_image says what is wrong with it.
    assert image_files([str(folder / "notes.txt")], note=notes.append) == [str(folder / "notes.txt")]
    # A pattern shows hidden files only when it asks for them, as a shell does.
    assert image_files([str(folder / ".*.png")], note=notes.append) == [str(folder / ".hidden.png")]


def test_the_cli_reads_folders_and_names_what_it_skips(checkpoint, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    a, b = _picture(folder / "a.png"), _picture(folder / "b.jpg", 1)
    (folder / "notes.txt").write_text("not a picture")
    out = tmp_path / "pred"
    _run(checkpoint, "--images", str(folder), f"{folder}/*", "--output_dir", str(out))
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"smca.predict: skipping {folder / 'notes.txt'}: not an image file name (.txt)",
        f"smca.predict: skipping {folder / 'a.png'}: given again",
        f"smca.predict: skipping {folder / 'b.jpg'}: given again",
        f"smca.predict: skipping {folder / 'notes.txt'}: not an image file name (.txt)",
    ]
    assert [entry["file"] for entry in json.loads((out / "detections.json").read_text())["images"]] == [a, b]


@pytest.mark.parametrize(
    "images, output_dir, flags, message",
    [
        (["nope.png"], "pred", [], "image 'nope.png' does not exist"),
        (["nope*.png"], "pred", [], "--images 'nope*.png': the pattern matches no image file"),
        (["texts"], "pred", [], "--images 'texts': the folder holds no image file (the 1 skipped above)"),
        (["texts/*.txt"], "pred", [], "--images 'texts/*.txt': the pattern matches no image file (the 1 skipped"),
        (["x.png"], "x.png", [], "--output_dir 'x.png' is a file, not a folder"),
        (["x.png"], "pred", ["--max_detections", "0"], "--max_detections: expected 1 or more detections per image"),
        (["x.png"], "pred", ["--threshold", "nan"], "--threshold: expected a score, got nan"),
        (["x.png"], "pred", ["--device", "gpu"], "--device gpu: expected cpu, cuda or cuda:N"),
        (["x.png"], "pred", ["--attention_backend", "cuda"], "--attention_backend cuda: not available for cpu tensors"),
    ],
)
def test_bad_paths_and_options_are_named_before_anything_is_written(
    checkpoint, tmp_path, capsys, monkeypatch, images, output_dir, flags, message
):
    monkeypatch.chdir(tmp_path)
    _picture(tmp_path / "x.png")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("words")
    before = _snapshot(tmp_path)
    err = _refused(checkpoint, capsys, "--images", *images, "--output_dir", output_dir, *flags)
    assert f"smca.predict: error: {message}" in err, err
    assert _snapshot(tmp_path) == before


def test_predict_files_checks_its_outputs_as_the_command_line_does(tmp_path):
    """The Python path refuses before it touches the model or writes anything."""
    photo = _picture(tmp_path / "photo.png")
    (tmp_path / "pred").mkdir()
    os.link(photo, tmp_path / "pred" / "photo.png")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="writing photo.png would replace the input image"):
        predict_files(None, [photo], str(tmp_path / "pred"), 0.5, {})
    assert _snapshot(tmp_path) == before
    assert check_outputs([photo], str(tmp_path / "new"), attention=True) == ["photo"]
    assert check_outputs([photo], str(tmp_path), attention=True) == ["photo_1"]
    with pytest.raises(ImageError, match="does not exist"):
        image_files([str(tmp_path / "missing.png")])


@pytest.mark.parametrize("variant", ["smca", "smca_ms", "detr"])
@pytest.mark.parametrize(
    "dtype, box_tolerance",
    [
        pytest.param(torch.float64, 1e-5, id="float64"),
        pytest.param(torch.float16, 5e-3, id="float16"),
        pytest.param(torch.bfloat16, 3e-2, id="bfloat16"),
    ],
)
def test_predict_runs_in_the_model_dtype(variant, dtype, box_tolerance):
    """predict and attention_maps on a .double(), .half() or .bfloat16() model: the model gets
    its input in its dtype and computes in it (its outputs are of that dtype), matches the
    float32 model to the dtype's precision, and the results are of the documented dtypes."""
    torch.manual_seed(0)
    model = build_model(Config(**dict(TINY, model=variant)))[0].eval()
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seen = {}

    def record(module, args, output):
        seen[module.query_embed.weight.dtype] = dict(input=args[0].dtype, boxes=output["pred_boxes"])

    hook = model.register_forward_hook(record)
    predict(model, [image], threshold=0.0)
    expected_maps = attention_maps(model, [image], [0, 3])
    model.to(dtype)
    detections = predict(model, [image], threshold=0.0)[0]
    hook.remove()
    assert seen[dtype]["input"] == dtype and seen[dtype]["boxes"].dtype == dtype
    torch.testing.assert_close(seen[dtype]["boxes"].float(), seen[torch.float32]["boxes"], rtol=0, atol=box_tolerance)
    assert detections["boxes"].dtype == detections["scores"].dtype == torch.float32
    maps = attention_maps(model, [image], [0, 3])
    maps_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for key in ("attention", "prior"):
        if variant == "detr" and key == "prior":
            assert maps[key] is None
            continue
        assert maps[key].dtype == maps_dtype
        torch.testing.assert_close(maps[key].float(), expected_maps[key], rtol=0, atol=box_tolerance)
    assert maps["boxes"].dtype == maps["scores"].dtype == torch.float32


def test_draw_detections_names_a_picture_that_is_not_uint8():
    from smca.visualize import draw_detections

    empty = torch.zeros(0, 4)
    with pytest.raises(ValueError, match=r"image: expected a \(3, H, W\) uint8 picture, got \(3, 8, 8\) torch.float32"):
        draw_detections(torch.rand(3, 8, 8), empty, torch.zeros(0, dtype=torch.long), torch.zeros(0))


def test_a_checkpoint_trained_with_a_kernel_missing_here_loads_with_auto(tmp_path):
    """A model trained on a GPU with the CUDA kernel predicts on a CPU: every backend computes the
    same function, so the checkpoint's backend gives way to "auto" where it cannot run; one asked
    for by name that cannot run is an error naming it."""
    cfg = Config(**dict(TINY, attention_backend="cuda"))
    path = str(tmp_path / "gpu.pth")
    save_weights(path, build_model(Config(**TINY))[0], cfg, {})
    model, loaded, _ = load_model(path, "cpu")
    assert loaded.attention_backend == "auto"
    with pytest.raises(ValueError, match="--attention_backend cuda: not available for cpu tensors here"):
        load_model(path, "cpu", "cuda")
