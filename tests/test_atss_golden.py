"""ATSS parity with MMDetection 3.3.0 and the official CrossKD code: ../shared/golden/atss (see
../shared/golden/README.md, "RetinaNet, FCOS and ATSS").

The student (a standard ResNet-18 ATSS; its backbone is the GFL golden student's) is checked from the input pixels:
backbone and FPN features, head outputs, priors and valid flags, ATSS assignment, targets, losses of the three
ground-truth scenarios and detections. The teacher's narrow ResNet-50 is not a timm model, so its head is checked from
its saved FPN outputs. CrossKD: the tower states, the cross-head outputs and every loss through `DetectionDistiller`.
"""

from dataclasses import replace

import pytest
import torch
from golden_utils import (
    FEATURE_TOLERANCE,
    LOSS_TOLERANCE,
    NUM_LEVELS,
    SCENARIOS,
    assert_detections_match,
    golden_pixel_mask,
    ground_truth,
    load_golden,
    mmdet_detections,
    per_level_maps,
    per_level_sums,
)
from safetensors.torch import load_file

from hf_kd import DetectionDistiller, DistillationConfig
from hf_kd.convert.mmdet import convert_state_dict, load_converted_weights
from hf_kd.models.detection.assigners import atss_assign
from hf_kd.models.detection.box_ops import box_iou
from hf_kd.models.detection.configuration_atss import ATSSConfig
from hf_kd.models.detection.heads import flatten_levels
from hf_kd.models.detection.image_processing_dense import ATSSImageProcessor
from hf_kd.models.detection.modeling_atss import ATSSForObjectDetection
from hf_kd.models.detection.priors import level_sizes

LOSS_NAMES = ("loss_cls", "loss_bbox", "loss_centerness")
# hf_kd loss name -> the official CrossKDATSS name
CROSSKD_LOSS_NAMES = {
    "loss_cls": "loss_cls",
    "loss_bbox": "loss_bbox",
    "loss_centerness": "loss_centerness",
    "loss_cls_kd": "loss_cls_kd",
    "loss_loc_kd": "loss_reg_kd",
    "loss_center_kd": "losses_center_kd",
}
DEPTH = 3  # CrossKD's reused_teacher_head_idx for ATSS


def student_config() -> ATSSConfig:
    return ATSSConfig(backbone="resnet18", fpn_channels=64, head_channels=64, num_labels=3)


def teacher_config() -> ATSSConfig:
    return ATSSConfig(
        backbone="resnet50",
        backbone_kwargs={"stem_width": 16, "channels": [16, 32, 64, 128]},
        fpn_channels=64,
        head_channels=64,
        num_labels=3,
    )


def student_weights(golden_dir) -> dict[str, torch.Tensor]:
    """The full MMDetection state dict of the student: the GFL golden student's backbone, the family's FPN and head."""
    backbone = {
        k: v for k, v in load_file(golden_dir / "student_r18.safetensors").items() if k.startswith("backbone.")
    }
    return backbone | load_file(golden_dir / "atss" / "student_r18.safetensors")


def outputs_with_states(model, feature_maps, image_sizes, reference=None):
    """The model's outputs from FPN outputs and its tower states after `DEPTH` convs (on `reference`'s priors)."""
    states = [model.head.forward_towers(feature, DEPTH) for feature in feature_maps]
    maps = [model.head.forward_from(*state, level, DEPTH) for level, state in enumerate(states)]
    priors = None if reference is None else reference.priors
    valid = None if reference is None else reference.valid_mask
    return model.detection_outputs(maps, list(feature_maps), image_sizes, priors, valid), states


@pytest.fixture(scope="module")
def golden(golden_dir):
    """The golden files; the converted student (outputs from the input pixels) and teacher (head on its saved FPN
    outputs), with their tower states after 3 convs."""
    data = load_golden(golden_dir / "atss")
    data["student_backbone_outputs"] = load_file(golden_dir / "student_outputs.safetensors")
    data["pixel_values"] = data["inputs"]["inputs"]
    data["pixel_mask"] = golden_pixel_mask()
    data["saved"] = {"student": data["student_outputs"], "teacher": data["teacher_outputs"]}

    student = ATSSForObjectDetection(student_config())
    load_converted_weights(student, student_weights(golden_dir))
    student.eval()
    teacher = ATSSForObjectDetection(teacher_config())
    weights = convert_state_dict({k: v for k, v in data["teacher_r50"].items() if not k.startswith("backbone.")})
    missing, unexpected = teacher.load_state_dict(weights, strict=False)
    assert unexpected == [] and missing and all(key.startswith("backbone.") for key in missing)
    teacher.eval()

    with torch.no_grad():
        data["backbone_features"] = student.backbone(data["pixel_values"])
        image_sizes = student.image_sizes_from_mask(data["pixel_values"], data["pixel_mask"])
        student_outputs, student_states = outputs_with_states(
            student, student.extract_features(data["pixel_values"]), image_sizes
        )
        teacher_features = [data["teacher_outputs"][f"neck/{level}"] for level in range(NUM_LEVELS)]
        teacher_outputs, teacher_states = outputs_with_states(teacher, teacher_features, image_sizes, student_outputs)
    data["models"] = {"student": student, "teacher": teacher}
    data["outputs"] = {"student": student_outputs, "teacher": teacher_outputs}
    data["states"] = {"student": student_states, "teacher": teacher_states}
    return data


def crosskd_distiller(golden) -> DetectionDistiller:
    config = DistillationConfig.from_method("crosskd", "atss")
    assert (config.cross_head_index, config.loc_kd, config.center_kd_weight) == (DEPTH, "iou", 1.0)
    return DetectionDistiller(golden["models"]["student"], golden["models"]["teacher"], config)


# ---------------------------------------------------------------------------------------------------------------------
# Student from pixels: features, priors, assignment, targets
# ---------------------------------------------------------------------------------------------------------------------


def test_backbone_features(golden):
    # golden backbone/0 is the stride-4 C2, which the detector does not use; ours are C3-C5.
    assert len(golden["backbone_features"]) == 3
    for index, feature in enumerate(golden["backbone_features"], start=1):
        expected = golden["student_backbone_outputs"][f"backbone/{index}"]
        torch.testing.assert_close(feature, expected, **FEATURE_TOLERANCE)


def test_fpn_features(golden):
    feature_maps = golden["outputs"]["student"].feature_maps
    assert len(feature_maps) == NUM_LEVELS
    for level, feature in enumerate(feature_maps):
        torch.testing.assert_close(feature, golden["saved"]["student"][f"neck/{level}"], **FEATURE_TOLERANCE)


def test_forward_equals_the_split_forward(golden):
    """`forward` gives the outputs that the tower-by-tower path (the distiller's) gives."""
    with torch.no_grad():
        outputs = golden["models"]["student"](golden["pixel_values"], pixel_mask=golden["pixel_mask"])
    expected = golden["outputs"]["student"]
    for name in ("logits", "bbox_regression", "centerness_logits", "pred_boxes", "priors", "valid_mask"):
        torch.testing.assert_close(getattr(outputs, name), getattr(expected, name), atol=0, rtol=0, msg=name)


def test_priors_and_valid_flags(golden):
    outputs, targets = golden["outputs"]["student"], golden["targets"]
    sizes = level_sizes(outputs.feature_maps, len(outputs.priors))
    priors = outputs.priors.split(sizes)
    valid = outputs.valid_mask.split(sizes, dim=1)
    for level in range(NUM_LEVELS):
        torch.testing.assert_close(priors[level], targets[f"priors/{level}"], atol=0, rtol=0)
        for image in range(2):
            assert torch.equal(valid[level][image], targets[f"valid_flags/img{image}/{level}"]), (level, image)
    for image in range(2):
        for scenario in SCENARIOS:  # allowed_border=-1: the assigner's inside flags are the valid flags
            assert torch.equal(outputs.valid_mask[image], targets[f"assign/{scenario}/img{image}/inside_flags"])
    assert not outputs.valid_mask[1].all(), "image 1 is smaller than the batch: some of its priors are invalid"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_atss_assignment(golden, scenario):
    model, outputs, targets = golden["models"]["student"], golden["outputs"]["student"], golden["targets"]
    gt = model.prepare_ground_truth(ground_truth(targets, scenario), outputs.image_sizes)
    sizes = level_sizes(outputs.feature_maps, len(outputs.priors))
    assigned, positive = atss_assign(outputs.priors, sizes, outputs.valid_mask, gt, topk=model.config.atss_topk)
    for image in range(2):
        inside = outputs.valid_mask[image]  # MMDetection's assigner only sees the inside (valid) anchors
        expected = {name: targets[f"assign/{scenario}/img{image}/{name}"] for name in ("assigned_gt_inds", "labels")}
        ours_positive, ours_assigned = positive[image, inside], assigned[image, inside]
        torch.testing.assert_close(
            torch.where(ours_positive, ours_assigned + 1, 0), expected["assigned_gt_inds"], atol=0, rtol=0
        )
        torch.testing.assert_close(
            torch.where(ours_positive, gt.classes[image, ours_assigned], -1), expected["labels"], atol=0, rtol=0
        )
        # max_overlaps: the IoU of each positive anchor with its box (-INF or 0 elsewhere, nothing to compare)
        overlaps = box_iou(outputs.priors[inside], gt.boxes[image, ours_assigned])
        expected_overlaps = targets[f"assign/{scenario}/img{image}/max_overlaps"]
        torch.testing.assert_close(overlaps[ours_positive], expected_overlaps[ours_positive], atol=1e-6, rtol=1e-5)
        assert positive[image].sum().item() == golden["losses"][f"assign/{scenario}/img{image}/num_pos"]
    num_positive = golden["losses"][f"targets/{scenario}/num_pos"]
    assert positive.sum().item() == num_positive
    if scenario != "all_empty":
        assert num_positive > 0


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_targets(golden, scenario):
    model, outputs, expected = golden["models"]["student"], golden["outputs"]["student"], golden["targets"]
    gt = model.prepare_ground_truth(ground_truth(expected, scenario), outputs.image_sizes)
    targets = model.loss_function.targets(outputs, gt)
    sizes = level_sizes(outputs.feature_maps, len(outputs.priors))
    prefix = f"targets/{scenario}"
    for level, (labels, weights, positive, boxes, centerness) in enumerate(
        zip(
            targets.labels.split(sizes, dim=1),
            targets.label_weights.split(sizes, dim=1),
            targets.positive.split(sizes, dim=1),
            targets.box_targets.split(sizes, dim=1),
            targets.centerness.split(sizes, dim=1),
        )
    ):
        torch.testing.assert_close(labels, expected[f"{prefix}/labels/{level}"], atol=0, rtol=0)
        torch.testing.assert_close(weights, expected[f"{prefix}/label_weights/{level}"], atol=0, rtol=0)
        expected_positive = expected[f"{prefix}/bbox_weights/{level}"] > 0
        assert torch.equal(expected_positive, positive[..., None].expand_as(expected_positive)), level
        # box targets are the gt box (pixels) of the positives; MMDetection writes 0 elsewhere, hf_kd the anchor
        torch.testing.assert_close(
            boxes[positive], expected[f"{prefix}/bbox_targets/{level}"][positive], atol=0, rtol=0
        )
        # centre-ness targets of the anchor centres, 0 off the positives
        torch.testing.assert_close(centerness, expected[f"{prefix}/centerness_targets/{level}"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(targets.avg_factor, expected[f"{prefix}/avg_factor"], atol=0, rtol=0)
    assert targets.avg_factor.item() == golden["losses"][f"{prefix}/avg_factor"]
    assert targets.kd_avg_factor is targets.avg_factor
    # loss_bbox's divisor: the sum of the centre-ness targets over all levels and images, at least 1
    box_avg_factor = targets.centerness.sum().clamp(min=1)
    torch.testing.assert_close(box_avg_factor, expected[f"{prefix}/bbox_avg_factor"], atol=0, rtol=1e-6)
    torch.testing.assert_close(box_avg_factor.item(), golden["losses"][f"{prefix}/bbox_avg_factor"], atol=0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Student and teacher: head outputs, losses, detections
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_head_outputs(golden, name):
    outputs, saved = golden["outputs"][name], golden["saved"][name]
    cls_scores = per_level_maps(outputs.logits, outputs.feature_maps)
    bbox_preds = per_level_maps(outputs.bbox_regression, outputs.feature_maps)
    centernesses = per_level_maps(outputs.centerness_logits, outputs.feature_maps)
    for level in range(NUM_LEVELS):
        torch.testing.assert_close(cls_scores[level], saved[f"cls_scores/{level}"], **FEATURE_TOLERANCE)
        torch.testing.assert_close(bbox_preds[level], saved[f"bbox_preds/{level}"], **FEATURE_TOLERANCE)
        torch.testing.assert_close(centernesses[level], saved[f"centernesses/{level}"], **FEATURE_TOLERANCE)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", ["student", "teacher"])
def test_losses_per_level(golden, name, scenario):
    model, outputs = golden["models"][name], golden["outputs"][name]
    gt = model.prepare_ground_truth(ground_truth(golden["targets"], scenario), outputs.image_sizes)
    with torch.no_grad():
        terms = model.loss_function.loss_maps(outputs, model.loss_function.targets(outputs, gt))
    assert set(terms) == set(LOSS_NAMES)
    for loss_name in LOSS_NAMES:
        actual = per_level_sums(terms[loss_name], outputs.feature_maps)
        expected = torch.stack([golden["saved"][name][f"losses/{scenario}/{loss_name}/{level}"] for level in range(5)])
        as_numbers = [golden["losses"][f"{name}/atss/{scenario}/{loss_name}/{level}"] for level in range(5)]
        torch.testing.assert_close(actual, expected, **LOSS_TOLERANCE, msg=f"{name} {scenario} {loss_name}")
        torch.testing.assert_close(actual, torch.tensor(as_numbers), **LOSS_TOLERANCE)
    if scenario == "all_empty":  # no positives: only the classification loss, over every valid anchor
        assert terms["loss_bbox"].abs().sum() == 0 and terms["loss_centerness"].abs().sum() == 0
        assert terms["loss_cls"].sum() > 0
    else:  # P6 and P7 have no positives here: their box and centre-ness losses are 0
        for loss_name in ("loss_bbox", "loss_centerness"):
            sums = per_level_sums(terms[loss_name], outputs.feature_maps)
            assert (sums[:3] > 0).all() and (sums[3:] == 0).all(), (loss_name, sums)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_forward_loss_from_pixels(golden, scenario):
    """`forward(labels=...)` sums the per-level losses into `loss_dict` and `loss`."""
    model = golden["models"]["student"]
    with torch.no_grad():
        outputs = model(
            golden["pixel_values"],
            pixel_mask=golden["pixel_mask"],
            labels=ground_truth(golden["targets"], scenario),
        )
    expected = {
        name: sum(golden["losses"][f"student/atss/{scenario}/{name}/{level}"] for level in range(5))
        for name in LOSS_NAMES
    }
    assert set(outputs.loss_dict) == set(LOSS_NAMES)
    for name in LOSS_NAMES:
        torch.testing.assert_close(outputs.loss_dict[name], torch.tensor(expected[name]), **LOSS_TOLERANCE)
    torch.testing.assert_close(outputs.loss, torch.tensor(sum(expected.values())), **LOSS_TOLERANCE)


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_detections(golden, name):
    """The image processor's post-processing (MMDetection's test settings: score threshold 0.05, NMS IoU 0.6, scores
    times the sigmoid of the centre-ness) in the input frame."""
    outputs, saved = golden["outputs"][name], golden["saved"][name]
    processor = ATSSImageProcessor()
    assert processor.nms_iou_threshold == 0.6
    detections = processor.post_process_object_detection(outputs, threshold=0.0, candidate_threshold=0.05)
    assert_detections_match(detections, saved, "det")
    num_detections = golden["manifest"]["num_detections"][name]
    assert [len(image["scores"]) for image in detections] == num_detections["det"]


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_detections_before_nms(golden, name):
    outputs, saved = golden["outputs"][name], golden["saved"][name]
    # MMDetection's with_nms=False: score threshold and per-level top-k only, level by level, no max_per_img cap
    candidates = mmdet_detections(outputs, nms_iou_threshold=None, max_detections=None)
    assert_detections_match(candidates, saved, "det_prenms", window=3)
    num_detections = golden["manifest"]["num_detections"][name]
    assert [len(image["scores"]) for image in candidates] == num_detections["det_prenms"]


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_detections_rescaled(golden, name):
    """post_process_object_detection to the original sizes = MMDetection's rescale=True (boxes / scale_factor)."""
    outputs, saved = golden["outputs"][name], golden["saved"][name]
    original_sizes = torch.tensor([meta["ori_shape"] for meta in golden["manifest"]["img_metas_rescaled"]])
    results = ATSSImageProcessor().post_process_object_detection(
        outputs, threshold=0.0, candidate_threshold=0.05, target_sizes=original_sizes
    )
    assert_detections_match(results, saved, "det_rescaled")


def test_scores_include_the_centerness(golden):
    """The detection score is the class score times the sigmoid of the centre-ness: without the centre-ness, the
    scores are the (larger) class scores."""
    outputs = golden["outputs"]["student"]
    with_centerness = mmdet_detections(outputs, nms_iou_threshold=None, max_detections=None)
    class_only = mmdet_detections(replace(outputs, centerness_logits=None), None, None)
    for ours, plain in zip(with_centerness, class_only):
        torch.testing.assert_close(ours["boxes"], plain["boxes"], atol=0, rtol=0)
        assert (ours["scores"] < plain["scores"]).all()


# ---------------------------------------------------------------------------------------------------------------------
# CrossKD: tower states, cross-head, losses (the official CrossKDATSS.loss)
# ---------------------------------------------------------------------------------------------------------------------


def test_tower_states(golden):
    crosskd = golden["crosskd"]
    for level in range(NUM_LEVELS):
        for name in ("student", "teacher"):
            cls_state, reg_state = golden["states"][name][level]
            torch.testing.assert_close(cls_state, crosskd[f"{name}_cls_hold/{level}"], **FEATURE_TOLERANCE)
            torch.testing.assert_close(reg_state, crosskd[f"{name}_reg_hold/{level}"], **FEATURE_TOLERANCE)


def test_cross_head_outputs(golden):
    crosskd = golden["crosskd"]
    with torch.no_grad():
        cross = crosskd_distiller(golden).cross_head_outputs(
            golden["states"]["student"], golden["states"]["teacher"], golden["outputs"]["student"]
        )
    expected = {
        "logits": flatten_levels([crosskd[f"reused_cls_scores/{level}"] for level in range(5)], 3),
        "bbox_regression": flatten_levels([crosskd[f"reused_bbox_preds/{level}"] for level in range(5)], 4),
        "centerness_logits": flatten_levels([crosskd[f"reused_centernesses/{level}"] for level in range(5)], 1)[
            ..., 0
        ],
    }
    for name, value in expected.items():
        torch.testing.assert_close(getattr(cross, name), value, **FEATURE_TOLERANCE, msg=name)
    torch.testing.assert_close(cross.priors, golden["outputs"]["student"].priors, atol=0, rtol=0)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_crosskd_losses_per_level(golden, scenario):
    kd = crosskd_distiller(golden)
    student, teacher = golden["outputs"]["student"], golden["outputs"]["teacher"]
    loss = golden["models"]["student"].loss_function
    gt = golden["models"]["student"].prepare_ground_truth(
        ground_truth(golden["targets"], scenario), student.image_sizes
    )
    with torch.no_grad():
        targets = loss.targets(student, gt)
        losses = loss.loss_maps(student, targets)
        cross = kd.cross_head_outputs(golden["states"]["student"], golden["states"]["teacher"], student)
        losses.update(kd.kd_loss_maps(cross, teacher, targets))
    assert set(losses) == set(CROSSKD_LOSS_NAMES)
    for ours, theirs in CROSSKD_LOSS_NAMES.items():
        expected = torch.stack([golden["crosskd"][f"losses/{scenario}/{theirs}/{level}"] for level in range(5)])
        as_numbers = [golden["losses"][f"crosskd/{scenario}/{theirs}/{level}"] for level in range(5)]
        actual = per_level_sums(losses[ours], student.feature_maps)
        torch.testing.assert_close(actual, expected, **LOSS_TOLERANCE, msg=f"{scenario} {ours}")
        torch.testing.assert_close(actual, torch.tensor(as_numbers), **LOSS_TOLERANCE)
    if scenario == "all_empty":  # the centre-ness KD covers the positives only; the others every valid anchor
        assert losses["loss_center_kd"].abs().sum() == 0
        assert losses["loss_cls_kd"].sum() > 0 and losses["loss_loc_kd"].sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def test_golden_student_weights_are_loaded_from_the_files(golden_dir):
    """The converted student holds exactly the files' tensors (a guard against a silently skipped load)."""
    weights = student_weights(golden_dir)
    model = ATSSForObjectDetection(student_config())
    load_converted_weights(model, weights)
    for name in ("atss_cls", "atss_reg", "atss_centerness"):
        for kind in ("weight", "bias"):
            actual = getattr(getattr(model.head, name), kind)
            torch.testing.assert_close(actual, weights[f"bbox_head.{name}.{kind}"], atol=0, rtol=0)
    torch.testing.assert_close(model.head.scales[4].scale, weights["bbox_head.scales.4.scale"], atol=0, rtol=0)
    torch.testing.assert_close(model.backbone.conv1.weight, weights["backbone.conv1.weight"], atol=0, rtol=0)
