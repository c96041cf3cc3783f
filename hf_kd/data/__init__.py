"""Detection data: COCO folders and Hub `objects` datasets as `datasets` objects, COCO-size annotation files prepared
once into parquet shards (`prepare_coco_detection`, `load_prepared_coco_detection`), transforms and collator.

The synthetic dataset generator is `hf_kd.data.synthetic` (not imported here, so that `python -m hf_kd.data.synthetic`
runs it cleanly)."""

from .coco import (
    CocoDetectionSource,
    DataValidationReport,
    DetectionCategories,
    DetectionDataError,
    detection_features,
    export_coco_to_parquet,
    find_coco_annotation_file,
    format_detection_dataset,
    get_id2label,
    load_coco_detection,
    load_detection_dataset,
    read_coco_detection,
)
from .collator import DetectionCollator, configure_training_process_memory, configure_worker_memory
from .prepared import PreparedCocoDetection, load_prepared_coco_detection, prepare_coco_detection
from .transforms import DetectionTransform

__all__ = [
    "CocoDetectionSource",
    "DataValidationReport",
    "DetectionCategories",
    "DetectionCollator",
    "DetectionDataError",
    "DetectionTransform",
    "PreparedCocoDetection",
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
