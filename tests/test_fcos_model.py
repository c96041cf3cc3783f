"""FCOSForObjectDetection: configuration, initialisation, outputs, a step without boxes and a CrossKD training step
through `DetectionDistiller` with an FCOS teacher (save/load, remote code, the pipeline and overfitting real photos:
tests/test_families.py)."""

import copy
import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from model_utils import TINY_LABELS, random_batch

from hf_kd import DetectionDistiller, DistillationConfig
from hf_kd.models.detection.configuration_fcos import FCOSConfig
from hf_kd.models.detection.modeling_fcos import FCOSForObjectDetection

LOSS_NAMES = {"loss_cls", "loss_bbox", "loss_centerness"}
LABELS = [
    {
        "boxes": torch.tensor([[10.0, 12.0, 90.0, 100.0], [60.0, 20.0, 150.0, 120.0]]),
        "class_labels": torch.tensor([1, 2]),
    },
    {"boxes": torch.tensor([[4.0, 30.0, 70.0, 90.0]]), "class_labels": torch.tensor([0])},
]


def tiny_config(**kwargs) -> FCOSConfig:
    defaults = {"backbone": "resnet18", "fpn_channels": 32, "head_channels": 32, "id2label": TINY_LABELS}
    return FCOSConfig(**(defaults | kwargs))


# ---------------------------------------------------------------------------------------------------------------------
# Configuration, initialisation, outputs
# ---------------------------------------------------------------------------------------------------------------------


def test_config_defaults_are_mmdetection_plain_fcos():
    config = FCOSConfig()
    assert config.model_type == "fcos"
    assert config.fpn_extra_convs_on == "output" and config.fpn_relu_before_extra_convs
    assert config.norm_groups == 32 and config.stacked_convs == 4
    assert config.regress_ranges == [[-1, 64], [64, 128], [128, 256], [256, 512], [512, 1e8]]
    assert (config.focal_alpha, config.focal_gamma) == (0.25, 2.0)
    assert (config.loss_cls_weight, config.loss_bbox_weight, config.loss_centerness_weight) == (1.0, 1.0, 1.0)
    assert config.prediction_settings == ("num_labels", "strides", "regress_ranges")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"regress_ranges": [[-1, 64], [64, 1e8]]}, "one \\(low, high\\) pair per level"),
        ({"regress_ranges": [[-1, 64], [64, 128], [256, 128], [256, 512], [512, 1e8]]}, "low < high"),
    ],
)
def test_config_rejects_bad_regress_ranges(kwargs, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        FCOSConfig(**kwargs)


def test_initialization_of_a_new_detector():
    """MMDetection's FCOS init: normal(0, 0.01) head convs, classifier bias at prior 0.01, other biases 0, scales 1."""
    torch.manual_seed(0)
    head = FCOSForObjectDetection(tiny_config()).head
    torch.testing.assert_close(head.conv_cls.bias, torch.full((3,), -math.log(99)))
    for conv in (head.conv_reg, head.conv_centerness, head.cls_convs[0].conv):
        assert 0.005 < conv.weight.std() < 0.02
    assert head.conv_reg.bias.abs().sum() == 0 and head.conv_centerness.bias.abs().sum() == 0
    assert all(scale.scale.item() == 1.0 for scale in head.scales)
    assert head.cls_convs[0].conv.bias is None, "GroupNorm towers: convs without bias"


def test_outputs_are_points_and_positive_distances():
    torch.manual_seed(0)
    model = FCOSForObjectDetection(tiny_config()).eval()
    with torch.no_grad():
        outputs = model(**random_batch())
    num_points = sum(math.ceil(128 / stride) * math.ceil(160 / stride) for stride in model.config.strides)
    assert outputs.priors.shape == (num_points, 2)
    assert outputs.logits.shape == (2, num_points, 3) and outputs.centerness_logits.shape == (2, num_points)
    assert outputs.bbox_regression.shape == (2, num_points, 4) and (outputs.bbox_regression > 0).all()
    points = outputs.priors.expand(2, -1, -1)
    torch.testing.assert_close(outputs.pred_boxes[..., :2], points - outputs.bbox_regression[..., :2])
    torch.testing.assert_close(outputs.pred_boxes[..., 2:], points + outputs.bbox_regression[..., 2:])


def test_training_step_without_boxes_is_finite():
    """An image without boxes trains its classification only; the box and centre-ness losses are 0, not NaN."""
    torch.manual_seed(0)
    model = FCOSForObjectDetection(tiny_config()).train()
    empty = [{"boxes": torch.zeros(0, 4), "class_labels": torch.zeros(0, dtype=torch.long)}] * 2
    outputs = model(**random_batch(), labels=empty)
    assert outputs.loss_dict["loss_bbox"] == 0 and outputs.loss_dict["loss_centerness"] == 0
    outputs.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.head.conv_cls.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# CrossKD with an FCOS teacher
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher_channels", [32, 64])
def test_crosskd_training_step(teacher_channels):
    """A CrossKD step (cross-head from conv 2) with an FCOS teacher, of the student's width or wider (adapters): finite
    losses, gradients in the student up to the cross-head point and none in the teacher, which stays unchanged."""
    torch.manual_seed(0)
    student = FCOSForObjectDetection(tiny_config()).train()
    teacher = FCOSForObjectDetection(tiny_config(fpn_channels=teacher_channels, head_channels=teacher_channels))
    teacher_before = copy.deepcopy(teacher.state_dict())
    kd = DetectionDistiller(student, teacher, DistillationConfig.from_method("crosskd", "fcos"))
    outputs = kd(**random_batch(), labels=LABELS)
    assert set(outputs.loss_dict) == LOSS_NAMES | {"loss_cls_kd", "loss_loc_kd"}
    assert all(torch.isfinite(value) and value > 0 for value in outputs.loss_dict.values()), outputs.loss_dict

    (outputs.loss_dict["loss_cls_kd"] + outputs.loss_dict["loss_loc_kd"]).backward()
    # timm zero-initialises each block's last BatchNorm: in a new backbone the gradient flows through it and the
    # shortcuts only
    for prefix in (
        "head.cls_convs.1",
        "head.reg_convs.0",
        "neck.",
        "backbone.layer4.1.bn2",
        "backbone.layer2.0.downsample",
    ):
        grads = [p.grad for name, p in student.named_parameters() if name.startswith(prefix) and p.requires_grad]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), prefix
    # the student's convs after the cross-head point and its predictors are not used by the KD losses
    assert student.head.cls_convs[2].conv.weight.grad is None and student.head.conv_reg.weight.grad is None
    assert all(p.grad is None for p in teacher.parameters())

    student.zero_grad()
    optimizer = torch.optim.SGD(kd.parameters(), lr=0.01)
    before = student.head.conv_cls.weight.detach().clone()
    kd(**random_batch(), labels=LABELS).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in kd.parameters() if p.grad is not None)
    optimizer.step()
    assert not torch.equal(student.head.conv_cls.weight, before)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
