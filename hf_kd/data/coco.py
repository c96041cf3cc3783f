"""COCO-format object detection data as `datasets` objects.

Every source here yields examples in one layout:

- `image`: PIL image, RGB, EXIF orientation applied (decoded lazily by the `datasets.Image` feature);
- `image_id`, `width`, `height`: ints (`width`/`height` of the original image);
- `objects`: list of dicts with `bbox` ([x, y, w, h] in pixels, COCO convention), `category` (contiguous label
  0..C-1), `area`, `iscrowd` and `id` (annotation id).

Sources: a local COCO folder (annotation json + images) as a streaming `datasets.IterableDataset` sharded over the
image files, or as a map-style `datasets.Dataset`; any dataset in the Hub `objects` layout (with a column mapping and
box formats); a one-off export of a COCO folder to parquet shards.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

OnInvalid = Literal["raise", "skip"]
BoxFormat = Literal["xywh", "xyxy", "cxcywh"]

# Kinds of problems that make an image or an annotation unusable: raised, or skipped with `on_invalid="skip"`.
IMAGE_INVALID_KINDS = (
    "image_missing_field",
    "image_bad_size",
    "duplicate_image_id",
    "missing_image_file",
    "unreadable_image",
    "image_size_mismatch",
)
ANNOTATION_INVALID_KINDS = (
    "annotation_missing_field",
    "annotation_bad_bbox",
    "annotation_unknown_image",
    "annotation_unknown_category",
    "duplicate_annotation_id",
    "annotation_of_skipped_image",
)
INVALID_KINDS = IMAGE_INVALID_KINDS + ANNOTATION_INVALID_KINDS
# Kinds of problems that are kept in the data (ground truth stays as pycocotools reads it) and reported.
WARNING_KINDS = ("box_outside_image", "degenerate_box", "area_missing")

_MAX_MESSAGES_PER_KIND = 5
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


class DetectionDataError(ValueError):
    """Detection data (an annotation file, an image or an example) is invalid; the message names where."""


@dataclass(frozen=True)
class DetectionCategories:
    """The classes of a detection dataset: contiguous label `i` is `names[i]`, dataset category id `category_ids[i]`."""

    names: tuple[str, ...]
    category_ids: tuple[int, ...]

    @classmethod
    def from_coco(cls, categories: Sequence[Mapping[str, Any]], source: str = "categories") -> DetectionCategories:
        """Builds the label mapping from COCO `categories` entries, ordered by category id."""
        seen_ids: dict[int, str] = {}
        for index, category in enumerate(categories):
            category_id, name = (
                (category.get("id"), category.get("name")) if isinstance(category, Mapping) else (None, None)
            )
            if not _is_int(category_id) or not isinstance(name, str):
                raise DetectionDataError(
                    f"{source}: categories[{index}] needs an integer 'id' and a string 'name', got {category!r}"
                )
            if category_id in seen_ids:
                raise DetectionDataError(
                    f"{source}: category id {category_id} is used twice ({seen_ids[category_id]!r} and {name!r})"
                )
            seen_ids[category_id] = name
        names = [seen_ids[i] for i in sorted(seen_ids)]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise DetectionDataError(f"{source}: category names must be unique, duplicated: {duplicated}")
        return cls(names=tuple(names), category_ids=tuple(sorted(seen_ids)))

    @property
    def num_labels(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: label for label, name in enumerate(self.names)}

    @property
    def label_to_category_id(self) -> dict[int, int]:
        return dict(enumerate(self.category_ids))


@dataclass
class DataValidationReport:
    """What validation of a detection source found: counts per problem kind and the first messages of each kind."""

    source: str
    counts: Counter = field(default_factory=Counter)
    messages: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if len(self.messages[kind]) < _MAX_MESSAGES_PER_KIND:
            self.messages[kind].append(message)

    @property
    def num_invalid(self) -> int:
        return sum(self.counts[kind] for kind in INVALID_KINDS)

    def summary(self, kinds: Sequence[str] | None = None) -> str:
        kinds = [kind for kind in (kinds or self.counts) if self.counts[kind]]
        lines = []
        for kind in kinds:
            lines.append(f"  {kind}: {self.counts[kind]}")
            lines.extend(f"    - {message}" for message in self.messages[kind])
            if self.counts[kind] > len(self.messages[kind]):
                lines.append(f"    - ... ({self.counts[kind] - len(self.messages[kind])} more)")
        return "\n".join(lines)


def detection_features(names: Sequence[str]) -> datasets.Features:
    """The `datasets.Features` of the common example layout, for the given class names."""
    return datasets.Features(
        {
            "image": datasets.Image(mode="RGB"),
            "image_id": datasets.Value("int64"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": datasets.List(
                {
                    "id": datasets.Value("int64"),
                    "bbox": datasets.List(datasets.Value("float64"), length=4),
                    "category": datasets.ClassLabel(names=list(names)),
                    "area": datasets.Value("float64"),
                    "iscrowd": datasets.Value("int64"),
                }
            ),
        }
    )


def get_id2label(features: datasets.Features | datasets.Dataset | datasets.IterableDataset) -> dict[int, str]:
    """`id2label` read from the `ClassLabel` of `objects.category` (datasets in the common example layout)."""
    if not isinstance(features, datasets.Features):
        features = features.features
    objects = features["objects"] if features is not None and "objects" in features else None
    category = None
    if isinstance(objects, datasets.List) and isinstance(objects.feature, dict):
        category = objects.feature.get("category")
    elif isinstance(objects, dict) and isinstance(objects.get("category"), datasets.List):
        category = objects["category"].feature
    if not isinstance(category, datasets.ClassLabel):
        raise DetectionDataError(f"features have no ClassLabel at objects.category: {features}")
    return dict(enumerate(category.names))


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

    def example(self, index: int, image: Any = None) -> dict[str, Any]:
        """The example at `index`; `image` defaults to the undecoded `{"path", "bytes"}` reference to the file."""
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
            "image": {"path": self.image_path(index), "bytes": None} if image is None else image,
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
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if num_shards is None:
            total_bytes = sum(os.path.getsize(self.image_path(i)) for i in range(len(self)))
            num_shards = max(1, math.ceil(total_bytes / 2**28))
        features = self.features
        bounds = self.shard_bounds(num_shards)
        paths = []
        with tqdm(
            total=len(self), desc=f"Exporting {self.annotation_file.name} to parquet", disable=not progress
        ) as bar:
            for shard, (start, stop) in enumerate(bounds):
                rows = []
                for index in range(start, stop):
                    with open(self.image_path(index), "rb") as f:
                        image = {"bytes": f.read(), "path": str(self.file_names[index])}
                    rows.append(features.encode_example(self.example(index, image=image)))
                    bar.update(1)
                path = output_dir / f"{split}-{shard:05d}-of-{len(bounds):05d}.parquet"
                pq.write_table(pa.Table.from_pylist(rows, schema=features.arrow_schema), path)
                paths.append(path)
        return paths


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
        verify_images: also decode every image once (in threads) and check that it is readable and that its size,
            EXIF orientation applied, matches `width`/`height`.

    Boxes that leave the image or have no area are kept (the ground truth stays what pycocotools reads) and
    reported in `source.report`; training transforms clip them and count what they remove.
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
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise DetectionDataError(f"{source}: 'annotations' must be a list")

    categories = DetectionCategories.from_coco(data["categories"], source=source)
    json_counts = _json_counts(data["images"], annotations)
    report = DataValidationReport(source)
    images = _validate_images(data["images"], report)
    if image_dir is None:
        image_dir = _find_image_dir(annotation_file, [image["file_name"] for image in images])
    image_dir = Path(image_dir)
    images = _check_image_files(images, image_dir, report, verify_images)
    listed_image_ids = {image.get("id") for image in data["images"] if isinstance(image, dict)}
    kept = _validate_annotations(annotations, images, listed_image_ids, categories, report)

    if report.num_invalid and on_invalid == "raise":
        raise DetectionDataError(
            f"{source}: {report.num_invalid} invalid images/annotations (image folder {image_dir}); fix the data or "
            f"pass on_invalid='skip' to skip them:\n{report.summary(INVALID_KINDS)}"
        )
    if report.num_invalid:
        logger.warning("%s: skipped invalid images/annotations:\n%s", source, report.summary(INVALID_KINDS))
    if any(report.counts[kind] for kind in WARNING_KINDS):
        logger.warning(
            "%s: kept annotations with problems (transforms clip boxes and count the ones they remove):\n%s",
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_size(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and float(value).is_integer()


def _validate_images(entries: list[Any], report: DataValidationReport) -> list[dict[str, Any]]:
    valid = []
    for index, image in enumerate(entries):
        if not isinstance(image, dict):
            report.add("image_missing_field", f"images[{index}] is not an object: {image!r}")
            continue
        image_id = image.get("id")
        where = f"image id {image_id}" if _is_int(image_id) else f"images[{index}]"
        missing = [key for key in ("id", "file_name", "width", "height") if key not in image]
        if missing or not _is_int(image_id) or not isinstance(image.get("file_name"), str):
            report.add("image_missing_field", f"{where}: needs integer 'id', string 'file_name', 'width', 'height'")
            continue
        bad = [key for key in ("width", "height") if not _is_positive_size(image[key])]
        if bad:
            sizes = ", ".join(f"{key}={image[key]!r}" for key in bad)
            report.add("image_bad_size", f"{where} ({image['file_name']}): {sizes} must be a positive integer")
            continue
        valid.append(
            {
                "id": image_id,
                "file_name": image["file_name"],
                "width": int(image["width"]),
                "height": int(image["height"]),
            }
        )
    by_id = defaultdict(list)
    for image in valid:
        by_id[image["id"]].append(image["file_name"])
    for image_id, file_names in by_id.items():
        if len(file_names) > 1:
            for _ in file_names:
                report.add(
                    "duplicate_image_id", f"image id {image_id} is used by {len(file_names)} images: {file_names}"
                )
    return [image for image in valid if len(by_id[image["id"]]) == 1]


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


def _check_image_files(
    images: list[dict[str, Any]], image_dir: Path, report: DataValidationReport, verify_images: bool
) -> list[dict[str, Any]]:
    present = []
    for image in images:
        path = image_dir / image["file_name"]
        if path.is_file():
            present.append(image)
        else:
            report.add("missing_image_file", f"image id {image['id']}: file {path} does not exist")
    if not verify_images:
        return present
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        problems = list(pool.map(lambda image: _verify_image(image, image_dir), present))
    kept = []
    for image, problem in zip(present, problems):
        if problem is None:
            kept.append(image)
        else:
            report.add(*problem)
    return kept


def _verify_image(image: dict[str, Any], image_dir: Path) -> tuple[str, str] | None:
    path = image_dir / image["file_name"]
    try:
        with PIL.Image.open(path) as decoded:
            decoded.load()
            width, height = decoded.size
            if decoded.getexif().get(_EXIF_ORIENTATION_TAG) in _TRANSPOSING_ORIENTATIONS:
                width, height = height, width
    except Exception as error:  # any decoder failure makes the file unreadable
        return "unreadable_image", f"image id {image['id']}: cannot decode {path}: {error}"
    if (width, height) != (image["width"], image["height"]):
        return (
            "image_size_mismatch",
            f"image id {image['id']} ({path}): decoded size {width}x{height} (EXIF orientation applied) does not "
            f"match width x height {image['width']}x{image['height']} in the annotations",
        )
    return None


def _validate_annotations(
    annotations: list[Any],
    images: list[dict[str, Any]],
    listed_image_ids: set[Any],
    categories: DetectionCategories,
    report: DataValidationReport,
) -> list[dict[str, Any]]:
    sizes = {image["id"]: (image["width"], image["height"]) for image in images}
    known_category_ids = set(categories.category_ids)
    annotation_id_count = Counter(a.get("id") for a in annotations if isinstance(a, dict))
    kept = []
    for index, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            report.add("annotation_missing_field", f"annotations[{index}] is not an object: {annotation!r}")
            continue
        annotation_id = annotation.get("id")
        where = f"annotation id {annotation_id}" if _is_int(annotation_id) else f"annotations[{index}]"
        missing = [key for key in ("id", "image_id", "category_id") if not _is_int(annotation.get(key))]
        missing += [] if "bbox" in annotation else ["bbox"]
        if missing:
            report.add("annotation_missing_field", f"{where}: missing or non-integer field(s) {missing}")
            continue
        image_id, category_id, bbox = annotation["image_id"], annotation["category_id"], annotation["bbox"]
        where = f"{where} (image id {image_id})"
        if annotation_id_count[annotation_id] > 1:
            report.add(
                "duplicate_annotation_id", f"{where}: annotation id used {annotation_id_count[annotation_id]} times"
            )
            continue
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
        ):
            report.add("annotation_bad_bbox", f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
            continue
        if category_id not in known_category_ids:
            report.add("annotation_unknown_category", f"{where}: category_id {category_id} is not in 'categories'")
            continue
        if image_id not in sizes:
            if image_id in listed_image_ids:
                report.add("annotation_of_skipped_image", f"{where}: its image was skipped")
            else:
                report.add("annotation_unknown_image", f"{where}: image_id {image_id} is not in 'images'")
            continue
        x, y, w, h = (float(v) for v in bbox)
        width, height = sizes[image_id]
        if w <= 0 or h <= 0:
            report.add("degenerate_box", f"{where}: bbox {bbox} has no area")
        elif x < 0 or y < 0 or x + w > width or y + h > height:
            report.add("box_outside_image", f"{where}: bbox {bbox} leaves the {width}x{height} image")
        area = annotation.get("area")
        if not isinstance(area, (int, float)) or isinstance(area, bool):
            report.add("area_missing", f"{where}: no numeric 'area', using the box area")
            area = w * h
        kept.append(
            {
                "id": annotation_id,
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [x, y, w, h],
                "area": float(area),
                "iscrowd": int(bool(annotation.get("iscrowd", 0))),
            }
        )
    return kept


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


DEFAULT_COLUMNS = {
    "image": "image",
    "image_id": "image_id",
    "width": "width",
    "height": "height",
    "objects": "objects",
    "bbox": "bbox",
    "category": "category",
    "area": "area",
    "iscrowd": "iscrowd",
    "id": "id",
}


def format_detection_dataset(
    dataset: datasets.IterableDataset | datasets.Dataset,
    *,
    column_mapping: Mapping[str, str] | None = None,
    box_format: BoxFormat = "xywh",
    normalized_boxes: bool = False,
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    on_invalid: OnInvalid = "raise",
) -> datasets.IterableDataset | datasets.Dataset:
    """Converts a dataset in the Hub `objects` layout to the common example layout.

    Args:
        dataset: e.g. from `load_dataset(name, streaming=True)`: an image column, an integer image id column and an
            `objects` column (list of dicts or dict of lists) with boxes and categories.
        column_mapping: our name -> the dataset's name, for any of `image`, `image_id`, `width`, `height`,
            `objects` (top level) and `bbox`, `category`, `area`, `iscrowd`, `id` (inside `objects`).
        box_format: `"xywh"` (COCO), `"xyxy"` or `"cxcywh"`.
        normalized_boxes: boxes are relative to the image size rather than in pixels.
        id2label: class names by category value; required when the category column is not a `ClassLabel`.
            Values that are not 0..C-1 map to contiguous labels in sorted order.
        on_invalid: `"raise"` a [`DetectionDataError`] on an object with a malformed box or an unknown category,
            or `"skip"` the object with a logged, counted warning.

    Missing `width`/`height` are read from the image header, missing `area` is the box area, missing `iscrowd` is
    0 and missing annotation ids are -1. Nothing is decoded before iteration.
    """
    columns = dict(DEFAULT_COLUMNS)
    unknown = sorted(set(column_mapping or {}) - set(columns))
    if unknown:
        raise ValueError(f"column_mapping keys must be among {sorted(columns)}, got {unknown}")
    columns.update(column_mapping or {})
    if box_format not in ("xywh", "xyxy", "cxcywh"):
        raise ValueError(f"box_format must be 'xywh', 'xyxy' or 'cxcywh', got {box_format!r}")
    features = dataset.features
    if features is None:
        raise DetectionDataError("the dataset's features are unknown; load it with its features (or cast them)")
    for key in ("image", "image_id", "objects"):
        if columns[key] not in features:
            raise DetectionDataError(
                f"column {columns[key]!r} ({key}) not found in {list(features)}; pass column_mapping={{{key!r}: ...}}"
            )
    objects_feature = features[columns["objects"]]
    if isinstance(objects_feature, datasets.List) and isinstance(objects_feature.feature, dict):
        object_features = objects_feature.feature
    elif isinstance(objects_feature, dict):
        object_features = {k: v.feature if isinstance(v, datasets.List) else v for k, v in objects_feature.items()}
    else:
        raise DetectionDataError(f"column {columns['objects']!r} must be a list of objects, got {objects_feature}")
    for key in ("bbox", "category"):
        if columns[key] not in object_features:
            raise DetectionDataError(
                f"field {columns[key]!r} ({key}) not found in {columns['objects']!r} fields {list(object_features)}; "
                f"pass column_mapping={{{key!r}: ...}}"
            )

    category_feature = object_features[columns["category"]]
    if id2label is not None:
        id2label = dict(enumerate(id2label)) if isinstance(id2label, (list, tuple)) else dict(id2label)
        values = sorted(id2label)
        names = [id2label[value] for value in values]
        value_to_label = {value: label for label, value in enumerate(values)}
    elif isinstance(category_feature, datasets.ClassLabel):
        names = category_feature.names
        value_to_label = {label: label for label in range(len(names))}
    else:
        raise DetectionDataError(
            f"field {columns['category']!r} is {category_feature}, not a ClassLabel: pass id2label to name the classes"
        )

    if isinstance(features[columns["image"]], datasets.Image):
        dataset = dataset.cast_column(columns["image"], datasets.Image(decode=False))
    convert = functools.partial(
        _to_detection_example,
        columns=columns,
        box_format=box_format,
        normalized_boxes=normalized_boxes,
        value_to_label=value_to_label,
        on_invalid=on_invalid,
        report=DataValidationReport(source=f"{type(dataset).__name__} {dataset.info.dataset_name or ''}".strip()),
    )
    output_features = detection_features(names)
    if isinstance(dataset, datasets.IterableDataset):
        # Untyped map output, then cast: images are decoded at the end of the pipeline (after any shuffle buffer).
        return dataset.map(convert, remove_columns=list(features)).cast(output_features)
    undecoded = datasets.Features({**output_features, "image": datasets.Image(decode=False)})
    dataset = dataset.map(convert, remove_columns=list(features), features=undecoded)
    return dataset.cast_column("image", output_features["image"])


def load_detection_dataset(
    path: str,
    split: str = "train",
    *,
    streaming: bool = True,
    column_mapping: Mapping[str, str] | None = None,
    box_format: BoxFormat = "xywh",
    normalized_boxes: bool = False,
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    on_invalid: OnInvalid = "raise",
    **load_dataset_kwargs: Any,
) -> datasets.IterableDataset | datasets.Dataset:
    """`datasets.load_dataset(path, split=split, streaming=streaming, ...)` in the common example layout.

    See [`format_detection_dataset`] for the other arguments.
    """
    dataset = datasets.load_dataset(path, split=split, streaming=streaming, **load_dataset_kwargs)
    return format_detection_dataset(
        dataset,
        column_mapping=column_mapping,
        box_format=box_format,
        normalized_boxes=normalized_boxes,
        id2label=id2label,
        on_invalid=on_invalid,
    )


def _image_reference(image: Any) -> dict[str, Any]:
    if isinstance(image, (str, os.PathLike)):
        return {"path": str(image), "bytes": None}
    if isinstance(image, PIL.Image.Image):
        return datasets.Image().encode_example(image)
    return {"path": image.get("path"), "bytes": image.get("bytes")}


def _image_size(image: Mapping[str, Any]) -> tuple[int, int]:
    """`(width, height)` of an undecoded `{"path", "bytes"}` image, EXIF orientation applied, from its header."""
    file = BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]
    with PIL.Image.open(file) as opened:
        width, height = opened.size
        if opened.getexif().get(_EXIF_ORIENTATION_TAG) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
    return width, height


def _report_counted(report: DataValidationReport, kind: str, message: str) -> None:
    report.add(kind, message)
    count = report.counts[kind]
    if count == 1 or math.log10(count).is_integer():
        logger.warning("%s: %s (%d %s so far in this process)", report.source, message, count, kind)


def _to_detection_example(
    example: dict[str, Any],
    *,
    columns: dict[str, str],
    box_format: str,
    normalized_boxes: bool,
    value_to_label: dict[Any, int],
    on_invalid: OnInvalid,
    report: DataValidationReport,
) -> dict[str, Any]:
    image = _image_reference(example[columns["image"]])
    image_id = example[columns["image_id"]]
    if not _is_int(image_id) and not (isinstance(image_id, np.integer)):
        raise DetectionDataError(f"column {columns['image_id']!r}: image id {image_id!r} is not an integer")
    image_id = int(image_id)
    width, height = example.get(columns["width"]), example.get(columns["height"])
    if width is None or height is None:
        width, height = _image_size(image)
    if not (_is_positive_size(width) and _is_positive_size(height)):
        raise DetectionDataError(f"image id {image_id}: width={width!r}, height={height!r} must be positive integers")
    width, height = int(width), int(height)

    objects = example[columns["objects"]] or []
    if isinstance(objects, dict):
        objects = [dict(zip(objects, values)) for values in zip(*objects.values())]
    converted = []
    for index, obj in enumerate(objects):
        where = f"image id {image_id}, object {index}"
        box, value = obj.get(columns["bbox"]), obj.get(columns["category"])
        problem = None
        if box is None or len(box) != 4 or not all(v is not None and math.isfinite(v) for v in box):
            problem = ("annotation_bad_bbox", f"{where}: {columns['bbox']!r} must be 4 finite numbers, got {box!r}")
        elif value not in value_to_label:
            problem = ("annotation_unknown_category", f"{where}: category {value!r} is not a known class")
        if problem is not None:
            if on_invalid == "raise":
                raise DetectionDataError(f"{report.source}: {problem[1]}")
            _report_counted(report, problem[0], f"skipped: {problem[1]}")
            continue
        x, y, w, h = _box_to_xywh([float(v) for v in box], box_format, normalized_boxes, width, height)
        if w <= 0 or h <= 0:
            _report_counted(report, "degenerate_box", f"{where}: box {box!r} has no area (kept)")
        elif x < 0 or y < 0 or x + w > width or y + h > height:
            _report_counted(report, "box_outside_image", f"{where}: box {box!r} leaves the {width}x{height} image")
        area = obj.get(columns["area"])
        converted.append(
            {
                "id": int(obj.get(columns["id"], -1)),
                "bbox": [x, y, w, h],
                "category": value_to_label[value],
                "area": float(w * h if area is None else area),
                "iscrowd": int(bool(obj.get(columns["iscrowd"], 0))),
            }
        )
    return {"image": image, "image_id": image_id, "width": width, "height": height, "objects": converted}


def _box_to_xywh(
    box: list[float], box_format: str, normalized: bool, width: int, height: int
) -> tuple[float, float, float, float]:
    a, b, c, d = box
    if normalized:
        a, b, c, d = a * width, b * height, c * width, d * height
    if box_format == "xyxy":
        return a, b, c - a, d - b
    if box_format == "cxcywh":
        return a - c / 2, b - d / 2, c, d
    return a, b, c, d
