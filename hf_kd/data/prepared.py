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
data_dir=...)` reads it as well; `hf_kd_prepared.json` in it records the counts, categories, source file and the
shards hf_kd wrote, the only files it ever replaces or deletes there.
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
from .parquet import shard_paths, write_parquet_shards
from .schema import DetectionCategories, DetectionDataError, detection_features
from .validation import ANNOTATION_INVALID_KINDS, IMAGE_INVALID_KINDS, INVALID_KINDS, DataValidationReport, OnInvalid

logger = logging.getLogger(__name__)

MANIFEST_NAME = "hf_kd_prepared.json"
PROGRESS_NAME = "hf_kd_preparing.json"
INDEX_NAME = "_hf_kd_index.npz"
FORMAT_VERSION = 2
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
    verify_images: bool = False,
    progress: bool = True,
) -> PreparedCocoDetection:
    """Prepares a COCO annotation file once for [`load_prepared_coco_detection`]; resumable.

    Args:
        annotation_file: COCO json (validated as by [`read_coco_detection`], with the same `image_dir` default and
            `on_invalid` handling).
        output_dir: a new or empty folder, or one that holds a preparation of the same file and split, for
            `{split}-0000k-of-0000n.parquet` shards (examples in the common layout, `image` a reference to the image
            file by absolute path, no bytes), the manifest and, while preparing, the parsed index.
        num_shards: shards of consecutive images; they are what processes and dataloader workers split, so use a
            multiple of `processes x workers`. Defaults to ~2,048 images a shard, rounded up to a multiple of 8
            (64 for COCO train2017), at most 512.
        verify_images: check every image file once, as [`read_coco_detection`] does.
        progress: tqdm progress bars over the images checked and written.

    Resuming: the json's parsed and validated arrays are kept in `output_dir/_hf_kd_index.npz` until the shards are
    done, shards are written to a temporary name and renamed when complete, and an interrupted preparation called
    again skips the parse and every finished shard. A folder prepared from the same file (same size and mtime) with
    the same options is returned as it is; one prepared from an earlier version of the file, or with other options,
    is prepared again.

    Only files that hf_kd wrote are ever replaced or deleted: the shards a preparation writes are recorded (in
    `hf_kd_preparing.json` while it runs, then in the manifest), and only those are removed when the folder is
    prepared again; other files in the folder are left as they are.

    Raises:
        FileExistsError: `output_dir` is not empty and holds no preparation by hf_kd, or a preparation of another
            annotation file or split.
        DetectionDataError: invalid data (with `on_invalid="raise"`), or the counts of images, annotations, crowd
            regions and empty images read back from the shards differ from the json's.
    """
    annotation_file = Path(annotation_file)
    output_dir = Path(output_dir)
    stat = annotation_file.stat()
    fingerprint = {
        "annotation_file": str(annotation_file.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "on_invalid": on_invalid,
        "verify_images": verify_images,
        "format_version": FORMAT_VERSION,
    }
    record = _claim(output_dir, fingerprint["annotation_file"], split) or {}
    resumable = record.get("fingerprint") == fingerprint and (
        image_dir is None or Path(record.get("image_dir") or "") == Path(os.path.abspath(image_dir))
    )
    manifest_path, progress_path = output_dir / MANIFEST_NAME, output_dir / PROGRESS_NAME
    complete = manifest_path.is_file() and not progress_path.is_file()
    if resumable and complete and (num_shards is None or len(record["shards"]) == num_shards):
        logger.info("%s is already prepared from %s", output_dir, annotation_file)
        return PreparedCocoDetection.from_dir(output_dir)
    owned = set(record.get("shards", ()))
    if record and not resumable:  # prepared from an earlier version of the file, or with other options
        _remove(output_dir, owned)
        owned = set()
    output_dir.mkdir(parents=True, exist_ok=True)
    claim = {"annotation_file": fingerprint["annotation_file"], "split": split, "fingerprint": fingerprint}
    _write_json(
        progress_path, {**claim, "image_dir": record.get("image_dir") if owned else None, "shards": sorted(owned)}
    )
    manifest_path.unlink(missing_ok=True)

    start = time.perf_counter()
    source = _load_or_parse(annotation_file, output_dir, image_dir, on_invalid, verify_images, fingerprint, progress)
    if num_shards is None:  # ~2,048 images a shard, a multiple of 8
        num_shards = min(8 * max(1, -(-len(source) // (2048 * 8))), 512)
    names = [path.name for path in shard_paths(output_dir, split, len(source.shard_bounds(num_shards)))]
    foreign = [name for name in names if (output_dir / name).exists() and name not in owned]
    if foreign:
        raise FileExistsError(f"{output_dir}: {foreign} were not written by hf_kd; move them to prepare this folder")
    image_dir_written = os.path.abspath(source.image_dir)
    _write_json(progress_path, {**claim, "image_dir": image_dir_written, "shards": sorted(owned | set(names))})
    paths = write_parquet_shards(
        source,
        output_dir,
        num_shards,
        split=split,
        resume=True,
        progress=progress,
        description=f"Preparing {annotation_file.name}",
    )
    counts = _verify(output_dir, names, source)
    manifest = {
        "format_version": FORMAT_VERSION,
        **claim,
        "image_dir": image_dir_written,
        "shards": names,
        "counts": counts,
        "json_counts": source.json_counts,
        "skipped": {kind: source.report.counts[kind] for kind in INVALID_KINDS if source.report.counts[kind]},
        "categories": {"names": list(source.categories.names), "category_ids": list(source.categories.category_ids)},
        "seconds": round(time.perf_counter() - start, 2),
    }
    _write_json(manifest_path, manifest)
    _remove(output_dir, owned - {path.name for path in paths}, keep_records=True)  # shards of an earlier preparation
    (output_dir / INDEX_NAME).unlink(missing_ok=True)
    progress_path.unlink()
    logger.info("prepared %s: %s (%d shards)", output_dir, counts, len(names))
    return PreparedCocoDetection.from_dir(output_dir)


def _claim(output_dir: Path, annotation_file: str, split: str) -> dict[str, Any] | None:
    """The record (the preparation in progress, else the manifest) of an earlier preparation of `annotation_file`'s
    `split` in `output_dir`; None for a new or empty folder. Raises `FileExistsError` for any other folder."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} is a file, not a folder for a prepared dataset")
    for name in (PROGRESS_NAME, MANIFEST_NAME):
        if (output_dir / name).is_file():
            record = json.loads((output_dir / name).read_text())
            if (record.get("annotation_file"), record.get("split")) != (annotation_file, split):
                raise FileExistsError(
                    f"{output_dir} holds a preparation of {record.get('annotation_file')} (split "
                    f"{record.get('split')!r}), not of {annotation_file} (split {split!r}): give another folder, or "
                    "delete this one to prepare it again"
                )
            return record
    entries = sorted(os.listdir(output_dir)) if output_dir.is_dir() else []
    if entries:
        listed = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise FileExistsError(
            f"{output_dir} is not empty and holds no preparation by hf_kd (no {MANIFEST_NAME}): {listed}. Give a new "
            "or empty folder; hf_kd never deletes files it did not write"
        )
    return None


def _remove(output_dir: Path, shards: set[str], keep_records: bool = False) -> None:
    """Removes the given shards of an earlier preparation (and their temporary files) and, unless `keep_records`,
    the index and manifest it wrote."""
    names = [*shards, *(f"{name}.tmp" for name in shards)]
    if not keep_records:
        names += [INDEX_NAME, f"{INDEX_NAME}.tmp.npz", MANIFEST_NAME, f"{MANIFEST_NAME}.tmp"]
    for name in names:
        (output_dir / name).unlink(missing_ok=True)


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=1))
    os.replace(tmp, path)


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
    verify_images: bool,
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
    source = read_coco_detection(
        annotation_file, image_dir, on_invalid=on_invalid, verify_images=verify_images, progress=progress
    )
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
