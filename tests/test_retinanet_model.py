"""RetinaNetForObjectDetection: the config and its round trip, the head and its anchors, decoding, losses and a CrossKD
training step with a RetinaNet teacher (save/load, remote code, the pipeline and overfitting real photos:
tests/test_families.py)."""

import copy
import math

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from model_utils import TINY_LABELS
from model_utils import random_batch as random_images

from hf_kd import DetectionDistiller, DistillationConfig
from hf_kd.models.detection.configuration_retinanet import RetinaNetConfig
from hf_kd.models.detection.modeling_retinanet import RetinaNetForObjectDetection

LOSS_NAMES = ("loss_cls", "loss_bbox")
KD_LOSS_NAMES = ("loss_cls_kd", "loss_loc_kd")


def tiny_config(**kwargs) -> RetinaNetConfig:
    defaults = {"backbone": "resnet18", "fpn_channels": 32, "head_channels": 32, "id2label": TINY_LABELS}
    return RetinaNetConfig(**(defaults | kwargs))


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


def test_config_defaults_are_mmdetection_retinanet():
    config = RetinaNetConfig()
    assert config.model_type == "retinanet"
    assert config.fpn_extra_convs_on == "input" and not config.fpn_relu_before_extra_convs
    assert config.norm_groups is None
    assert (config.octave_base_scale, config.scales_per_octave, config.anchor_ratios) == (4.0, 3, [0.5, 1.0, 2.0])
    assert config.anchor_scales == (4.0, 4 * 2 ** (1 / 3), 4 * 2 ** (2 / 3)) and config.anchors_per_location == 9
    assert config.box_coder_stds == [1.0, 1.0, 1.0, 1.0]
    assert (config.pos_iou_threshold, config.neg_iou_threshold, config.min_pos_iou) == (0.5, 0.4, 0.0)
    assert (config.focal_alpha, config.focal_gamma) == (0.25, 2.0)
    assert (config.loss_cls_weight, config.loss_bbox_weight) == (1.0, 1.0)
    anchor_settings = {"octave_base_scale", "scales_per_octave", "anchor_ratios"}
    assert set(config.prediction_settings) == {"num_labels", "strides", "box_coder_stds"} | anchor_settings


def test_config_round_trip(tmp_path):
    config = tiny_config(anchor_ratios=(0.5, 1.0), scales_per_octave=2, box_coder_stds=(0.1, 0.1, 0.2, 0.2))
    config.save_pretrained(tmp_path)
    loaded = RetinaNetConfig.from_pretrained(tmp_path)
    assert loaded.anchor_ratios == [0.5, 1.0] == config.anchor_ratios and loaded.anchors_per_location == 4
    assert loaded.box_coder_stds == [0.1, 0.1, 0.2, 0.2] == config.box_coder_stds
    assert (loaded.fpn_extra_convs_on, loaded.norm_groups) == ("input", None)
    assert loaded.id2label == TINY_LABELS and loaded.model_type == "retinanet"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"box_coder_stds": [1.0, 1.0, 1.0]}, "box_coder_stds"),
        ({"scales_per_octave": 0}, "scales_per_octave"),
        ({"anchor_ratios": [1.0, -2.0]}, "anchor_ratios"),
        ({"pos_iou_threshold": 0.3}, "neg_iou_threshold"),
    ],
)
def test_config_rejects_bad_settings(kwargs, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        tiny_config(**kwargs)


def test_head_predictors_and_initialisation():
    """MMDetection's predictor names and shapes (9 anchors per location, so that the converter's keys apply) and its
    init: tower convs with a bias and no norm, classifier bias at the prior probability, box bias 0, no scales; the
    first extra FPN level reads C5."""
    model = RetinaNetForObjectDetection(tiny_config())
    head = model.head
    assert model.priors_per_location == 9
    assert (head.retina_cls.out_channels, head.retina_reg.out_channels) == (9 * 3, 9 * 4)
    assert head.classifier is head.retina_cls
    prior_logit = -math.log((1 - 0.01) / 0.01)
    torch.testing.assert_close(head.retina_cls.bias, torch.full((27,), prior_logit), atol=1e-6, rtol=0)
    assert head.retina_reg.bias.abs().sum() == 0
    for tower in (head.cls_convs, head.reg_convs):
        assert len(tower) == 4
        assert all(layer.conv.bias is not None and isinstance(layer.norm, torch.nn.Identity) for layer in tower)
    assert not hasattr(head, "scales")
    assert model.neck.fpn_convs[3].in_channels == model.backbone.feature_info.channels()[-1] == 512


def test_anchors_and_zero_deltas_decode_to_them():
    """9 anchors per location, ratio-major then scale: width `stride * scale / sqrt(ratio)`, height `stride * scale *
    sqrt(ratio)`, centred at `(x * stride, y * stride)`; zero deltas decode to the anchors."""
    model = RetinaNetForObjectDetection(tiny_config())
    priors = model.make_priors([(2, 3), (1, 2)], torch.device("cpu"))
    assert priors.shape == (9 * (6 + 2), 4)
    scales = torch.tensor([4 * 2 ** (i / 3) for i in range(3)], dtype=torch.float64)
    ratios = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    widths = (8 * scales[None] / ratios.sqrt()[:, None]).flatten()
    heights = (8 * scales[None] * ratios.sqrt()[:, None]).flatten()
    expected = torch.stack([-widths / 2, -heights / 2, widths / 2, heights / 2], dim=-1).float()
    torch.testing.assert_close(priors[:9], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(priors[9:18], expected + torch.tensor([8.0, 0.0, 8.0, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(priors[-9:], priors[:9] * 2 + torch.tensor([16.0, 0.0, 16.0, 0.0]), atol=1e-5, rtol=0)
    boxes = model.decode_boxes(priors, torch.zeros(1, len(priors), 4), [54, 18])
    torch.testing.assert_close(boxes[0], priors)  # through centre and size: float rounding only


def test_deltas_round_trip_and_log_scales_are_clamped():
    model = RetinaNetForObjectDetection(tiny_config())
    anchors = torch.tensor([[0.0, 0.0, 32.0, 16.0], [10.0, 20.0, 30.0, 60.0]])
    boxes = torch.tensor([[4.0, -2.0, 40.0, 20.0], [12.0, 25.0, 26.0, 50.0]])
    deltas = model.loss_function.box_coder.encode(anchors, boxes)
    torch.testing.assert_close(deltas[0], torch.tensor([6 / 32, 1 / 16, math.log(36 / 32), math.log(22 / 16)]))
    torch.testing.assert_close(model.decode_boxes(anchors, deltas[None], [2])[0], boxes)
    huge = model.decode_boxes(anchors[:1], torch.tensor([[[0.0, 0.0, 10.0, -10.0]]]), [1])[0, 0]
    torch.testing.assert_close(huge[2] - huge[0], torch.tensor(32 * 1000 / 16))  # dw clamped to log(1000 / 16)
    torch.testing.assert_close(huge[3] - huge[1], torch.tensor(16 * 16 / 1000))


def test_forward_losses_and_outputs():
    torch.manual_seed(0)
    model = RetinaNetForObjectDetection(tiny_config()).eval()
    batch = random_batch()
    with torch.no_grad():
        outputs = model(**batch)
        no_boxes = {"boxes": torch.zeros(0, 4), "class_labels": torch.zeros(0, dtype=torch.long)}
        one_empty = model(batch["pixel_values"], batch["pixel_mask"], labels=[batch["labels"][0], no_boxes])
        all_empty = model(batch["pixel_values"], batch["pixel_mask"], labels=[no_boxes, no_boxes])
    num_priors = 9 * (16 * 20 + 8 * 10 + 4 * 5 + 2 * 3 + 1 * 2)
    assert outputs.logits.shape == (2, num_priors, 3) and outputs.bbox_regression.shape == (2, num_priors, 4)
    assert outputs.centerness_logits is None and outputs.pred_boxes.shape == (2, num_priors, 4)
    assert outputs.priors.shape == (num_priors, 4) and outputs.valid_mask.shape == (2, num_priors)
    assert outputs.valid_mask[0].all() and not outputs.valid_mask[1].all()
    assert set(outputs.loss_dict) == set(LOSS_NAMES)
    assert all(torch.isfinite(value) and value > 0 for value in outputs.loss_dict.values())
    assert all(torch.isfinite(value) and value > 0 for value in one_empty.loss_dict.values())
    assert all_empty.loss_dict["loss_bbox"] == 0 and all_empty.loss_dict["loss_cls"] > 0


# ---------------------------------------------------------------------------------------------------------------------
# Distillation: a CrossKD training step with a RetinaNet teacher
# ---------------------------------------------------------------------------------------------------------------------


def test_crosskd_training_step_reaches_the_student():
    torch.manual_seed(0)
    student = RetinaNetForObjectDetection(tiny_config()).train()
    teacher = RetinaNetForObjectDetection(tiny_config())
    teacher_before = copy.deepcopy(teacher.state_dict())
    kd = DetectionDistiller(student, teacher, DistillationConfig.from_method("crosskd", "retinanet"))
    optimizer = torch.optim.SGD(kd.parameters(), lr=0.01)
    batch = random_batch()
    outputs = kd(**batch)
    assert set(outputs.loss_dict) == set(LOSS_NAMES + KD_LOSS_NAMES)
    assert all(torch.isfinite(value) and value > 0 for value in outputs.loss_dict.values()), outputs.loss_dict
    torch.testing.assert_close(outputs.loss, sum(outputs.loss_dict.values()))

    # the KD losses alone reach the student's towers (up to the cross-head point), FPN and backbone (timm zero-inits
    # the last BatchNorm of each residual block, so not every backbone tensor gets a gradient yet)
    sum(outputs.loss_dict[name] for name in KD_LOSS_NAMES).backward(retain_graph=True)
    for prefix in ("head.cls_convs.0", "head.reg_convs.2", "neck.", "backbone.layer4"):
        grads = [p.grad for name, p in student.named_parameters() if name.startswith(prefix) and p.requires_grad]
        assert grads and all(g is not None for g in grads), prefix
        nonzero = [g.abs().sum() > 0 for g in grads]
        assert any(nonzero) if prefix.startswith("backbone") else all(nonzero), prefix
    assert student.head.retina_cls.weight.grad is None and student.head.cls_convs[3].conv.weight.grad is None

    # the whole loss reaches both predictors of the student; a step changes it and leaves the teacher alone
    optimizer.zero_grad()
    outputs.loss.backward()
    for module in (student.head.retina_cls, student.head.retina_reg):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    before = student.head.retina_reg.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(student.head.retina_reg.weight, before)
    assert all(p.grad is None for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name


@pytest.mark.parametrize(
    ("teacher_kwargs", "message"),
    [({"anchor_ratios": [1.0, 2.0, 4.0]}, "anchor_ratios"), ({"box_coder_stds": [0.1, 0.1, 0.2, 0.2]}, "box_coder")],
)
def test_distiller_rejects_a_teacher_with_other_anchors_or_box_coding(teacher_kwargs, message):
    student = RetinaNetForObjectDetection(tiny_config())
    teacher = RetinaNetForObjectDetection(tiny_config(**teacher_kwargs))
    with pytest.raises(ValueError, match=message):
        DetectionDistiller(student, teacher, DistillationConfig.from_method("crosskd", "retinanet"))
