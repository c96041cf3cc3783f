"""GFL (Generalized Focal Loss v1) detectors with timm backbones, registered with the transformers Auto classes."""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForObjectDetection, AutoVideoProcessor

from .configuration_gfl import GFLConfig
from .image_processing_gfl import GFLImageProcessor
from .modeling_gfl import GFLForObjectDetection, GFLObjectDetectionOutput, GFLPreTrainedModel

AutoConfig.register(GFLConfig.model_type, GFLConfig, exist_ok=True)
AutoModelForObjectDetection.register(GFLConfig, GFLForObjectDetection, exist_ok=True)
AutoImageProcessor.register(GFLConfig, image_processor_classes={"torchvision": GFLImageProcessor}, exist_ok=True)
# GFL has no video processor. Saying so keeps `pipeline(...)`, which also looks for one, from inferring a remote
# "GFLVideoProcessor" from the image processor's `auto_map` and asking whether to run it.
AutoVideoProcessor.register(GFLConfig, video_processor_classes={}, exist_ok=True)

GFLConfig.register_for_auto_class()
GFLForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")
GFLImageProcessor.register_for_auto_class()

__all__ = ["GFLConfig", "GFLForObjectDetection", "GFLImageProcessor", "GFLObjectDetectionOutput", "GFLPreTrainedModel"]
