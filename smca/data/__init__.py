"""Data: COCO-layout detection sets (the real COCO or the built-in synthetic shapes)."""

from .coco import CocoDetection, DatasetError, build_dataloader, build_dataset, collate_fn

__all__ = ["CocoDetection", "DatasetError", "build_dataset", "build_dataloader", "collate_fn"]
