"""COCO-size detection data with bounded memory: a one-off preparation of a COCO annotation file into parquet shards,
and a streaming training source over them.

Parsing a COCO json costs time and memory in proportion to its size (train2017's 450 MB take ~15 s and ~2 GB per
process with pycocotools), and every dataloader worker that touches the parsed Python objects copies their pages.
[`prepare_coco_detection`] does that parse once: it validates the file like [`read_coco_detection`], writes the
examples (annotations, and image *paths*, not image bytes) in the common example layout to parquet shards of
consecutive images, and checks that the images, annotations, crowd regions and empty images in the shards equal the
json's. [`load_prepared_coco_detection`] then streams the shards with `datasets` (`load_dataset("parquet",
streaming=True)`): each process and dataloader worker reads only its own shards, a row group (at most
`hf_kd.data.parquet.ROW_GROUP_SIZE` images) at a time, so its memory does not grow with the dataset or with the
number of workers, and nothing of the json is held anywhere. The shards are written by `hf_kd.data.parquet`.

The prepared folder is a plain parquet dataset (features in the schema metadata), `load_dataset("parquet",
data_dir=...)` reads it as well; `hf_kd_prepared.json` in it records the counts, categories and source file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .coco import CocoDetectionSource, read_coco_detection
from .parquet import write_parquet_shards
from .schema import DetectionCategories, DetectionDataError, detection_features
from .validation import ANNOTATION_INVALID_KINDS, IMAGE_INVALID_KINDS, INVALID_KINDS, DataValidationReport, OnInvalid

logger = logging.getLogger(__name__)

MANIFEST_NAME = "hf_kd_prepared.json"
INDEX_NAME = "_hf_kd_index.npz"
FORMAT_VERSION = 1
COUNT_NAMES = ("images", "annotations", "crowd", "empty_images")


@dataclass(frozen=True)
class PreparedCocoDetection:
    """A prepared folder: its parquet shards, categories, counts, and where the images were at preparation."""

    path: Path
    shards: tuple[Path, ...]
    categories: DetectionCategories
    counts: dict[str, int]
    json_counts: dict[str, int]
    image_dir: Path
    annotation_file: Path
    split: str

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> PreparedCocoDetection:
        path = Path(path)
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{path} is not a prepared dataset (no {MANIFEST_NAME}); run prepare_coco_detection first, or let it "
                "finish"
            )
        manifest = json.loads(manifest_path.read_text())
        return cls(
            path=path,
            shards=tuple(path / name for name in manifest["shards"]),
            categories=DetectionCategories(
                names=tuple(manifest["categories"]["names"]),
                category_ids=tuple(manifest["categories"]["category_ids"]),
            ),
            counts=dict(manifest["counts"]),
            json_counts=dict(manifest["json_counts"]),
            image_dir=Path(manifest["image_dir"]),
            annotation_file=Path(manifest["annotation_file"]),
            split=manifest["split"],
        )

    @property
    def features(self) -> datasets.Features:
        return detection_features(self.categories.names)

    def __len__(self) -> int:
        return self.counts["images"]


def prepare_coco_detection(
    annotation_file: str | os.PathLike,
    output_dir: str | os.PathLike,
    image_dir: str | os.PathLike | None = None,
    *,
    num_shards: int | None = None,
    split: str = "train",
    on_invalid: OnInvalid = "raise",
    progress: bool = True,
) -> PreparedCocoDetection:
    """Prepares a COCO annotation file once for [`load_prepared_coco_detection`]; resumable.

    Args:
        annotation_file: COCO json (validated as by [`read_coco_detection`], with the same `image_dir` default and
            `on_invalid` handling).
        output_dir: folder for `{split}-0000k-of-0000n.parquet` shards (examples in the common layout, `image` a
            reference to the image file by absolute path, no bytes), the manifest and, while preparing, the parsed
            index.
        num_shards: shards of consecutive images; they are what processes and dataloader workers split, so use a
            multiple of `processes x workers`. Defaults to ~2,048 images a shard, rounded up to a multiple of 8
            (64 for COCO train2017), at most 512.
        progress: tqdm progress bar over the images written.

    Resuming: the json's parsed and validated arrays are kept in `output_dir/_hf_kd_index.npz` until the shards are
    done, shards are written to a temporary name and renamed when complete, and an interrupted preparation called
    again skips the parse and every finished shard. A folder prepared from the same file (same size and mtime) with
    the same `num_shards` and `split` is returned as it is.

    Raises:
        DetectionDataError: invalid data (with `on_invalid="raise"`), or the counts of images, annotations, crowd
            regions and empty images read back from the shards differ from the json's.
    """
    annotation_file = Path(annotation_file)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stat = annotation_file.stat()
    fingerprint = {
        "annotation_file": str(annotation_file.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "on_invalid": on_invalid,
        "format_version": FORMAT_VERSION,
    }
    manifest_path = output_dir / MANIFEST_NAME
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        same_source = manifest.get("fingerprint") == fingerprint and manifest.get("split") == split
        same_images = image_dir is None or Path(manifest.get("image_dir", "")) == Path(os.path.abspath(image_dir))
        if same_source and same_images and (num_shards is None or len(manifest["shards"]) == num_shards):
            logger.info("%s is already prepared from %s", output_dir, annotation_file)
            return PreparedCocoDetection.from_dir(output_dir)
        manifest_path.unlink()  # prepared from something else: redo (complete shards are kept, see below)

    start = time.perf_counter()
    source = _load_or_parse(annotation_file, output_dir, image_dir, on_invalid, fingerprint, progress)
    if num_shards is None:  # ~2,048 images a shard, a multiple of 8
        num_shards = min(8 * max(1, -(-len(source) // (2048 * 8))), 512)
    paths = write_parquet_shards(
        source,
        output_dir,
        num_shards,
        split=split,
        resume=True,
        progress=progress,
        description=f"Preparing {annotation_file.name}",
    )
    for stale in set(output_dir.glob("*.parquet")) - set(paths):  # shards of an earlier preparation
        stale.unlink()
    names = [path.name for path in paths]
    counts = _verify(output_dir, names, source)
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "annotation_file": str(annotation_file.resolve()),
        "image_dir": os.path.abspath(source.image_dir),
        "split": split,
        "shards": names,
        "counts": counts,
        "json_counts": source.json_counts,
        "skipped": {kind: source.report.counts[kind] for kind in INVALID_KINDS if source.report.counts[kind]},
        "categories": {"names": list(source.categories.names), "category_ids": list(source.categories.category_ids)},
        "seconds": round(time.perf_counter() - start, 2),
    }
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)
    (output_dir / INDEX_NAME).unlink(missing_ok=True)
    logger.info("prepared %s: %s (%d shards)", output_dir, counts, len(names))
    return PreparedCocoDetection.from_dir(output_dir)


def load_prepared_coco_detection(
    path: str | os.PathLike | PreparedCocoDetection,
    *,
    image_dir: str | os.PathLike | None = None,
) -> datasets.IterableDataset:
    """A streaming dataset over a folder written by [`prepare_coco_detection`], in the common example layout.

    It has one shard per parquet file, which `split_dataset_by_node` and dataloader workers distribute (shuffle
    with `.shuffle(seed, buffer_size)` and call `set_epoch` as usual). Every process and worker reads only its own
    shards, a row group at a time. `image_dir` points the image paths to a new folder when the images have moved
    since preparation.
    """
    prepared = path if isinstance(path, PreparedCocoDetection) else PreparedCocoDetection.from_dir(path)
    dataset = datasets.load_dataset(
        "parquet",
        data_files={"train": [str(shard) for shard in prepared.shards]},
        split="train",
        streaming=True,
        features=prepared.features,
    )
    if image_dir is not None and Path(image_dir) != prepared.image_dir:
        old, new = str(prepared.image_dir), str(Path(image_dir))
        # Untyped map on undecoded images, then cast: images are decoded at the end of the pipeline.
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
        dataset = dataset.map(_move_image, fn_kwargs={"old": old, "new": new}).cast(prepared.features)
    return dataset


def _move_image(example: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    path = example["image"]["path"]
    relative = os.path.relpath(path, old) if path.startswith(old) else path
    return {"image": {"path": os.path.join(new, relative), "bytes": None}}


def _load_or_parse(
    annotation_file: Path,
    output_dir: Path,
    image_dir: str | os.PathLike | None,
    on_invalid: OnInvalid,
    fingerprint: Mapping[str, Any],
    progress: bool,
) -> CocoDetectionSource:
    """The validated source: from the index saved by an interrupted preparation, else parsed (and saved)."""
    index_path = output_dir / INDEX_NAME
    if index_path.is_file():
        try:
            with np.load(index_path, allow_pickle=False) as index:
                meta = json.loads(str(index["meta"]))
                if meta["fingerprint"] == dict(fingerprint) and (
                    image_dir is None or Path(meta["image_dir"]) == Path(os.path.abspath(image_dir))
                ):
                    logger.info("%s: resuming from the parsed index %s", annotation_file, index_path)
                    report = DataValidationReport(meta["report_source"])
                    report.counts.update(meta["report_counts"])
                    return CocoDetectionSource(
                        annotation_file=annotation_file,
                        image_dir=Path(meta["image_dir"]),
                        categories=DetectionCategories(
                            names=tuple(meta["names"]), category_ids=tuple(meta["category_ids"])
                        ),
                        report=report,
                        json_counts=meta["json_counts"],
                        **{key: index[key] for key in _ARRAY_FIELDS},
                    )
        except (OSError, ValueError, KeyError) as error:
            logger.warning("%s: unreadable, parsing the json again (%s)", index_path, error)
    if progress:
        tqdm.write(f"Parsing and validating {annotation_file} ...")
    source = read_coco_detection(annotation_file, image_dir, on_invalid=on_invalid)
    meta = {
        "fingerprint": dict(fingerprint),
        "image_dir": os.path.abspath(source.image_dir),
        "names": list(source.categories.names),
        "category_ids": list(source.categories.category_ids),
        "json_counts": source.json_counts,
        "report_source": source.report.source,
        "report_counts": dict(source.report.counts),
    }
    tmp = index_path.with_name(index_path.name + ".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **{key: getattr(source, key) for key in _ARRAY_FIELDS})
    os.replace(tmp, index_path)
    return source


_ARRAY_FIELDS = (
    "image_ids",
    "file_names",
    "widths",
    "heights",
    "annotation_offsets",
    "annotation_ids",
    "boxes",
    "labels",
    "areas",
    "iscrowd",
)


def _verify(output_dir: Path, names: list[str], source: CocoDetectionSource) -> dict[str, int]:
    """Counts read back from the shards; raises unless they equal the validated source's and, up to what validation
    skipped, the json's."""
    counts = dict.fromkeys(COUNT_NAMES, 0)
    image_ids = []
    for name in names:
        table = pq.read_table(output_dir / name, columns=["image_id", "objects"])
        lengths = pc.list_value_length(table["objects"]).fill_null(0)
        flat = pc.list_flatten(table["objects"])
        counts["images"] += table.num_rows
        counts["annotations"] += int(pc.sum(lengths).as_py() or 0)
        counts["crowd"] += int(pc.sum(pc.struct_field(flat, "iscrowd")).as_py() or 0)
        counts["empty_images"] += int(pc.sum(pc.equal(lengths, 0).cast(pa.int64())).as_py() or 0)
        image_ids.append(table["image_id"].to_numpy())
    problems = []
    expected = source.counts()
    if counts != expected:
        problems.append(f"the shards hold {counts}, the validated annotations {expected}")
    if not np.array_equal(np.concatenate(image_ids) if image_ids else np.zeros(0), source.image_ids):
        problems.append("the shards' image ids are not the annotation file's, in order")
    json_counts, report = source.json_counts, source.report
    skipped_images = sum(report.counts[kind] for kind in IMAGE_INVALID_KINDS)
    skipped_annotations = sum(report.counts[kind] for kind in ANNOTATION_INVALID_KINDS)
    if counts["images"] + skipped_images != json_counts["images"]:
        problems.append(f"{counts['images']} images + {skipped_images} skipped != {json_counts['images']} in the json")
    if counts["annotations"] + skipped_annotations != json_counts["annotations"]:
        problems.append(
            f"{counts['annotations']} annotations + {skipped_annotations} skipped != {json_counts['annotations']} in "
            "the json"
        )
    if not report.num_invalid and counts != json_counts:
        problems.append(f"the shards hold {counts}, the json {json_counts}")
    if problems:
        raise DetectionDataError(f"{source.annotation_file}: preparation lost data: " + "; ".join(problems))
    if report.num_invalid:
        logger.warning(
            "%s: prepared %s of the json's %s (skipped invalid entries: %s)",
            source.annotation_file,
            counts,
            json_counts,
            {kind: report.counts[kind] for kind in INVALID_KINDS if report.counts[kind]},
        )
    return counts
