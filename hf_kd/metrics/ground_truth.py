"""COCO ground truth for evaluation: a pycocotools `COCO` from a json path or dict, or built from examples in the
data sources' layout, and its annotations as arrays."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from pycocotools.coco import COCO

logger = logging.getLogger(__name__)


def load_coco_ground_truth(ground_truth: str | os.PathLike | Mapping[str, Any] | COCO) -> COCO:
    """A pycocotools `COCO` from a json path or dict (as `COCO(path)` reads it; a missing `area` becomes the box
    area, which pycocotools needs)."""
    if isinstance(ground_truth, COCO):
        return ground_truth
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(ground_truth, Mapping):
            coco = COCO()
            coco.dataset = dict(ground_truth)
        else:
            coco = COCO(os.fspath(ground_truth))
        annotations = coco.dataset.get("annotations", [])
        if any("area" not in a for a in annotations):
            coco.dataset["annotations"] = [
                a if "area" in a else {**a, "area": a["bbox"][2] * a["bbox"][3]} for a in annotations
            ]
        coco.createIndex()
    return coco


def coco_reference(example: Mapping[str, Any]) -> dict[str, Any]:
    """The metric reference of one example in the data sources' layout (`image_id` + `objects`)."""
    objects = example["objects"]
    if isinstance(objects, Mapping):
        objects = [dict(zip(objects, values)) for values in zip(*objects.values())]
    return {
        "image_id": int(example["image_id"]),
        "bbox": [list(o["bbox"]) for o in objects],
        "category": [int(o["category"]) for o in objects],
        "area": [float(o["area"]) for o in objects],
        "iscrowd": [int(o["iscrowd"]) for o in objects],
    }


def build_coco_ground_truth(examples: Iterable[Mapping[str, Any]], id2label: Mapping[int, str]) -> dict[str, Any]:
    """A COCO ground-truth dict (category id = label) from examples in the data sources' layout.

    Pass a dataset without its `image` column (e.g. `dataset.remove_columns("image")`) to avoid decoding images.
    """
    references = [coco_reference(example) for example in examples]
    category_ids = sorted(int(k) for k in id2label)
    return ground_truth_from_references(
        first_per_image(references, "examples"), category_ids, [id2label[c] for c in category_ids]
    )


def ground_truth_from_references(
    references: list[dict[str, Any]], category_ids: list[int], names: list[str]
) -> dict[str, Any]:
    """A COCO ground-truth dict from metric references (see [`coco_reference`]), their `category` being the ids of
    the categories `names`."""
    annotations = []
    known = set(category_ids)
    for reference in references:
        for bbox, category, area, iscrowd in zip(
            reference["bbox"], reference["category"], reference["area"], reference["iscrowd"]
        ):
            if category not in known:
                raise ValueError(
                    f"image id {reference['image_id']}: reference category {category} is not a known class"
                )
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCOeval needs non-zero annotation ids
                    "image_id": reference["image_id"],
                    "category_id": int(category),
                    "bbox": [float(v) for v in bbox],
                    "area": float(area),
                    "iscrowd": int(iscrowd),
                }
            )
    return {
        "images": [{"id": reference["image_id"]} for reference in references],
        "annotations": annotations,
        "categories": [{"id": c, "name": name} for c, name in zip(category_ids, names)],
    }


def first_per_image(entries: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    """The first entry of each `image_id`, logging how many repeat one (`what` names the entries in the log)."""
    seen: dict[int, dict[str, Any]] = {}
    for entry in entries:
        seen.setdefault(int(entry["image_id"]), entry)
    if len(seen) < len(entries):
        logger.warning(
            "%s: %d entries repeat an image id (e.g. padded distributed evaluation); kept the first of each, "
            "%d images",
            what,
            len(entries) - len(seen),
            len(seen),
        )
    return list(seen.values())


class GroundTruthArrays:
    """A pycocotools `COCO` ground truth as arrays (annotations in the order `COCOeval` sees them), built once."""

    def __init__(self, coco: COCO):
        self.coco = coco
        annotations = coco.dataset.get("annotations", [])
        count = len(annotations)
        self.image_ids = np.fromiter((a["image_id"] for a in annotations), np.int64, count)
        self.category_ids = np.fromiter((a["category_id"] for a in annotations), np.int64, count)
        self.boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
        self.areas = np.fromiter((a["area"] for a in annotations), np.float64, count)
        self.iscrowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in annotations), bool, count)
        self.ids = np.fromiter((a["id"] for a in annotations), np.int64, count)
        self.cat_ids = np.array(sorted(coco.getCatIds()), dtype=np.int64)

    @classmethod
    def from_coco(cls, coco: COCO) -> GroundTruthArrays:
        cached = getattr(coco, "_hf_kd_arrays", None)
        if cached is None:
            cached = cls(coco)
            coco._hf_kd_arrays = cached
        return cached
