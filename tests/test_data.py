"""The synthetic data set, the COCO loader, DETR's transforms and the collate function."""

import hashlib
import json
import math
import os

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
