"""CrossKD and BCKD losses against the official code's numbers in ../shared/golden (crosskd/bckd.safetensors)."""

import copy

import pytest
import torch
from golden_utils import (
    LOSS_TOLERANCE,
    NUM_LEVELS,
    SCENARIOS,
    golden_pixel_mask,
    ground_truth,
    load_golden,
    per_level_sums,
)

from hf_kd import DetectionDistiller, DistillationConfig, GFLConfig, GFLForObjectDetection
from hf_kd.convert.mmdet import convert_state_dict, load_converted_weights
from hf_kd.models.detection.heads import flatten_levels

# hf_kd loss name -> the official code's name, per method
LOSS_NAMES = {
    "crosskd": {"loss_cls": "loss_cls", "loss_bbox": "loss_bbox", "loss_dfl": "loss_dfl",
                "loss_cls_kd": "loss_cls_kd", "loss_loc_kd": "loss_reg_kd"},
    "bckd": {"loss_cls": "loss_cls", "loss_bbox": "loss_bbox", "loss_dfl": "loss_dfl",
             "loss_cls_kd": "loss_kd", "loss_loc_kd": "loss_score_kd"},
}  # fmt: skip
DEPTH = 3  # CrossKD's reused_teacher_head_idx for GFL


def small_config() -> GFLConfig:
    return GFLConfig(backbone="resnet18", fpn_channels=64, head_channels=64, num_labels=3)


def outputs_with_states(model, feature_maps, image_sizes, depth, reference=None):
    """The model's outputs from FPN outputs, and its tower states after `depth` convs (on `reference`'s priors)."""
    states = [model.head.forward_towers(feature, depth) for feature in feature_maps]
    maps = [model.head.forward_from(*state, level, depth) for level, state in enumerate(states)]
    priors = None if reference is None else reference.priors
    valid = None if reference is None else reference.valid_mask
    return model.detection_outputs(maps, list(feature_maps), image_sizes, priors, valid), states


@pytest.fixture(scope="module")
def golden(golden_dir):
    """Student (from pixels) and teacher (head on its saved FPN outputs) outputs with tower states after 3 convs."""
    data = load_golden(golden_dir)
    student = GFLForObjectDetection(small_config()).eval()
    load_converted_weights(student, data["student_r18"])
    # The golden teacher's narrow ResNet-50 (stem 16) is not a timm model: its FPN outputs are saved instead.
    teacher = GFLForObjectDetection(small_config()).eval()
    head_weights = convert_state_dict({k: v for k, v in data["teacher_r50"].items() if k.startswith("bbox_head.")})
    teacher.load_state_dict(head_weights, strict=False)
    pixel_values, pixel_mask = data["inputs"]["inputs"], golden_pixel_mask()
    with torch.no_grad():
        image_sizes = student.image_sizes_from_mask(pixel_values, pixel_mask)
        student_outputs, student_states = outputs_with_states(
            student, student.extract_features(pixel_values), image_sizes, DEPTH
        )
        teacher_features = [data["teacher_outputs"][f"neck/{level}"] for level in range(NUM_LEVELS)]
        teacher_outputs, teacher_states = outputs_with_states(
            teacher, teacher_features, image_sizes, DEPTH, student_outputs
        )
    data.update(
        student=student,
        teacher=teacher,
        student_outputs=student_outputs,
        student_states=student_states,
        teacher_outputs=teacher_outputs,
        teacher_states=teacher_states,
    )
    return data


def distiller(golden, method: str) -> DetectionDistiller:
    config = DistillationConfig.from_method(method, "gfl")
    return DetectionDistiller(golden["student"], golden["teacher"], config)


def test_tower_states_and_cross_head(golden):
    crosskd = golden["crosskd"]
    for level in range(NUM_LEVELS):
        for name in ("student", "teacher"):
            cls_state, reg_state = golden[f"{name}_states"][level]
            torch.testing.assert_close(cls_state, crosskd[f"{name}_cls_hold/{level}"], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(reg_state, crosskd[f"{name}_reg_hold/{level}"], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        cross = distiller(golden, "crosskd").cross_head_outputs(
            golden["student_states"], golden["teacher_states"], golden["student_outputs"]
        )
    expected_logits = flatten_levels([crosskd[f"reused_cls_scores/{level}"] for level in range(5)], 3)
    expected_boxes = flatten_levels([crosskd[f"reused_bbox_preds/{level}"] for level in range(5)], 68)
    torch.testing.assert_close(cross.logits, expected_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cross.bbox_regression.flatten(2), expected_boxes, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["crosskd", "bckd"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_losses_per_level(golden, method, scenario):
    kd = distiller(golden, method)
    student, teacher = golden["student_outputs"], golden["teacher_outputs"]
    loss = golden["student"].loss_function
    gt = golden["student"].prepare_ground_truth(ground_truth(golden["targets"], scenario), student.image_sizes)
    with torch.no_grad():
        targets = loss.targets(student, gt)
        losses = loss.loss_maps(student, targets, **kd.config.detection_loss_kwargs)
        mimic = student
        if method == "crosskd":
            mimic = kd.cross_head_outputs(golden["student_states"], golden["teacher_states"], student)
        losses.update(kd.kd_loss_maps(mimic, teacher, targets))
    for ours, theirs in LOSS_NAMES[method].items():
        expected = torch.stack([golden[method][f"losses/{scenario}/{theirs}/{level}"] for level in range(5)])
        actual = per_level_sums(losses[ours], student.feature_maps)
        torch.testing.assert_close(actual, expected, **LOSS_TOLERANCE, msg=f"{method} {scenario} {ours}")


def test_crosskd_gradients_reach_student_and_spare_teacher(golden):
    """Through the distiller's forward: the golden student, the golden teacher's head on a timm backbone."""
    torch.manual_seed(0)
    student, teacher = copy.deepcopy(golden["student"]).train(), copy.deepcopy(golden["teacher"])
    teacher_before = {name: value.clone() for name, value in teacher.state_dict().items()}
    kd = DetectionDistiller(student, teacher, DistillationConfig.from_method("crosskd"))
    labels = [{"boxes": torch.tensor([[10.0, 12.0, 90.0, 100.0]]), "class_labels": torch.tensor([1])}] * 2
    outputs = kd(torch.randn(2, 3, 128, 160), labels=labels)
    student.zero_grad()
    (outputs.loss_dict["loss_cls_kd"] + outputs.loss_dict["loss_loc_kd"]).backward()
    for prefix in ("head.cls_convs.0", "head.reg_convs.2", "neck.", "backbone.layer4"):
        grads = [p.grad for name, p in student.named_parameters() if name.startswith(prefix) and p.requires_grad]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), prefix
    # the student's own predictors and the layers after the cross-head point are not used by the KD losses
    assert student.head.gfl_cls.weight.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_crosskd_is_finite_with_one_value_per_channel():
    """Batch 1 with a 1x1 pyramid level: a single value per channel has std 0, not NaN."""
    config = small_config()
    student, teacher = GFLForObjectDetection(config).train(), GFLForObjectDetection(config)
    kd = DetectionDistiller(student, teacher, DistillationConfig.from_method("crosskd+pkd"))
    labels = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "class_labels": torch.tensor([1])}]
    outputs = kd(torch.randn(1, 3, 96, 128), labels=labels)  # P7 is 1x1
    assert set(outputs.loss_dict) >= {"loss_cls_kd", "loss_loc_kd", "loss_feature_kd"}
    assert all(torch.isfinite(value) for value in outputs.loss_dict.values())
