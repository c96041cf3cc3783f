"""Local COCO detection folders (an annotation json and its images) as `datasets` objects in the common example
layout (see `hf_kd.data.schema`).

[`read_coco_detection`] reads and validates the json into a [`CocoDetectionSource`], which yields a streaming
`datasets.IterableDataset` sharded over the image files, a map-style `datasets.Dataset`, or parquet shards with the
images embedded (a one-off export).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from .parquet import write_parquet_shards
from .schema import DetectionCategories, DetectionDataError, detection_features
from .validation import (
    INVALID_KINDS,
    WARNING_KINDS,
    DataValidationReport,
    OnInvalid,
    check_image_files,
    validate_coco_annotations,
    validate_coco_images,
)

logger = logging.getLogger(__name__)


class CocoDetectionSource:
    """A validated local COCO detection annotation file and its image folder.

    Build it with [`read_coco_detection`]. The annotations are held in compact arrays (COCO train2017 fits in a few
    hundred MB and pickles quickly to dataloader workers); images are only opened when examples are decoded.
    """

    def __init__(
        self,
        annotation_file: Path,
        image_dir: Path,
        categories: DetectionCategories,
        report: DataValidationReport,
        image_ids: np.ndarray,
        file_names: np.ndarray,
        widths: np.ndarray,
        heights: np.ndarray,
        annotation_offsets: np.ndarray,
        annotation_ids: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        areas: np.ndarray,
        iscrowd: np.ndarray,
        json_counts: Mapping[str, int] | None = None,
    ):
        self.annotation_file = annotation_file
        self.image_dir = image_dir
        self.categories = categories
        self.report = report
        self.image_ids = image_ids
        self.file_names = file_names
        self.widths = widths
        self.heights = heights
        self.annotation_offsets = annotation_offsets
        self.annotation_ids = annotation_ids
        self.boxes = boxes
        self.labels = labels
        self.areas = areas
        self.iscrowd = iscrowd
        self.json_counts = dict(json_counts or {})

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(annotation_file={str(self.annotation_file)!r}, images={len(self)}, "
            f"annotations={len(self.annotation_ids)}, classes={self.categories.num_labels})"
        )

    @property
    def features(self) -> datasets.Features:
        return detection_features(self.categories.names)

    def counts(self) -> dict[str, int]:
        """Images, annotations, crowd regions and empty images (images without annotations) held here, i.e. after
        validation; `json_counts` has the same numbers for the annotation file as written."""
        return {
            "images": len(self),
            "annotations": len(self.annotation_ids),
            "crowd": int(np.count_nonzero(self.iscrowd)),
            "empty_images": int(np.count_nonzero(np.diff(self.annotation_offsets) == 0)),
        }

    def image_path(self, index: int) -> str:
        return str(self.image_dir / str(self.file_names[index]))

    def example(self, index: int) -> dict[str, Any]:
        """The example at `index`, its image the undecoded `{"path", "bytes"}` reference to the file."""
        start, stop = self.annotation_offsets[index], self.annotation_offsets[index + 1]
        objects = [
            {
                "id": int(self.annotation_ids[k]),
                "bbox": [float(v) for v in self.boxes[k]],
                "category": int(self.labels[k]),
                "area": float(self.areas[k]),
                "iscrowd": int(self.iscrowd[k]),
            }
            for k in range(start, stop)
        ]
        return {
            "image": {"path": self.image_path(index), "bytes": None},
            "image_id": int(self.image_ids[index]),
            "width": int(self.widths[index]),
            "height": int(self.heights[index]),
            "objects": objects,
        }

    def shard_bounds(self, num_shards: int | None = None) -> list[tuple[int, int]]:
        """Contiguous `(start, stop)` image ranges of (almost) equal size; defaults to `min(len, 512)` shards."""
        num_shards = min(len(self), 512) if num_shards is None else min(num_shards, len(self))
        num_shards = max(num_shards, 1)
        cuts = [round(k * len(self) / num_shards) for k in range(num_shards + 1)]
        return list(zip(cuts[:-1], cuts[1:]))

    def to_iterable_dataset(self, num_shards: int | None = None) -> datasets.IterableDataset:
        """A streaming dataset over the images, split into `num_shards` shards of consecutive image files.

        Shards are what `datasets` distributes over processes (`split_dataset_by_node`) and dataloader workers; use
        a multiple of `processes x workers`. Nothing is decoded until iteration.
        """
        return datasets.IterableDataset.from_generator(
            functools.partial(_generate_coco_examples, source=self),
            features=self.features,
            gen_kwargs={"shards": self.shard_bounds(num_shards)},
        )

    def to_dataset(self) -> datasets.Dataset:
        """A map-style in-memory dataset (image paths only, decoded on access), e.g. for evaluation."""
        return datasets.Dataset.from_list([self.example(i) for i in range(len(self))], features=self.features)

    def to_parquet(
        self,
        output_dir: str | os.PathLike,
        num_shards: int | None = None,
        split: str = "train",
        progress: bool = True,
    ) -> list[Path]:
        """Writes the examples, image bytes embedded, to parquet shards `{split}-0000k-of-0000n.parquet`.

        The files load back with `datasets.load_dataset("parquet", data_files=..., streaming=True)` in the same
        layout and features. `num_shards` defaults to one shard per 256 MiB of image files.
        """
        if num_shards is None:
            total_bytes = sum(os.path.getsize(self.image_path(i)) for i in range(len(self)))
            num_shards = max(1, math.ceil(total_bytes / 2**28))
        return write_parquet_shards(
            self,
            output_dir,
            num_shards,
            split=split,
            embed_images=True,
            progress=progress,
            description=f"Exporting {self.annotation_file.name} to parquet",
        )


def _generate_coco_examples(shards: list[tuple[int, int]], source: CocoDetectionSource) -> Iterator[dict[str, Any]]:
    for start, stop in shards:
        for index in range(start, stop):
            yield source.example(index)


def read_coco_detection(
    annotation_file: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    on_invalid: OnInvalid = "raise",
    verify_images: bool = False,
    progress: bool = False,
) -> CocoDetectionSource:
    """Reads and validates a COCO detection annotation file.

    Args:
        annotation_file: COCO json (`images`, `annotations`, `categories`).
        image_dir: folder that `file_name` is relative to; by default the first of `images/` next to the json, the
            json's folder, or COCO's `{split}2017/` next to `annotations/` that holds the first image.
        on_invalid: what to do with unusable images or annotations (malformed fields, negative width/height,
            duplicate ids, an annotation pointing to a missing image or an unknown category, a missing image
            file): `"raise"` a [`DetectionDataError`] listing them, or `"skip"` them, logging a warning with counts.
            Malformed json and bad categories always raise.
        verify_images: also check every image file (in threads, from its header and its last bytes, see
            `hf_kd.data.image_files`): that it is a complete image (not empty, truncated or of another kind), that
            its mode converts to RGB faithfully (16-bit grayscale does not) and that its size, EXIF orientation
            applied, matches `width`/`height`. Unusable images are invalid entries (see `on_invalid`).
        progress: show a progress bar while checking the images.

    Raises:
        DetectionDataError: malformed json, no `annotations` list (a file of images without one is almost always a
            mistake; an empty list is a set of negative images, and is logged), bad categories, or invalid entries
            with `on_invalid="raise"`.

    Boxes that leave the image or have no area, and files listed under several image ids, are kept (the ground
    truth stays what pycocotools reads) and reported in `source.report`; training transforms clip boxes and count
    what they remove.
    """
    annotation_file = Path(annotation_file)
    source = str(annotation_file)
    try:
        with open(annotation_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise DetectionDataError(f"{source}: malformed JSON: {error}") from error
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DetectionDataError(f"{source}: not a COCO annotation file (needs a list under 'images')")
    if not isinstance(data.get("categories"), list):
        raise DetectionDataError(f"{source}: not a COCO detection file (needs a list under 'categories')")
    if "annotations" not in data:
        raise DetectionDataError(
            f"{source}: no 'annotations' list: without one its {len(data['images'])} images have no objects; give "
            "'annotations': [] for a split of negative images only"
        )
    annotations = data["annotations"]
    if not isinstance(annotations, list):
        raise DetectionDataError(f"{source}: 'annotations' must be a list")
    if not annotations and data["images"]:
        logger.warning(
            "%s: 'annotations' is empty: all %d images are negatives (no objects)", source, len(data["images"])
        )

    categories = DetectionCategories.from_coco(data["categories"], source=source)
    json_counts = _json_counts(data["images"], annotations)
    report = DataValidationReport(source)
    images = validate_coco_images(data["images"], report)
    if image_dir is None:
        image_dir = _find_image_dir(annotation_file, [image["file_name"] for image in images])
    image_dir = Path(image_dir)
    images = check_image_files(images, image_dir, report, verify_images, progress=progress)
    listed_image_ids = {image.get("id") for image in data["images"] if isinstance(image, dict)}
    kept = validate_coco_annotations(annotations, images, listed_image_ids, categories.category_ids, report)

    if report.num_invalid and on_invalid == "raise":
        raise DetectionDataError(
            f"{source}: {report.num_invalid} invalid images/annotations (image folder {image_dir}); fix the data or "
            f"pass on_invalid='skip' to skip them:\n{report.summary(INVALID_KINDS)}"
        )
    if report.num_invalid:
        logger.warning("%s: skipped invalid images/annotations:\n%s", source, report.summary(INVALID_KINDS))
    if any(report.counts[kind] for kind in WARNING_KINDS):
        logger.warning(
            "%s: kept entries with problems (transforms clip boxes and count the ones they remove):\n%s",
            source,
            report.summary(WARNING_KINDS),
        )

    image_index = {image["id"]: index for index, image in enumerate(images)}
    owner = np.array([image_index[a["image_id"]] for a in kept], dtype=np.int64)
    order = np.argsort(owner, kind="stable")
    kept = [kept[k] for k in order]
    counts = np.bincount(owner, minlength=len(images)) if len(owner) else np.zeros(len(images), dtype=np.int64)
    label_of = {category_id: label for label, category_id in enumerate(categories.category_ids)}
    return CocoDetectionSource(
        annotation_file=annotation_file,
        image_dir=image_dir,
        categories=categories,
        report=report,
        image_ids=np.array([image["id"] for image in images], dtype=np.int64),
        file_names=np.array([image["file_name"] for image in images], dtype=str),
        widths=np.array([image["width"] for image in images], dtype=np.int64),
        heights=np.array([image["height"] for image in images], dtype=np.int64),
        annotation_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        annotation_ids=np.array([a["id"] for a in kept], dtype=np.int64),
        boxes=np.array([a["bbox"] for a in kept], dtype=np.float64).reshape(-1, 4),
        labels=np.array([label_of[a["category_id"]] for a in kept], dtype=np.int64),
        areas=np.array([a["area"] for a in kept], dtype=np.float64),
        iscrowd=np.array([a["iscrowd"] for a in kept], dtype=np.int64),
        json_counts=json_counts,
    )


def _json_counts(images: list[Any], annotations: list[Any]) -> dict[str, int]:
    """Images, annotations, crowd regions and empty images of an annotation file as written (before validation)."""
    image_ids = {image.get("id") for image in images if isinstance(image, dict)}
    annotated = {a.get("image_id") for a in annotations if isinstance(a, dict)}
    return {
        "images": len(images),
        "annotations": len(annotations),
        "crowd": sum(1 for a in annotations if isinstance(a, dict) and a.get("iscrowd")),
        "empty_images": len(image_ids - annotated),
    }


def _find_image_dir(annotation_file: Path, file_names: list[str]) -> Path:
    parent = annotation_file.parent
    candidates = [parent / "images", parent]
    stem = annotation_file.stem
    if stem.startswith("instances_"):
        split = stem[len("instances_") :]
        candidates += [parent.parent / split, parent.parent / "images" / split, parent.parent / "images"]
    for candidate in candidates:
        if not file_names or (candidate / file_names[0]).is_file():
            return candidate
    return candidates[0] if candidates[0].is_dir() else parent


def find_coco_annotation_file(root: str | os.PathLike, split: str | None = None) -> Path:
    """The annotation json of `split` in a COCO folder (`root` itself when it is a file).

    Looks for `instances_{split}.json` / `instances_{split}2017.json` (in `root` or `root/annotations`),
    `annotations_{split}.json` and `{split}.json`; without a split, for `annotations.json` or a single
    `instances_*.json`.
    """
    root = Path(root)
    if root.is_file():
        return root
    folders = [root, root / "annotations"]
    if split is None:
        candidates = [root / "annotations.json"]
        instances = sorted({path for folder in folders for path in folder.glob("instances_*.json")})
        if len(instances) == 1:
            candidates.append(instances[0])
    else:
        names = [
            f"instances_{split}.json",
            f"instances_{split}2017.json",
            f"annotations_{split}.json",
            f"{split}.json",
        ]
        candidates = [folder / name for name in names for folder in folders]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c.relative_to(root)) for c in candidates) or "annotations.json or a single instances_*.json"
    raise FileNotFoundError(f"no COCO annotation file for split={split!r} in {root} (tried: {tried})")


def load_coco_detection(
    path: str | os.PathLike,
    split: str | None = None,
    *,
    image_dir: str | os.PathLike | None = None,
    streaming: bool = True,
    num_shards: int | None = None,
    on_invalid: OnInvalid = "raise",
    verify_images: bool = False,
) -> datasets.IterableDataset | datasets.Dataset:
    """Loads a local COCO folder (or annotation json) as a streaming or map-style dataset in the common layout.

    `id2label` is in the features (see [`get_id2label`]); use [`read_coco_detection`] to also get the mapping from
    labels back to the file's category ids and the validation report.
    """
    source = read_coco_detection(
        find_coco_annotation_file(path, split), image_dir, on_invalid=on_invalid, verify_images=verify_images
    )
    return source.to_iterable_dataset(num_shards) if streaming else source.to_dataset()


def export_coco_to_parquet(
    path: str | os.PathLike,
    output_dir: str | os.PathLike,
    split: str | None = None,
    *,
    image_dir: str | os.PathLike | None = None,
    num_shards: int | None = None,
    on_invalid: OnInvalid = "raise",
    progress: bool = True,
) -> list[Path]:
    """Exports a local COCO folder (or annotation json) to parquet shards with embedded images; see
    [`CocoDetectionSource.to_parquet`]."""
    source = read_coco_detection(find_coco_annotation_file(path, split), image_dir, on_invalid=on_invalid)
    return source.to_parquet(output_dir, num_shards=num_shards, split=split or "train", progress=progress)
