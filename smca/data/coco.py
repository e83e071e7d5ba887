"""COCO detection through torchvision's CocoDetection, with DETR's targets.

A data root in the COCO layout (the real COCO 2017 or the built-in synthetic set):

    root/train2017/   root/val2017/   root/annotations/instances_{train,val}2017.json

Each sample is (image (3, H, W) float normalised, target) with target
    labels (n,) int64 classes: the category ids, or after set_classes the class each category
    is (class_ids: one per category for ids far beyond their count); boxes (n, 4) float32
    cxcywh normalised by the transformed, unpadded image size (H, W); image_id () int64;
    orig_size (2,) int64 (h, w) of the image read; size (2,) int64 (H, W) after the transforms.
Crowd annotations are left out (as DETR does) and so are boxes of zero width or height.
Images are read as a person sees them (smca.data.image.read_image: upright, 16-bit spread from
black to white, transparency over white), and boxes are taken in that picture's pixels.

Bad data is reported as early as it can be found, naming the file and the image id. Building
the data set checks the whole annotation file (integer ids, no id listed twice, every
annotation on a listed image and category, well-formed boxes; errors for what would silently
teach wrong targets: a file under two image ids, an object annotated twice, two category ids of
one name and supercategory, a box wholly outside its image; warnings for boxes reaching more
than BOX_MARGIN pixels beyond it or of zero width or height) and opens the header of every
listed image file (some 30 us an image: COCO's 118k training images in a few seconds), so a
missing, empty or non-image file or one of a mode with no standard look stops the run before
training starts. An annotation without "area" gets its box's area and one without "iscrowd"
gets 0, as COCO's evaluation needs both; ids written as whole floats (1.0) are read as integers.
When a file's displayed size differs from the width and height listed for it, a warning says
so and the file is trusted. Damage that only decoding shows (a truncated PNG or JPEG) is found
when the image is first read: the sample raises DatasetError, which stops the run rather than
skipping the image (a skipped image would change what is trained or evaluated, unseen);
smca.train keeps the last checkpoint, so once the file is fixed --resume continues.
"""

import contextlib
import io
import json
import math
import os
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torchvision
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as F

from ..utils import pad_images
from .image import ImageError, image_size, read_image
from .transforms import make_transforms

__all__ = [
    "DatasetError",
    "CocoDetection",
    "build_dataset",
    "collate_fn",
    "build_dataloader",
    "coco_paths",
    "read_categories",
    "class_ids",
]


# Of many unreadable image files, the error names this many.
MAX_NAMED = 5


class DatasetError(ValueError):
    """The data directory, an annotation file or an image file is missing or malformed."""


def coco_paths(root: str, image_set: str) -> Tuple[str, str]:
    """(image folder, annotation file) of `image_set` ("train" | "val") under a COCO root.

    Raises DatasetError naming what is missing.
    """
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set: expected 'train' or 'val', got {image_set!r}")
    if not root:
        raise DatasetError("--coco_path: required, a folder with train2017/, val2017/ and annotations/ inside")
    if not os.path.isdir(root):
        raise DatasetError(
            f"data directory {root!r} does not exist (expected train2017/, val2017/ and annotations/ inside)"
        )
    img_folder = os.path.join(root, f"{image_set}2017")
    ann_file = os.path.join(root, "annotations", f"instances_{image_set}2017.json")
    if not os.path.isdir(img_folder):
        raise DatasetError(f"image folder {img_folder!r} does not exist")
    if not os.path.isfile(ann_file):
        raise DatasetError(f"annotation file {ann_file!r} does not exist")
    return img_folder, ann_file


def _load_annotations(ann_file: str) -> Dict[str, Any]:
    """The annotation file's JSON object; DatasetError when it is not valid JSON or not an object."""
    try:
        with open(ann_file, encoding="utf-8-sig") as f:  # -sig: also with the byte-order mark some editors write
            dataset = json.load(f)
    except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError
        raise DatasetError(f"{ann_file}: not a valid COCO annotation file ({type(err).__name__}: {err})") from err
    if not isinstance(dataset, dict):
        raise DatasetError(
            f"{ann_file}: not a valid COCO annotation file (expected a JSON object, got a {type(dataset).__name__})"
        )
    return dataset


def _as_id(value: Any) -> Optional[int]:
    """A COCO id as an int: a JSON integer in int64's range, or a whole float (1.0, as some
    converters write); None for anything else (strings, true/false, 1.5, null)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
        return value
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _entries(dataset: Dict[str, Any], key: str, ann_file: str) -> List[Dict[str, Any]]:
    """dataset[key] (absent: []), which must be a list of JSON objects."""
    entries = dataset.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise DatasetError(f"{ann_file}: {key!r} must be a list of JSON objects")
    return entries


def _check_categories(dataset: Dict[str, Any], ann_file: str) -> Set[int]:
    """The ids of dataset's categories (made ints), each checked: an integer id >= 0 listed once
    and a name; DatasetError naming the entry otherwise, and naming two ids of the same name and
    supercategory (a merged export: one kind of object taught as two competing classes)."""
    categories = _entries(dataset, "categories", ann_file)
    if not categories:
        raise DatasetError(f"{ann_file}: no categories listed")
    category_ids = set()
    named: Dict[Tuple[str, Any], int] = {}
    for category in categories:
        category_id = _as_id(category.get("id"))
        if category_id is None or category_id < 0:
            raise DatasetError(
                f"{ann_file}: category {category.get('name')!r} has id {category.get('id')!r}; "
                "expected an integer >= 0 (it indexes the class logits)"
            )
        if category_id in category_ids:
            raise DatasetError(f"{ann_file}: category id {category_id} is listed twice")
        if not isinstance(category.get("name"), str):
            raise DatasetError(
                f"{ann_file}: category id {category_id}: name must be a string, got {category.get('name')!r}"
            )
        kind = (category["name"], category.get("supercategory"))
        if kind in named:
            raise DatasetError(
                f"{ann_file}: categories {named[kind]} and {category_id} are both {category['name']!r}"
                + (f" (supercategory {kind[1]!r})" if kind[1] is not None else "")
                + ": the model would learn one kind of object as two competing classes; merge them into one "
                f"category (give the annotations of id {category_id} category_id {named[kind]}) or rename one"
            )
        named[kind] = category_id
        category["id"] = category_id
        category_ids.add(category_id)
    return category_ids


def class_ids(category_ids: Iterable[int], num_classes: Optional[int] = None) -> Optional[List[int]]:
    """The category id that each class logit stands for.

    None: the logits are indexed by the category ids themselves (label = category id), as in
    DETR and the paper's code (COCO: ids 1..90 with gaps, 91 logits), so their checkpoints
    convert as they are; a list: the ids in increasing order, class i standing for ids[i].

    num_classes None (a model made for this data): identity while the largest id is at most
    twice the number of categories (COCO: 90 <= 2 x 80), else the list (ids as databases and
    annotation tools write them, 74673216 for one category, would otherwise make a head of
    that many logits). num_classes given (a model's, a checkpoint's): identity when every id is
    below it, else the list when there are exactly num_classes ids; ValueError otherwise.
    Without ids: None.
    """
    ids = sorted(set(category_ids))
    if not ids:
        return None
    if num_classes is None:
        return None if ids[-1] <= 2 * len(ids) else ids
    if ids[-1] < num_classes:
        return None
    if len(ids) == num_classes:
        return ids
    raise ValueError(
        f"{num_classes} classes cannot stand for the {len(ids)} category ids {_shown(ids)}: their logits are "
        f"either indexed by the ids (which needs every id below {num_classes}) or one per category "
        f"(which needs {len(ids)} classes)"
    )


def _shown(ids: Sequence[int], limit: int = 10) -> str:
    """[1, 2, 3] or [1, 2, ..., 99] (at most `limit` ids)."""
    if len(ids) <= limit:
        return str(list(ids))
    return "[" + ", ".join(map(str, ids[: limit - 1])) + f", ..., {ids[-1]}]"


def read_categories(ann_file: str) -> Dict[int, str]:
    """{category id: name} of a COCO-format annotation file; DatasetError when it is missing or
    its categories are malformed (see _check_annotations)."""
    if not os.path.isfile(ann_file):
        raise DatasetError(f"annotation file {ann_file!r} does not exist")
    dataset = _load_annotations(ann_file)
    _check_categories(dataset, ann_file)
    return {c["id"]: c["name"] for c in dataset["categories"]}


def _check_annotations(dataset: Dict[str, Any], ann_file: str) -> None:
    """Check a COCO instances dict and complete it in place, or raise DatasetError naming the
    entry: images, categories and annotations with integer ids (whole floats made ints), none
    listed twice; every image with a file_name; every category with a name and an id >= 0 (it
    indexes the class logits); every annotation on a listed image and category, its bbox
    [x, y, w, h] finite with w, h >= 0, area (default: w * h) finite >= 0, iscrowd (default 0)
    0 or 1."""
    images = _entries(dataset, "images", ann_file)
    if not images:
        raise DatasetError(f"{ann_file}: no images listed")
    file_names: Dict[int, str] = {}
    image_of_file: Dict[str, int] = {}
    for image in images:
        image_id, file_name = _as_id(image.get("id")), image.get("file_name")
        if image_id is None:
            raise DatasetError(
                f"{ann_file}: image {file_name!r} has id {image.get('id')!r}; COCO image ids are integers"
            )
        if image_id in file_names:
            raise DatasetError(
                f"{ann_file}: image id {image_id} is listed twice ({file_names[image_id]!r}, {file_name!r})"
            )
        if not isinstance(file_name, str) or not file_name:
            raise DatasetError(f"{ann_file}: image id {image_id}: file_name must be a file name, got {file_name!r}")
        # Two ids of one file split its objects: each sample would teach the other's as background.
        path = os.path.normpath(file_name)
        if path in image_of_file:
            raise DatasetError(
                f"{ann_file}: image ids {image_of_file[path]} and {image_id} are the same file {file_name!r}: each "
                "would be trained with only its own annotations, the other's objects as background; list the "
                "file once, with the annotations of both on its id"
            )
        image["id"] = image_id
        file_names[image_id] = file_name
        image_of_file[path] = image_id
    category_ids = _check_categories(dataset, ann_file)
    annotation_ids = set()
    boxes_seen: Dict[Tuple[int, int, Tuple[float, ...]], int] = {}
    zero_area = []
    for ann in _entries(dataset, "annotations", ann_file):
        where = f"{ann_file}: annotation {ann.get('id')!r} of image {ann.get('image_id')!r}"
        ann_id, image_id, category_id = (_as_id(ann.get(k)) for k in ("id", "image_id", "category_id"))
        if ann_id is None:
            raise DatasetError(f"{where}: COCO annotation ids are integers")
        if ann_id in annotation_ids:
            raise DatasetError(f"{where}: annotation id {ann_id} is used twice")
        if image_id not in file_names:
            raise DatasetError(f"{where}: image_id {ann.get('image_id')!r} is not among the listed images")
        if category_id not in category_ids:
            raise DatasetError(f"{where}: category_id {ann.get('category_id')!r} is not among the listed categories")
        bbox = ann.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise DatasetError(f"{where}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
        if not all(math.isfinite(v) for v in bbox):
            raise DatasetError(f"{where}: bbox has a non-finite value: {bbox}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DatasetError(
                f"{where}: bbox {bbox} has a negative width or height (COCO's bbox is [x, y, width, height], "
                "width and height >= 0; a box given as [x1, y1, x2, y2] must be converted)"
            )
        if bbox[2] == 0 or bbox[3] == 0:
            zero_area.append(f"annotation {ann_id} of image {image_id}")
        # The same object twice (a merged export) teaches the model to detect it twice.
        same = boxes_seen.setdefault((image_id, category_id, tuple(bbox)), ann_id)
        if same != ann_id:
            raise DatasetError(
                f"{where}: the same box {bbox} of category {category_id} on image {image_id} as annotation "
                f"{same}: an object annotated twice teaches the model to detect it twice; remove one of them"
            )
        area = ann.setdefault("area", bbox[2] * bbox[3])  # COCO's evaluation sorts objects by area
        if not _is_number(area) or not math.isfinite(area) or area < 0:
            raise DatasetError(f"{where}: area must be a finite number >= 0, got {area!r}")
        if ann.setdefault("iscrowd", 0) not in (0, 1):
            raise DatasetError(f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
        ann["id"], ann["image_id"], ann["category_id"] = ann_id, image_id, category_id
        annotation_ids.add(ann_id)
    if zero_area:
        warnings.warn(
            f"{ann_file}: {len(zero_area)} boxes have a width or height of 0 ({_first(zero_area)}); training leaves "
            "them out, COCO's evaluation counts them as objects that no detection can match",
            stacklevel=3,
        )


def _first(items: List[str]) -> str:
    """The first MAX_NAMED items, "; "-separated, with how many more there are."""
    more = f"; and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else ""
    return "; ".join(items[:MAX_NAMED]) + more


# A box may reach this many pixels beyond its image (rounding in annotation tools) before a
# warning says so; it is clipped to the image either way.
BOX_MARGIN = 1.0


def _check_boxes_in_images(dataset: Dict[str, Any], sizes: Dict[int, Tuple[int, int]], ann_file: str) -> None:
    """Boxes against their image's displayed size (width, height): DatasetError naming those
    wholly outside it (no pixel of the image: the box cannot be right); a warning naming those
    reaching more than BOX_MARGIN pixels beyond it (clipped), with the usual causes."""
    outside, beyond = [], []
    for ann in dataset.get("annotations", []):
        width, height = sizes[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        shown = f"annotation {ann['id']} of image {ann['image_id']}: bbox {ann['bbox']} on a {width}x{height} image"
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            if w > 0 and h > 0:
                outside.append(shown)
        elif min(x, y) < -BOX_MARGIN or x + w > width + BOX_MARGIN or y + h > height + BOX_MARGIN:
            beyond.append(shown)
    causes = (
        "a bbox written as [x1, y1, x2, y2] instead of COCO's [x, y, width, height], or boxes annotated on a copy "
        "of the image of another size"
    )
    if outside:
        raise DatasetError(
            f"{ann_file}: {len(outside)} boxes lie wholly outside their image ({_first(outside)}); usual causes: "
            f"{causes}. Fix or remove these annotations"
        )
    if beyond:
        warnings.warn(
            f"{ann_file}: {len(beyond)} of {len(dataset['annotations'])} boxes reach more than {BOX_MARGIN:g} pixel "
            f"beyond their image ({_first(beyond)}); they are clipped to the image. Many such boxes point to "
            f"{causes}",
            stacklevel=4,
        )


def _check_image_files(dataset: Dict[str, Any], img_folder: str, ann_file: str) -> None:
    """Every listed image file exists and its header opens as an image read_image can read;
    DatasetError naming the first MAX_NAMED that do not, with their ids. Warns when displayed
    sizes differ from the listed width and height. Then checks the boxes against the displayed
    sizes (_check_boxes_in_images)."""
    images = dataset["images"]
    unreadable, resized = [], []
    sizes: Dict[int, Tuple[int, int]] = {}
    for image in images:
        try:
            size = image_size(os.path.join(img_folder, image["file_name"]))
        except ImageError as err:
            unreadable.append(f"image id {image['id']}: {err}")
            continue
        sizes[image["id"]] = size
        listed = (image.get("width"), image.get("height"))
        if all(_is_number(v) for v in listed) and tuple(listed) != size:
            resized.append((image, size))
    if unreadable:
        raise DatasetError(
            f"{ann_file}: {len(unreadable)} of the {len(images)} listed images cannot be read: " + _first(unreadable)
        )
    if resized:
        image, (width, height) = resized[0]
        warnings.warn(
            f"{ann_file}: {len(resized)} of the {len(images)} images differ in size from the width and height "
            f"listed for them (the first, image id {image['id']}, {image['file_name']!r}, is {width}x{height} as "
            f"displayed, EXIF orientation applied, and listed as {image['width']}x{image['height']}); their boxes "
            "are taken in the file's pixels as displayed",
            stacklevel=3,
        )
    _check_boxes_in_images(dataset, sizes, ann_file)


class CocoDetection(torchvision.datasets.CocoDetection):
    """torchvision's CocoDetection with the annotation file checked and DETR's targets.

    Args:
        img_folder: folder of the images; ann_file: COCO instances JSON;
        transforms: a v2 transform over (tv_tensors.Image uint8, dict(boxes, labels)).
    Raises DatasetError (see the module docstring) when the file is not valid JSON, not
    COCO-shaped or has a bad entry, or a listed image file is missing or cannot be opened; a
    sample raises it when its image cannot be decoded.
    """

    def __init__(self, img_folder: str, ann_file: str, transforms) -> None:
        dataset = _load_annotations(ann_file)
        _check_annotations(dataset, ann_file)
        _check_image_files(dataset, img_folder, ann_file)
        # pycocotools indexes the checked dict (no second read of the file); it prints progress
        # lines while it does, noise here.
        with contextlib.redirect_stdout(io.StringIO()):
            super().__init__(img_folder, None)
            self.coco.dataset = dataset
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs)
        self.ann_file = ann_file
        self._detr_transforms = transforms
        self.class_ids: Optional[List[int]] = None
        self._labels: Optional[Dict[int, int]] = None

    def set_classes(self, class_ids: Optional[Sequence[int]], num_classes: int) -> None:
        """The class (logit index) that targets' labels give each category from now on, and
        that evaluation maps back (smca.engine): class_ids None: the category id itself; a list
        (see the function class_ids): category class_ids[i] is class i.

        Raises DatasetError naming the category ids of annotations that have no class among
        the model's num_classes (a validation file with categories the training file lacks).
        """
        labels = {c: c for c in self.categories if c < num_classes} if class_ids is None else {
            c: i for i, c in enumerate(class_ids)
        }
        missing = sorted({a["category_id"] for a in self.coco.dataset.get("annotations", [])} - set(labels))
        if missing:
            have = f"ids 0..{num_classes - 1}" if class_ids is None else f"ids {_shown(list(class_ids))}"
            raise DatasetError(
                f"{self.ann_file}: annotations of category ids {_shown(missing)} have no class in the model, whose "
                f"{num_classes} classes stand for the category {have}: list the same categories in the training "
                "and validation annotation files (the model is made for the training file's)"
            )
        self.class_ids = None if class_ids is None else list(class_ids)
        self._labels = None if class_ids is None else labels

    @property
    def categories(self) -> Dict[int, str]:
        """category id -> name."""
        return {c["id"]: c["name"] for c in self.coco.dataset["categories"]}

    def _load_image(self, id: int) -> Tensor:
        """(3, H, W) uint8 RGB of image `id` as displayed; DatasetError naming the file and id."""
        try:
            return read_image(os.path.join(self.root, self.coco.imgs[id]["file_name"]))
        except ImageError as err:
            raise DatasetError(f"{self.ann_file}: image id {id}: {err}") from err

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict[str, Tensor]]:
        image_id = self.ids[index]
        image = self._load_image(image_id)
        height, width = image.shape[-2:]
        annotations = [a for a in self._load_target(image_id) if a["iscrowd"] == 0]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes = tv_tensors.BoundingBoxes(box_convert(boxes, "xywh", "xyxy"), format="XYXY", canvas_size=(height, width))
        target = dict(
            boxes=F.clamp_bounding_boxes(boxes, clamping_mode="hard"),
            labels=torch.tensor(
                [a["category_id"] if self._labels is None else self._labels[a["category_id"]] for a in annotations],
                dtype=torch.int64,
            ),
        )
        image, target = self._detr_transforms(image, target)
        new_h, new_w = image.shape[-2:]
        scale = torch.tensor([new_w, new_h, new_w, new_h], dtype=torch.float32)
        return image.as_subclass(Tensor), dict(
            labels=target["labels"],
            boxes=box_convert(target["boxes"].as_subclass(Tensor), "xyxy", "cxcywh") / scale,
            image_id=torch.tensor(image_id, dtype=torch.int64),
            orig_size=torch.tensor([height, width], dtype=torch.int64),
            size=torch.tensor([new_h, new_w], dtype=torch.int64),
        )


def build_dataset(image_set: str, cfg) -> CocoDetection:
    """The "train" or "val" split under cfg.coco_path, with the transforms of that split.

    Uses cfg.coco_path, cfg.min_sizes, cfg.eval_size and cfg.max_size. Raises DatasetError for
    a missing directory or file, invalid JSON, a malformed entry and a listed image file that is
    missing or cannot be opened (CocoDetection).
    """
    img_folder, ann_file = coco_paths(cfg.coco_path, image_set)
    transforms = make_transforms(image_set, cfg.min_sizes, cfg.eval_size, cfg.max_size)
    return CocoDetection(img_folder, ann_file, transforms)


def collate_fn(batch: Sequence[Tuple[Tensor, Dict[str, Tensor]]]) -> Tuple[Tensor, Tensor, List[Dict[str, Tensor]]]:
    """[(image (3, H_b, W_b), target)] -> images (B, 3, Hm, Wm), pixel_mask (B, Hm, Wm) True = padding, targets."""
    images, targets = zip(*batch)
    images, pixel_mask = pad_images(images)
    return images, pixel_mask, list(targets)


def build_dataloader(
    dataset, batch_size: int, num_workers: int, train: bool, distributed: bool = False, seed: int = 0
) -> DataLoader:
    """A DataLoader with DETR's sampling.

    Training shuffles and drops the last incomplete batch; evaluation keeps the order and every
    image. Distributed: a DistributedSampler shuffled from (seed, epoch) (call set_epoch each
    epoch); it repeats a few images so that every process gets as many. Otherwise the
    shuffling seed is drawn from torch's global generator, so restoring that generator restores
    the order.
    """
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed)
    else:
        sampler = RandomSampler(dataset) if train else SequentialSampler(dataset)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=train, collate_fn=collate_fn, num_workers=num_workers
    )
