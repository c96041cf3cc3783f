"""ATSSForObjectDetection: the config and its round trip, the head, decoding, losses and a CrossKD training step with
an ATSS teacher (save/load, remote code, the pipeline and overfitting real photos: tests/test_families.py)."""

import copy

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from model_utils import TINY_LABELS
from model_utils import random_batch as random_images

from hf_kd import DetectionDistiller, DistillationConfig
from hf_kd.models.detection.configuration_atss import ATSSConfig
from hf_kd.models.detection.modeling_atss import ATSSForObjectDetection

LOSS_NAMES = ("loss_cls", "loss_bbox", "loss_centerness")


def tiny_config(**kwargs) -> ATSSConfig:
    defaults = {"backbone": "resnet18", "fpn_channels": 32, "head_channels": 32, "id2label": TINY_LABELS}
    return ATSSConfig(**(defaults | kwargs))


LABELS = [
    {
        "boxes": torch.tensor([[10.0, 12.0, 90.0, 100.0], [100.0, 20.0, 150.0, 60.0]]),
        "class_labels": torch.tensor([1, 2]),
    },
    {"boxes": torch.tensor([[20.0, 30.0, 80.0, 90.0]]), "class_labels": torch.tensor([0])},
]


def random_batch(seed: int = 0) -> dict:
    """Two normalized images of different sizes padded to 128x160, their pixel mask and boxes."""
    return dict(random_images(seed), labels=LABELS)


# ---------------------------------------------------------------------------------------------------------------------
# Config and model
# ---------------------------------------------------------------------------------------------------------------------


def test_config_defaults_are_mmdetection_atss():
    config = ATSSConfig()
    assert config.model_type == "atss"
    assert (config.fpn_extra_convs_on, config.fpn_relu_before_extra_convs, config.norm_groups) == ("output", False, 32)
    assert (config.prior_scale, config.atss_topk, config.box_coder_stds) == (8.0, 9, [0.1, 0.1, 0.2, 0.2])
    assert (config.focal_alpha, config.focal_gamma) == (0.25, 2.0)
    assert (config.loss_cls_weight, config.loss_bbox_weight, config.loss_centerness_weight) == (1.0, 2.0, 1.0)
    assert set(config.prediction_settings) == {"num_labels", "strides", "prior_scale", "box_coder_stds"}


def test_config_round_trip(tmp_path):
    config = tiny_config(box_coder_stds=(0.1, 0.1, 0.3, 0.3))
    config.save_pretrained(tmp_path)
    loaded = ATSSConfig.from_pretrained(tmp_path)
    assert loaded.box_coder_stds == [0.1, 0.1, 0.3, 0.3] == config.box_coder_stds
    assert loaded.id2label == TINY_LABELS and loaded.model_type == "atss"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"box_coder_stds": [0.1, 0.1, 0.2]}, "box_coder_stds"), ({"atss_topk": 0}, "atss_topk")],
)
def test_config_rejects_bad_settings(kwargs, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        tiny_config(**kwargs)


def test_head_predictors_and_initialisation():
    """MMDetection's predictor names and shapes (so that the converter's keys apply) and its init: classifier bias at
    the prior probability, centre-ness and box biases 0, scales 1."""
    model = ATSSForObjectDetection(tiny_config())
    head = model.head
    assert (head.atss_cls.out_channels, head.atss_reg.out_channels, head.atss_centerness.out_channels) == (3, 4, 1)
    assert head.classifier is head.atss_cls
    torch.testing.assert_close(head.atss_cls.bias, torch.full((3,), -4.59512), atol=1e-5, rtol=0)
    assert head.atss_reg.bias.abs().sum() == 0 and head.atss_centerness.bias.abs().sum() == 0
    assert all(scale.scale.item() == 1.0 for scale in head.scales) and len(head.scales) == 5


def test_zero_deltas_decode_to_the_anchors():
    model = ATSSForObjectDetection(tiny_config())
    priors = model.make_priors([(2, 3), (1, 2)], torch.device("cpu"))
    torch.testing.assert_close(priors[:2], torch.tensor([[-32.0, -32.0, 32.0, 32.0], [-24.0, -32.0, 40.0, 32.0]]))
    boxes = model.decode_boxes(priors, torch.zeros(1, len(priors), 4), [6, 2])
    torch.testing.assert_close(boxes[0], priors, atol=0, rtol=0)


def test_forward_losses_and_outputs():
    torch.manual_seed(0)
    model = ATSSForObjectDetection(tiny_config()).eval()
    batch = random_batch()
    with torch.no_grad():
        outputs = model(**batch)
        no_boxes = {"boxes": torch.zeros(0, 4), "class_labels": torch.zeros(0, dtype=torch.long)}
        one_empty = model(batch["pixel_values"], batch["pixel_mask"], labels=[batch["labels"][0], no_boxes])
    num_priors = 16 * 20 + 8 * 10 + 4 * 5 + 2 * 3 + 1 * 2
    assert outputs.logits.shape == (2, num_priors, 3) and outputs.bbox_regression.shape == (2, num_priors, 4)
    assert outputs.centerness_logits.shape == (2, num_priors) and outputs.pred_boxes.shape == (2, num_priors, 4)
    assert set(outputs.loss_dict) == set(LOSS_NAMES)
    assert all(torch.isfinite(value) and value > 0 for value in outputs.loss_dict.values())
    assert all(torch.isfinite(value) and value > 0 for value in one_empty.loss_dict.values())


# ---------------------------------------------------------------------------------------------------------------------
# Distillation: a CrossKD training step with an ATSS teacher
# ---------------------------------------------------------------------------------------------------------------------


def test_crosskd_training_step_reaches_the_student():
    torch.manual_seed(0)
    student, teacher = ATSSForObjectDetection(tiny_config()).train(), ATSSForObjectDetection(tiny_config())
    teacher_before = copy.deepcopy(teacher.state_dict())
    kd = DetectionDistiller(student, teacher, DistillationConfig.from_method("crosskd", "atss"))
    optimizer = torch.optim.SGD(kd.parameters(), lr=0.01)
    batch = random_batch()
    outputs = kd(**batch)
    kd_names = ("loss_cls_kd", "loss_loc_kd", "loss_center_kd")
    assert set(outputs.loss_dict) == set(LOSS_NAMES + kd_names)
    assert all(torch.isfinite(value) and value > 0 for value in outputs.loss_dict.values()), outputs.loss_dict
    torch.testing.assert_close(outputs.loss, sum(outputs.loss_dict.values()))

    # the KD losses alone reach the student's towers (up to the cross-head point), FPN and backbone (timm zero-inits
    # the last BatchNorm of each residual block, so not every backbone tensor gets a gradient yet)
    sum(outputs.loss_dict[name] for name in kd_names).backward(retain_graph=True)
    for prefix in ("head.cls_convs.0", "head.reg_convs.2", "neck.", "backbone.layer4"):
        grads = [p.grad for name, p in student.named_parameters() if name.startswith(prefix) and p.requires_grad]
        assert grads and all(g is not None for g in grads), prefix
        nonzero = [g.abs().sum() > 0 for g in grads]
        assert any(nonzero) if prefix.startswith("backbone") else all(nonzero), prefix
    assert student.head.atss_cls.weight.grad is None and student.head.atss_centerness.weight.grad is None

    # the whole loss reaches every predictor of the student; a step changes it and leaves the teacher alone
    optimizer.zero_grad()
    outputs.loss.backward()
    for module in (student.head.atss_cls, student.head.atss_reg, student.head.atss_centerness):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    before = student.head.atss_reg.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(student.head.atss_reg.weight, before)
    assert all(p.grad is None for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name


def test_distiller_rejects_a_teacher_with_other_box_coding():
    student, teacher = (
        ATSSForObjectDetection(tiny_config()),
        ATSSForObjectDetection(tiny_config(box_coder_stds=[1.0] * 4)),
    )
    with pytest.raises(ValueError, match="box_coder_stds"):
        DetectionDistiller(student, teacher, DistillationConfig.from_method("crosskd", "atss"))
