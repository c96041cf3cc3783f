"""Detection data: COCO folders and Hub `objects` datasets as `datasets` objects in one example layout, COCO-size
annotation files prepared once into parquet shards (`prepare_coco_detection`, `load_prepared_coco_detection`),
transforms and collator.

Modules: `schema` (the example layout, categories, errors), `validation` (the checks every source shares and their
report), `image_files` (checks of image files before training), `coco` (local COCO folders), `hub` (Hub `objects`
datasets), `parquet` (the parquet shard writer), `prepared` (prepared COCO-size data), `transforms`, `collator`. The
synthetic dataset generator is `hf_kd.data.synthetic` (not imported here, so that `python -m hf_kd.data.synthetic`
runs it cleanly).
"""

from .coco import (
    CocoDetectionSource,
    export_coco_to_parquet,
    find_coco_annotation_file,
    load_coco_detection,
    read_coco_detection,
)
from .collator import DetectionCollator, configure_training_process_memory, configure_worker_memory
from .hub import format_detection_dataset, load_detection_dataset
from .prepared import PreparedCocoDetection, load_prepared_coco_detection, prepare_coco_detection
from .schema import (
    DetectionCategories,
    DetectionDataError,
    check_same_categories,
    detection_features,
    get_id2label,
)
from .transforms import DetectionTransform
from .validation import DataValidationReport

__all__ = [
    "CocoDetectionSource",
    "DataValidationReport",
    "DetectionCategories",
    "DetectionCollator",
    "DetectionDataError",
    "DetectionTransform",
    "PreparedCocoDetection",
    "check_same_categories",
    "configure_training_process_memory",
    "configure_worker_memory",
    "detection_features",
    "export_coco_to_parquet",
    "find_coco_annotation_file",
    "format_detection_dataset",
    "get_id2label",
    "load_coco_detection",
    "load_detection_dataset",
    "load_prepared_coco_detection",
    "prepare_coco_detection",
    "read_coco_detection",
]
