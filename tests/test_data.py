"""The synthetic data set, the COCO loader, DETR's transforms and the collate function."""

import hashlib
import json
import math
import os
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from smca import Config
from smca.data import DatasetError, build_dataloader, build_dataset, collate_fn
from smca.data.synthetic import CATEGORIES, make_dataset, mask_box, render_scene, shape_mask

IMAGE_SIZE = 64


def _tree_digest(root):
    """sha256 of every file under root, by relative path."""
    digest = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digest


def _cfg(root, **kw):
    return Config(coco_path=str(root), min_sizes=(64, 80), eval_size=72, max_size=100, **kw)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_dataset(
        str(tmp_path_factory.mktemp("shapes")), num_train=6, num_val=3, image_size=IMAGE_SIZE, seed=3, max_objects=5
    )


def test_generator_is_deterministic(tmp_path, data_root):
    again = make_dataset(str(tmp_path / "again"), num_train=6, num_val=3, image_size=IMAGE_SIZE, seed=3, max_objects=5)
    other = make_dataset(str(tmp_path / "other"), num_train=6, num_val=3, image_size=IMAGE_SIZE, seed=4, max_objects=5)
    reference = _tree_digest(data_root)
    assert len(reference) == 6 + 3 + 2
    assert _tree_digest(again) == reference
    other_digest = _tree_digest(other)
    assert other_digest.keys() == reference.keys()
    assert all(other_digest[k] != reference[k] for k in reference if k.endswith(".png"))


def test_coco_layout(data_root):
    for split, count, first_id in (("train", 6, 1), ("val", 3, 7)):
        with open(os.path.join(data_root, "annotations", f"instances_{split}2017.json")) as f:
            coco = json.load(f)
        assert [c["name"] for c in coco["categories"]] == list(CATEGORIES)
        assert [img["id"] for img in coco["images"]] == list(range(first_id, first_id + count))
        for img in coco["images"]:
            with Image.open(os.path.join(data_root, f"{split}2017", img["file_name"])) as pil:
                assert pil.size == (img["width"], img["height"])
                assert max(pil.size) <= IMAGE_SIZE
        per_image = {img["id"]: 0 for img in coco["images"]}
        for ann in coco["annotations"]:
            per_image[ann["image_id"]] += 1
            x, y, w, h = ann["bbox"]
            img = next(i for i in coco["images"] if i["id"] == ann["image_id"])
            assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= len(CATEGORIES)
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= img["width"] and y + h <= img["height"]
            assert 0 < ann["area"] <= w * h
        assert all(1 <= n <= 5 for n in per_image.values())


def test_box_is_the_drawn_extent():
    """A shape alone on a flat background: its box is exactly the extent of the changed pixels."""
    seen = set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        background = np.full((50, 70, 3), 128, dtype=np.uint8)
        image, objects = render_scene(rng, background, num_objects=1)
        assert len(objects) == 1
        changed = (image != background).any(axis=2)
        assert objects[0]["bbox"] == mask_box(changed)
        assert objects[0]["area"] == changed.sum()
        seen.add(objects[0]["category_id"])
    assert seen == set(range(1, len(CATEGORIES) + 1))


@pytest.mark.parametrize("category", CATEGORIES)
def test_box_is_clipped_to_the_image(category):
    mask = shape_mask(category, center=(-3.0, 20.0), half_size=(12.0, 8.0), rotation=0.3, image_size=(40, 40))
    x, y, w, h = mask_box(mask)
    assert x == 0 and 0 < w < 12
    assert mask[:, :w].any(axis=0).all() and not mask[:, w:].any()
    assert mask[y].any() and mask[y + h - 1].any() and not mask[:y].any() and not mask[y + h :].any()


def test_occlusion_keeps_boxes_exact():
    """Boxes are the extent of the visible pixels: re-rendering each object's visible mask agrees."""
    rng = np.random.default_rng(11)
    background = np.zeros((80, 80, 3), dtype=np.uint8)
    image, objects = render_scene(rng, background, num_objects=8, min_rel_size=0.2, max_rel_size=0.4)
    assert len(objects) >= 4
    visible_union = np.zeros((80, 80), dtype=bool)
    for obj in objects:
        x, y, w, h = obj["bbox"]
        visible_union[y : y + h, x : x + w] = True
    changed = (image != background).any(axis=2)
    # Every drawn pixel lies in some box, and the union of boxes spans exactly the drawn extent.
    assert not (changed & ~visible_union).any()
    assert mask_box(changed) == mask_box(visible_union)


def test_colour_by_category_gives_each_category_its_hue():
    """Every shape is drawn in its category's hue (+-15 degrees), whatever the background."""
    import colorsys

    from smca.data.synthetic import CATEGORY_HUES

    seen = set()
    for seed in range(6):
        rng = np.random.default_rng(seed)
        background = np.full((96, 96, 3), 128, dtype=np.uint8)
        image, objects = render_scene(rng, background, num_objects=4, colour_by_category=True)
        for obj in objects:
            x, y, w, h = obj["bbox"]
            patch = image[y : y + h, x : x + w].reshape(-1, 3).astype(np.float64)
            drawn = patch[np.abs(patch - 128).sum(axis=1) > 40]  # the shape's pixels, not the grey
            hue = colorsys.rgb_to_hsv(*(np.median(drawn, axis=0) / 255))[0] * 360
            distance = abs((hue - CATEGORY_HUES[obj["category_id"] - 1] + 180) % 360 - 180)
            assert distance <= 15 + 6, (obj, hue)  # shading and grain move the hue a little
            seen.add(obj["category_id"])
    assert len(seen) == len(CATEGORIES)


def test_bad_relative_sizes_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="rel_sizes must satisfy"):
        make_dataset(str(tmp_path), num_train=1, num_val=1, rel_sizes=(0.4, 0.2))


def test_val_sample_targets(data_root):
    dataset = build_dataset("val", _cfg(data_root))
    with open(os.path.join(data_root, "annotations", "instances_val2017.json")) as f:
        coco = json.load(f)
    image, target = dataset[0]
    info = coco["images"][0]
    anns = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
    height, width = image.shape[-2:]
    assert image.dtype == torch.float32 and image.shape[0] == 3
    assert min(height, width) == 72 or max(height, width) == 100
    assert target["image_id"].item() == info["id"]
    assert target["orig_size"].tolist() == [info["height"], info["width"]]
    assert target["size"].tolist() == [height, width]
    assert target["labels"].tolist() == [a["category_id"] for a in anns]
    # Evaluation only resizes, which scales boxes with the image: normalised boxes are unchanged.
    expected = torch.tensor(
        [
            [(x + w / 2) / info["width"], (y + h / 2) / info["height"], w / info["width"], h / info["height"]]
            for x, y, w, h in (a["bbox"] for a in anns)
        ]
    )
    torch.testing.assert_close(target["boxes"], expected)
    # ImageNet normalisation: roughly zero mean, unit spread.
    assert -3 < image.mean().item() < 3 and image.std().item() > 0.1


def test_train_augmentation_keeps_boxes_valid(data_root):
    dataset = build_dataset("train", _cfg(data_root))
    torch.manual_seed(0)
    sizes = set()
    for _ in range(3):
        for index in range(len(dataset)):
            image, target = dataset[index]
            sizes.add(tuple(image.shape[-2:]))
            boxes = target["boxes"]
            assert boxes.shape == (len(target["labels"]), 4)
            assert (boxes >= 0).all() and (boxes <= 1).all() and (boxes[:, 2:] > 0).all()
            # The box stays inside the image: cx - w/2 >= 0 and cx + w/2 <= 1.
            assert (boxes[:, :2] - boxes[:, 2:] / 2 >= -1e-6).all() and (
                boxes[:, :2] + boxes[:, 2:] / 2 <= 1 + 1e-6
            ).all()
            assert max(image.shape[-2:]) <= 100
    assert len(sizes) > 3  # random resizes and crops


@pytest.mark.parametrize("image_set", ["train", "val"])
def test_boxes_at_the_image_edge_survive_the_transforms(image_set):
    """Resizing to whole pixels must not push an edge-touching box out of the image (and so out
    of the targets); a box covering the whole image covers every crop and resize of it."""
    from torchvision import tv_tensors

    from smca.data.transforms import make_transforms

    transforms = make_transforms(image_set, min_sizes=(96, 112, 128, 144), eval_size=128, max_size=192)
    image = torch.zeros(3, 125, 110, dtype=torch.uint8)
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[0.0, 0.0, 110.0, 125.0], [81.0, 90.0, 110.0, 125.0]]), format="XYXY", canvas_size=(125, 110)
    )
    torch.manual_seed(0)
    for _ in range(40):
        out, target = transforms(image, {"boxes": boxes, "labels": torch.tensor([1, 2])})
        height, width = out.shape[-2:]
        assert target["labels"][0] == 1
        torch.testing.assert_close(target["boxes"][0], torch.tensor([0.0, 0.0, width, height]))
        if image_set == "val":
            assert target["labels"].tolist() == [1, 2]


def test_augmentation_is_reproducible(data_root):
    dataset = build_dataset("train", _cfg(data_root))
    samples = []
    for _ in range(2):
        torch.manual_seed(5)
        samples.append([dataset[i] for i in range(len(dataset))])
    for (img_a, tgt_a), (img_b, tgt_b) in zip(*samples):
        assert torch.equal(img_a, img_b) and torch.equal(tgt_a["boxes"], tgt_b["boxes"])


def test_collate_pads_and_masks(data_root):
    dataset = build_dataset("val", _cfg(data_root))
    loader = build_dataloader(dataset, batch_size=3, num_workers=0, train=False)
    images, pixel_mask, targets = next(iter(loader))
    samples = [dataset[i] for i in range(3)]
    height = max(s[0].shape[1] for s in samples)
    width = max(s[0].shape[2] for s in samples)
    assert images.shape == (3, 3, height, width) and pixel_mask.shape == (3, height, width)
    assert pixel_mask.dtype == torch.bool and len(targets) == 3
    for b, (image, target) in enumerate(samples):
        h, w = image.shape[-2:]
        assert torch.equal(images[b, :, :h, :w], image)
        assert not pixel_mask[b, :h, :w].any() and pixel_mask[b, h:, :].all() and pixel_mask[b, :, w:].all()
        assert targets[b]["image_id"] == target["image_id"]
    again = collate_fn(samples)
    assert torch.equal(again[0], images) and torch.equal(again[1], pixel_mask)


def test_training_loader_drops_incomplete_batch(data_root):
    dataset = build_dataset("train", _cfg(data_root))
    loader = build_dataloader(dataset, batch_size=4, num_workers=0, train=True)
    assert [len(t) for _, _, t in loader] == [4]


def _copy_layout(data_root, tmp_path):
    root = tmp_path / "bad"
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    with open(os.path.join(data_root, "annotations", "instances_val2017.json")) as f:
        return root, json.load(f)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset("train", _cfg(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="train2017"):
        build_dataset("train", _cfg(tmp_path / "empty"))


def test_invalid_json_is_a_clear_error(data_root, tmp_path):
    root, _ = _copy_layout(data_root, tmp_path)
    (root / "annotations" / "instances_val2017.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match="not a valid COCO annotation file"):
        build_dataset("val", _cfg(root))
    (root / "annotations" / "instances_val2017.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="not a valid COCO annotation file"):
        build_dataset("val", _cfg(root))


@pytest.mark.parametrize(
    "bbox, message",
    [([1, 2, -3, 4], "negative width or height"), ([1, 2, 3], "4 numbers"), ([0, 0, math.inf, 1], "non-finite")],
)
def test_bad_box_is_a_clear_error(data_root, tmp_path, bbox, message):
    root, coco = _copy_layout(data_root, tmp_path)
    coco["annotations"][0]["bbox"] = bbox
    # json writes inf as Infinity, which Python's json (and pycocotools) reads back.
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match=message):
        build_dataset("val", _cfg(root))


# Bad data found at build time and named; images read as they look (smca.data.image).


def _small_set(tmp_path, num_images=2, split="val"):
    """A COCO root with `num_images` 40x30 RGB PNGs in split2017/ and their instances dict (one
    box each); write it with _write_annotations after changing it."""
    root = tmp_path / "small"
    for folder in ("train2017", "val2017", "annotations"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(1, num_images + 1):
        Image.new("RGB", (40, 30), (10 * i, 20, 30)).save(root / f"{split}2017" / f"{i}.png")
        images.append(dict(id=i, file_name=f"{i}.png", width=40, height=30))
        annotations.append(dict(id=i, image_id=i, category_id=1, bbox=[2, 3, 20, 10], area=200, iscrowd=0))
    coco = dict(images=images, annotations=annotations, categories=[dict(id=1, name="thing")])
    return root, coco


def _write_annotations(root, coco, split="val"):
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco))
    return root


def _build(root, split="val"):
    return build_dataset(split, _cfg(root))


@pytest.mark.parametrize(
    "image_id", ["img_1", "1", 1.5, True, None, [1], 2**63], ids=lambda v: type(v).__name__ + repr(v)[:8]
)
def test_image_id_that_is_not_an_integer_is_a_clear_error(tmp_path, image_id):
    root, coco = _small_set(tmp_path)
    coco["images"][1]["id"] = image_id
    coco["annotations"][1]["image_id"] = image_id
    _write_annotations(root, coco)
    with pytest.raises(DatasetError, match=f"image '2.png' has id .*; COCO image ids are integers"):
        _build(root)


def test_missing_image_id_is_a_clear_error(tmp_path):
    root, coco = _small_set(tmp_path)
    del coco["images"][1]["id"]
    _write_annotations(root, coco)
    with pytest.raises(DatasetError, match="image '2.png' has id None; COCO image ids are integers"):
        _build(root)


def test_whole_float_ids_are_integers(tmp_path):
    """1.0 (as some converters write) is id 1: the sample's image_id and COCO's evaluation (whose
    faster_coco_eval backend refuses float annotation ids) both work."""
    from smca.engine import coco_evaluate

    root, coco = _small_set(tmp_path)
    for ann in coco["annotations"]:
        ann["id"], ann["image_id"], ann["category_id"] = float(ann["id"]), float(ann["image_id"]), 1.0
    for image in coco["images"]:
        image["id"] = float(image["id"])
    coco["categories"][0]["id"] = 1.0
    dataset = _build(_write_annotations(root, coco))
    assert dataset.ids == [1, 2] and dataset[1][1]["image_id"].item() == 2
    truth = [dict(image_id=i, category_id=1, bbox=[2, 3, 20, 10], score=1.0) for i in (1, 2)]
    for backend in ("pycocotools", "faster_coco_eval"):
        assert coco_evaluate(dataset.coco, truth, dataset.ids, backend=backend, verbose=False)[0] == 1.0


def _edit(coco, case):
    """Break `coco` in place the way `case` names."""
    images, annotations, categories = coco["images"], coco["annotations"], coco["categories"]
    if case == "duplicate_image_id":
        images[1]["id"] = 1
    elif case == "images_not_a_list":
        coco["images"] = {"1": images[0]}
    elif case == "image_not_an_object":
        images[1] = "2.png"
    elif case == "no_file_name":
        del images[1]["file_name"]
    elif case == "file_name_not_a_string":
        images[1]["file_name"] = 2
    elif case == "annotation_on_unknown_image":
        annotations[1]["image_id"] = 99
    elif case == "annotation_on_string_image_id":
        annotations[1]["image_id"] = "2"
    elif case == "duplicate_annotation_id":
        annotations[1]["id"] = 1
    elif case == "annotation_without_id":
        del annotations[1]["id"]
    elif case == "annotation_with_string_id":
        annotations[1]["id"] = "a2"
    elif case == "unknown_category":
        annotations[1]["category_id"] = 7
    elif case == "string_iscrowd":
        annotations[1]["iscrowd"] = "0"
    elif case == "string_area":
        annotations[1]["area"] = "200"
    elif case == "negative_area":
        annotations[1]["area"] = -1
    elif case == "no_categories":
        del coco["categories"]
    elif case == "string_category_id":
        categories[0]["id"] = "thing"
    elif case == "negative_category_id":
        categories[0]["id"] = -1
        for ann in annotations:
            ann["category_id"] = -1
    elif case == "duplicate_category_id":
        categories.append(dict(id=1, name="other"))
    elif case == "category_without_name":
        del categories[0]["name"]
    elif case == "same_file_under_two_ids":
        images[1]["file_name"] = "./1.png"
    elif case == "annotated_twice":
        annotations[1].update(image_id=1, bbox=list(annotations[0]["bbox"]))
    elif case == "same_category_under_two_ids":
        categories.append(dict(id=7, name="thing"))
    elif case == "box_outside_its_image":
        annotations[1]["bbox"] = [45, 3, 20, 10]  # x from 45 on a 40-wide image
    elif case == "xyxy_box_with_negative_size":
        annotations[1]["bbox"] = [20, 15, 5, 10 - 15]  # [x1, y1, x2, y2] with y2 < y1 read as [x, y, w, h]


@pytest.mark.parametrize(
    "case, message",
    [
        ("duplicate_image_id", r"image id 1 is listed twice \('1.png', '2.png'\)"),
        ("images_not_a_list", "'images' must be a list of JSON objects"),
        ("image_not_an_object", "'images' must be a list of JSON objects"),
        ("no_file_name", "image id 2: file_name must be a file name, got None"),
        ("file_name_not_a_string", "image id 2: file_name must be a file name, got 2"),
        ("annotation_on_unknown_image", "annotation 2 of image 99: image_id 99 is not among the listed images"),
        ("annotation_on_string_image_id", "annotation 2 of image '2': image_id '2' is not among the listed images"),
        ("duplicate_annotation_id", "annotation 1 of image 2: annotation id 1 is used twice"),
        ("annotation_without_id", "annotation None of image 2: COCO annotation ids are integers"),
        ("annotation_with_string_id", "annotation 'a2' of image 2: COCO annotation ids are integers"),
        ("unknown_category", "category_id 7 is not among the listed categories"),
        ("string_iscrowd", "annotation 2 of image 2: iscrowd must be 0 or 1, got '0'"),
        ("string_area", "annotation 2 of image 2: area must be a finite number >= 0, got '200'"),
        ("negative_area", "area must be a finite number >= 0, got -1"),
        ("no_categories", "no categories listed"),
        ("string_category_id", r"category 'thing' has id 'thing'; expected an integer >= 0"),
        ("negative_category_id", r"category 'thing' has id -1; expected an integer >= 0"),
        ("duplicate_category_id", "category id 1 is listed twice"),
        ("category_without_name", "category id 1: name must be a string, got None"),
        ("same_file_under_two_ids", r"image ids 1 and 2 are the same file './1.png': .* list the file once"),
        ("annotated_twice", r"annotation 2 of image 1: the same box \[2, 3, 20, 10\] of category 1 on image 1 as "
         "annotation 1: .*remove one of them"),
        ("same_category_under_two_ids", "categories 1 and 7 are both 'thing': .* merge them into one category"),
        ("box_outside_its_image", r"1 boxes lie wholly outside their image \(annotation 2 of image 2: bbox "
         r"\[45, 3, 20, 10\] on a 40x30 image\); usual causes: a bbox written as \[x1, y1, x2, y2\]"),
        ("xyxy_box_with_negative_size", r"bbox \[20, 15, 5, -5\] has a negative width or height \(COCO's bbox"),
    ],
)
def test_malformed_entry_is_a_clear_error(tmp_path, case, message):
    root, coco = _small_set(tmp_path)
    _edit(coco, case)
    _write_annotations(root, coco)
    with pytest.raises(DatasetError, match=message) as error:
        _build(root)
    assert str(error.value).startswith(str(root / "annotations" / "instances_val2017.json"))


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_missing_area_and_iscrowd_are_filled_for_the_evaluation(tmp_path, backend):
    """Without them pycocotools' evaluation fails with a KeyError after an epoch, and
    faster_coco_eval counts a 40x40 box as small; its box area makes it medium."""
    from smca.engine import coco_evaluate

    root, coco = _small_set(tmp_path)
    for ann in coco["annotations"]:
        ann["bbox"] = [0, 0, 40, 30]  # 1200 pixels: medium (32^2 .. 96^2)
        del ann["area"], ann["iscrowd"]
    dataset = _build(_write_annotations(root, coco))
    assert [a["area"] for a in dataset.coco.dataset["annotations"]] == [1200, 1200]
    truth = [dict(image_id=i, category_id=1, bbox=[0, 0, 40, 30], score=1.0) for i in (1, 2)]
    stats = coco_evaluate(dataset.coco, truth, dataset.ids, backend=backend, verbose=False)
    assert stats[0] == 1.0 and stats[3] == -1 and stats[4] == 1.0  # AP, APs (none), APm


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("empty", r"is empty \(0 bytes\)"),
        ("not_an_image", "cannot be opened as an image"),
        ("folder", "is not a file"),
        ("float_pixels", r"has 32-bit floating-point pixels \(PIL mode F\)"),
    ],
)
def test_unreadable_image_file_is_found_at_build_time(tmp_path, kind, message):
    root, coco = _small_set(tmp_path)
    path = root / "val2017" / "2.png"
    path.unlink()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "not_an_image":
        path.write_text("<html>404 Not Found</html>")
    elif kind == "folder":
        path.mkdir()
    elif kind == "float_pixels":
        Image.new("F", (40, 30), 0.5).save(path, format="TIFF")
    _write_annotations(root, coco)
    ann_file = root / "annotations" / "instances_val2017.json"
    with pytest.raises(DatasetError) as error:
        _build(root)
    text = str(error.value)
    assert text.startswith(f"{ann_file}: 1 of the 2 listed images cannot be read: image id 2: image '{path}' ")
    assert re.search(message, text)


def test_many_missing_image_files_are_counted(tmp_path):
    root, coco = _small_set(tmp_path, num_images=8)
    for i in range(2, 9):
        (root / "val2017" / f"{i}.png").unlink()
    _write_annotations(root, coco)
    with pytest.raises(DatasetError, match="7 of the 8 listed images cannot be read: image id 2: ") as error:
        _build(root)
    named = re.findall(r"image id (\d+): image '[^']*' does not exist", str(error.value))
    assert named == ["2", "3", "4", "5", "6"] and str(error.value).endswith("; and 2 more")


@pytest.mark.parametrize("name", ["2.png", "2.jpg"])
def test_truncated_image_names_file_and_id_when_read(tmp_path, name):
    """Only decoding shows a truncated file: the data set builds, reading the sample raises
    DatasetError with the file and the image id (through a loader's worker process:
    test_train.py)."""
    root, coco = _small_set(tmp_path)
    path = root / "val2017" / name
    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    coco["images"][1]["file_name"] = name
    dataset = _build(_write_annotations(root, coco))
    expected = f"image id 2: image '{path}' cannot be decoded (OSError: image file is truncated"
    loader = build_dataloader(dataset, batch_size=2, num_workers=0, train=False)
    with pytest.raises(DatasetError) as error:
        next(iter(loader))
    assert f"instances_val2017.json: {expected}" in str(error.value)


def test_listed_size_that_differs_is_a_warning_and_the_file_wins(tmp_path):
    root, coco = _small_set(tmp_path, num_images=3)
    for image in coco["images"][1:]:
        image["width"], image["height"] = 30, 40
    _write_annotations(root, coco)
    message = r"2 of the 3 images differ in size .* image id 2, '2.png', is 40x30 as displayed"
    with pytest.warns(UserWarning, match=message):
        dataset = _build(root)
    assert dataset[1][1]["orig_size"].tolist() == [30, 40]


def test_exif_rotated_image_is_upright_with_its_boxes(tmp_path):
    """A photo stored sideways (EXIF orientation 6) and listed, and annotated, as displayed."""
    root, coco = _small_set(tmp_path, num_images=1)
    stored = np.zeros((30, 40, 3), dtype=np.uint8)  # 40 wide as stored, 30 wide as displayed
    stored[:, :20] = 255  # stored left half white: the displayed top half
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(root / "val2017" / "1.png", exif=exif.tobytes())
    coco["images"][0].update(width=30, height=40)
    coco["annotations"][0]["bbox"] = [0, 0, 30, 20]  # the white half
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = _build(_write_annotations(root, coco))
    image, target = dataset[0]
    assert target["orig_size"].tolist() == [40, 30]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.25, 1.0, 0.5]]))
    height = image.shape[1]
    assert image[:, : height // 2 - 2].mean() > image[:, height // 2 + 2 :].mean() + 3  # white above black


def test_16_bit_image_is_not_white(tmp_path):
    """A 16-bit grey PNG (PIL mode I;16) reads as the 8-bit one of value / 257, not as white."""
    root, coco = _small_set(tmp_path, num_images=2)
    ramp = np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50
    Image.fromarray(ramp).save(root / "val2017" / "1.png")
    eight_bit = (ramp.astype(np.int64) * 255 + 32767) // 65535  # value / 257, rounded
    Image.fromarray(eight_bit.astype(np.uint8)).save(root / "val2017" / "2.png")
    dataset = _build(_write_annotations(root, coco))
    with Image.open(root / "val2017" / "1.png") as opened:
        assert opened.mode == "I;16"
    assert torch.equal(dataset[0][0], dataset[1][0])


def test_pretrain_backbone_names_bad_data(tmp_path, capsys):
    from smca import pretrain_backbone

    root, coco = _small_set(tmp_path, split="train")
    coco["images"][0]["id"] = "img_1"
    _write_annotations(root, coco, split="train")
    out = tmp_path / "backbone.pth"
    with pytest.raises(SystemExit) as exit_info:
        pretrain_backbone.main(["--coco_path", str(root), "--out", str(out), "--device", "cpu", "--num_workers", "0"])
    assert exit_info.value.code == 2
    assert "image '1.png' has id 'img_1'; COCO image ids are integers" in capsys.readouterr().err
    assert not out.exists()


def test_annotation_file_with_a_byte_order_mark_reads(tmp_path):
    """Windows editors start UTF-8 files with a byte-order mark, which json refuses by default."""
    root, coco = _small_set(tmp_path)
    coco["categories"][0]["name"] = "Fahrrad-Straße"
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco), encoding="utf-8-sig")
    assert _build(root).categories == {1: "Fahrrad-Straße"}


@pytest.mark.parametrize("root, message", [(None, "--coco_path: required"), ("", "--coco_path: required"),
                                           ("/no/such/dir", "data directory '/no/such/dir' does not exist")])
def test_missing_coco_path_is_named(root, message):
    from smca.data.coco import coco_paths

    with pytest.raises(DatasetError, match=message):
        coco_paths(root, "train")


@pytest.mark.parametrize(
    "case, message",
    [
        ("zero_width", r"2 boxes have a width or height of 0 \(annotation 1 of image 1; annotation 2 of image 2\); "
         "training leaves them out"),
        ("beyond_the_image", r"1 of 2 boxes reach more than 1 pixel beyond their image \(annotation 2 of image 2: "
         r"bbox \[30, 3, 20, 10\] on a 40x30 image\); they are clipped"),
    ],
)
def test_doubtful_boxes_are_a_warning_naming_them(tmp_path, case, message):
    root, coco = _small_set(tmp_path)
    if case == "zero_width":
        for ann in coco["annotations"]:
            ann["bbox"][2] = 0
    else:
        coco["annotations"][1]["bbox"] = [30, 3, 20, 10]  # to x 50 on a 40-wide image
    with pytest.warns(UserWarning, match=message) as record:
        dataset = _build(_write_annotations(root, coco))
    assert all(str(w.message).startswith(str(root / "annotations" / "instances_val2017.json")) for w in record)
    if case == "beyond_the_image":
        assert dataset[1][1]["boxes"][0, 0] + dataset[1][1]["boxes"][0, 2] / 2 == pytest.approx(1.0)  # clipped


def test_a_box_within_a_pixel_of_the_edge_is_no_warning(tmp_path):
    """Annotation tools round; COCO has boxes reaching a fraction of a pixel beyond the image."""
    root, coco = _small_set(tmp_path)
    coco["annotations"][1]["bbox"] = [-0.5, 2, 40.9, 28.6]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _build(_write_annotations(root, coco))


COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # COCO's 80


@pytest.mark.parametrize(
    "ids, num_classes, expected",
    [
        (COCO_IDS, None, None),  # COCO: the head index is the id (91 logits), as DETR's checkpoints have it
        (COCO_IDS, 91, None),
        (range(1, 7), None, None),
        ([0], None, None),
        ([2], None, None),
        ([74673216], None, [74673216]),  # one category as a database numbers it: one logit
        ([3, 7, 1_000_000], None, [3, 7, 1_000_000]),
        ([3, 7, 1_000_000], 3, [3, 7, 1_000_000]),
        ([1, 2], 10, None),  # a given head that holds the ids: indexed by them
        ([], None, None),
    ],
)
def test_class_ids(ids, num_classes, expected):
    from smca.data.coco import class_ids

    assert class_ids(ids, num_classes) == expected


def test_class_ids_that_fit_no_head_are_a_clear_error():
    from smca.data.coco import class_ids

    with pytest.raises(ValueError, match=r"4 classes cannot stand for the 3 category ids \[5, 9, 70\]"):
        class_ids([70, 5, 9], 4)


def test_set_classes_maps_the_labels_and_names_categories_without_a_class(tmp_path):
    root, coco = _small_set(tmp_path)
    coco["categories"] = [dict(id=74673216, name="thing"), dict(id=99999999, name="other")]
    coco["annotations"][0]["category_id"], coco["annotations"][1]["category_id"] = 99999999, 74673216
    dataset = _build(_write_annotations(root, coco))
    assert dataset[0][1]["labels"].tolist() == [99999999]  # no classes set: the ids
    dataset.set_classes([74673216, 99999999], 2)
    assert [dataset[i][1]["labels"].tolist() for i in (0, 1)] == [[1], [0]]
    assert dataset.class_ids == [74673216, 99999999]
    with pytest.raises(DatasetError, match=r"annotations of category ids \[99999999\] have no class in the model, "
                       r"whose 1 classes stand for the category ids \[74673216\]: list the same categories"):
        dataset.set_classes([74673216], 1)
    with pytest.raises(DatasetError, match=r"category ids \[74673216, 99999999\] have no class .* ids 0..90"):
        dataset.set_classes(None, 91)
