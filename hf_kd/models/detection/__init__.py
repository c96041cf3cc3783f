"""Dense object detectors with timm backbones (GFL, RetinaNet, FCOS, ATSS), registered with the transformers Auto
classes and the object-detection pipeline.

Every family lives in this one folder (`configuration_<family>.py`, `modeling_<family>.py`) and shares the parts
beside it (backbone, FPN, head towers, priors, assigners, box ops, losses, post-processing) through relative imports,
so that `save_pretrained` copies a family's remote code together with the shared files it needs.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForObjectDetection, AutoVideoProcessor
from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES

from .configuration_atss import ATSSConfig
from .configuration_dense import DenseDetectorConfig
from .configuration_fcos import FCOSConfig
from .configuration_gfl import GFLConfig
from .configuration_retinanet import RetinaNetConfig
from .image_processing_dense import (
    ATSSImageProcessor,
    DenseDetectionImageProcessor,
    FCOSImageProcessor,
    GFLImageProcessor,
    RetinaNetImageProcessor,
)
from .modeling_atss import ATSSForObjectDetection, ATSSPreTrainedModel
from .modeling_dense import DenseDetectionOutput, DenseDetectorPreTrainedModel
from .modeling_fcos import FCOSForObjectDetection, FCOSPreTrainedModel
from .modeling_gfl import GFLForObjectDetection, GFLPreTrainedModel
from .modeling_retinanet import RetinaNetForObjectDetection, RetinaNetPreTrainedModel

# model_type -> (config, model, image processor) of every family.
FAMILIES = {
    "gfl": (GFLConfig, GFLForObjectDetection, GFLImageProcessor),
    "retinanet": (RetinaNetConfig, RetinaNetForObjectDetection, RetinaNetImageProcessor),
    "fcos": (FCOSConfig, FCOSForObjectDetection, FCOSImageProcessor),
    "atss": (ATSSConfig, ATSSForObjectDetection, ATSSImageProcessor),
}

for config_class, model_class, processor_class in FAMILIES.values():
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForObjectDetection.register(config_class, model_class, exist_ok=True)
    AutoImageProcessor.register(config_class, image_processor_classes={"torchvision": processor_class}, exist_ok=True)
    # No video processor. Saying so keeps `pipeline(...)`, which also looks for one, from inferring a remote one from
    # the image processor's `auto_map` and asking whether to run it.
    AutoVideoProcessor.register(config_class, video_processor_classes={}, exist_ok=True)
    # The object-detection pipeline checks the model class against this table only (not the Auto registrations).
    MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES.setdefault(config_class.model_type, model_class.__name__)
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModelForObjectDetection")
    processor_class.register_for_auto_class()

__all__ = [
    "FAMILIES",
    "ATSSConfig",
    "ATSSForObjectDetection",
    "ATSSImageProcessor",
    "ATSSPreTrainedModel",
    "DenseDetectionImageProcessor",
    "DenseDetectionOutput",
    "DenseDetectorConfig",
    "DenseDetectorPreTrainedModel",
    "FCOSConfig",
    "FCOSForObjectDetection",
    "FCOSImageProcessor",
    "FCOSPreTrainedModel",
    "GFLConfig",
    "GFLForObjectDetection",
    "GFLImageProcessor",
    "GFLPreTrainedModel",
    "RetinaNetConfig",
    "RetinaNetForObjectDetection",
    "RetinaNetImageProcessor",
    "RetinaNetPreTrainedModel",
]
