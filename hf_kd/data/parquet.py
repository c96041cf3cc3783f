"""Parquet shards of a validated COCO source (`CocoDetectionSource`): its examples in the common layout, built as
Arrow tables straight from the source's arrays, one shard of consecutive images at a time.

The one writer behind `export_coco_to_parquet` (image bytes embedded) and `prepare_coco_detection` (image paths,
resumable). The shards keep the features in their schema metadata, so `datasets.load_dataset("parquet", ...)` reads
them back in the same layout.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from .coco import CocoDetectionSource

logger = logging.getLogger(__name__)

ROW_GROUP_SIZE = 256


def shard_table(source: CocoDetectionSource, start: int, stop: int, embed_images: bool = False) -> pa.Table:
    """The examples of images `start:stop` as an Arrow table with the source's features.

    `image` is the file's bytes and name with `embed_images`, else a reference to the file by absolute path.
    """
    schema = source.features.arrow_schema
    file_names = [str(name) for name in source.file_names[start:stop]]
    if embed_images:
        image_bytes = pa.array([(source.image_dir / name).read_bytes() for name in file_names], pa.binary())
        image_paths = pa.array(file_names, pa.string())
    else:
        image_dir = os.path.abspath(source.image_dir)
        image_bytes = pa.nulls(stop - start, pa.binary())
        image_paths = pa.array([os.path.join(image_dir, name) for name in file_names], pa.string())
    image = pa.StructArray.from_arrays([image_bytes, image_paths], fields=list(schema.field("image").type))

    first, last = int(source.annotation_offsets[start]), int(source.annotation_offsets[stop])
    object_type = schema.field("objects").type.value_type
    objects = pa.StructArray.from_arrays(
        [
            pa.array(source.annotation_ids[first:last], pa.int64()),
            pa.FixedSizeListArray.from_arrays(
                pa.array(np.ascontiguousarray(source.boxes[first:last]).reshape(-1), pa.float64()),
                type=object_type.field("bbox").type,
            ),
            pa.array(source.labels[first:last], pa.int64()),
            pa.array(source.areas[first:last], pa.float64()),
            pa.array(source.iscrowd[first:last], pa.int64()),
        ],
        fields=list(object_type),
    )
    offsets = pa.array(source.annotation_offsets[start : stop + 1] - first, pa.int32())
    columns = [
        image,
        pa.array(source.image_ids[start:stop], pa.int64()),
        pa.array(source.widths[start:stop], pa.int32()),
        pa.array(source.heights[start:stop], pa.int32()),
        pa.ListArray.from_arrays(offsets, objects, type=schema.field("objects").type),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def shard_paths(output_dir: str | os.PathLike, split: str, num_shards: int) -> list[Path]:
    """The paths of the shards `{split}-0000k-of-0000n.parquet` that [`write_parquet_shards`] writes."""
    return [Path(output_dir) / f"{split}-{k:05d}-of-{num_shards:05d}.parquet" for k in range(num_shards)]


def write_parquet_shards(
    source: CocoDetectionSource,
    output_dir: str | os.PathLike,
    num_shards: int,
    *,
    split: str = "train",
    embed_images: bool = False,
    resume: bool = False,
    progress: bool = True,
    description: str = "Writing parquet",
) -> list[Path]:
    """Writes the source's examples to shards `{split}-0000k-of-0000n.parquet` of consecutive images
    (`source.shard_bounds(num_shards)`, row groups of `ROW_GROUP_SIZE` images); returns their paths.

    Each shard is written to a temporary name and renamed when complete. With `resume`, a shard already complete
    (its row count and schema) is kept as it is. `embed_images`: see [`shard_table`].
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    schema = source.features.arrow_schema
    bounds = source.shard_bounds(num_shards)
    paths = shard_paths(output_dir, split, len(bounds))
    kept = 0
    with tqdm(total=len(source), desc=description, unit="img", disable=not progress) as bar:
        for path, (start, stop) in zip(paths, bounds):
            if resume and _is_complete_shard(path, stop - start, schema):
                kept += 1
            else:
                table = shard_table(source, start, stop, embed_images=embed_images)
                tmp = path.with_name(path.name + ".tmp")
                pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE)
                os.replace(tmp, path)
            bar.update(stop - start)
    if kept:
        logger.info("%s: %d of %d shards were already written (resumed)", output_dir, kept, len(paths))
    return paths


def _is_complete_shard(path: Path, num_rows: int, schema: pa.Schema) -> bool:
    if not path.is_file():
        return False
    try:
        metadata = pq.read_metadata(path)
        return metadata.num_rows == num_rows and metadata.schema.to_arrow_schema().equals(schema)
    except (OSError, pa.ArrowInvalid):
        return False
