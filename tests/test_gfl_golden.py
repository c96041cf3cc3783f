"""GFL parity with MMDetection 3.3.0: the golden student and teacher of ../shared/golden (see its README.md).

The student (a standard ResNet-18 GFL) is checked from the input pixels: backbone and FPN features, head outputs,
priors and valid flags, ATSS assignment, targets, losses of the three ground-truth scenarios and detections. The
teacher's narrow ResNet-50 is not a timm model, so its head is checked from its saved FPN outputs.
"""

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

from hf_kd import GFLConfig, GFLForObjectDetection, GFLImageProcessor
from hf_kd.convert.mmdet import convert_state_dict, load_converted_weights
from hf_kd.models.detection.assigners import atss_assign
from hf_kd.models.detection.box_ops import box_iou
from hf_kd.models.detection.priors import level_sizes

LOSS_NAMES = ("loss_cls", "loss_bbox", "loss_dfl")


def student_config() -> GFLConfig:
    return GFLConfig(backbone="resnet18", fpn_channels=64, head_channels=64, num_labels=3)


def teacher_config() -> GFLConfig:
    return GFLConfig(
        backbone="resnet50",
        backbone_kwargs={"stem_width": 16, "channels": [16, 32, 64, 128]},
        fpn_channels=64,
        head_channels=64,
        num_labels=3,
    )


def head_outputs(model: GFLForObjectDetection, feature_maps: list[torch.Tensor], image_sizes: torch.Tensor):
    """The model's outputs from given FPN outputs (the teacher's saved ones)."""
    maps = [model.head(feature, level) for level, feature in enumerate(feature_maps)]
    return model.detection_outputs(maps, feature_maps, image_sizes)


@pytest.fixture(scope="module")
def golden(golden_dir):
    """The golden files, the converted student and its outputs from the input pixels."""
    data = load_golden(golden_dir)
    data["pixel_values"] = data["inputs"]["inputs"]
    data["pixel_mask"] = golden_pixel_mask()
    data["saved"] = {"student": data["student_outputs"], "teacher": data["teacher_outputs"]}
    student = GFLForObjectDetection(student_config())
    load_converted_weights(student, data["student_r18"])
    student.eval()
    with torch.no_grad():
        data["backbone_features"] = student.backbone(data["pixel_values"])
        data["outputs"] = {"student": student(data["pixel_values"], pixel_mask=data["pixel_mask"])}
    data["models"] = {"student": student}
    return data


@pytest.fixture(scope="module")
def golden_with_teacher(golden):
    """Adds the teacher: FPN and head weights loaded, head run on the saved teacher FPN outputs."""
    teacher = GFLForObjectDetection(teacher_config())
    weights = convert_state_dict({k: v for k, v in golden["teacher_r50"].items() if not k.startswith("backbone.")})
    missing, unexpected = teacher.load_state_dict(weights, strict=False)
    assert unexpected == [] and missing and all(key.startswith("backbone.") for key in missing)
    teacher.eval()
    feature_maps = [golden["saved"]["teacher"][f"neck/{level}"] for level in range(NUM_LEVELS)]
    with torch.no_grad():
        golden["outputs"]["teacher"] = head_outputs(teacher, feature_maps, golden["outputs"]["student"].image_sizes)
    golden["models"]["teacher"] = teacher
    return golden


# ---------------------------------------------------------------------------------------------------------------------
# Student from pixels: features, priors, assignment, targets
# ---------------------------------------------------------------------------------------------------------------------


def test_backbone_features(golden):
    # golden backbone/0 is the stride-4 C2, which the detector does not use; ours are C3-C5.
    assert len(golden["backbone_features"]) == 3
    for index, feature in enumerate(golden["backbone_features"], start=1):
        torch.testing.assert_close(feature, golden["saved"]["student"][f"backbone/{index}"], **FEATURE_TOLERANCE)


def test_fpn_features(golden):
    feature_maps = golden["outputs"]["student"].feature_maps
    assert len(feature_maps) == NUM_LEVELS
    for level, feature in enumerate(feature_maps):
        torch.testing.assert_close(feature, golden["saved"]["student"][f"neck/{level}"], **FEATURE_TOLERANCE)


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
    assigned, positive = atss_assign(outputs.priors, sizes, outputs.valid_mask, gt, topk=9)
    for image in range(2):
        inside = outputs.valid_mask[image]  # MMDetection's assigner only sees the inside (valid) priors
        expected = {name: targets[f"assign/{scenario}/img{image}/{name}"] for name in ("assigned_gt_inds", "labels")}
        ours_positive, ours_assigned = positive[image, inside], assigned[image, inside]
        torch.testing.assert_close(
            torch.where(ours_positive, ours_assigned + 1, 0), expected["assigned_gt_inds"], atol=0, rtol=0
        )
        torch.testing.assert_close(
            torch.where(ours_positive, gt.classes[image, ours_assigned], -1), expected["labels"], atol=0, rtol=0
        )
        # max_overlaps: the IoU of each positive prior with its box (-INF or 0 elsewhere, nothing to compare)
        overlaps = box_iou(outputs.priors[inside], gt.boxes[image, ours_assigned])
        expected_overlaps = targets[f"assign/{scenario}/img{image}/max_overlaps"]
        torch.testing.assert_close(overlaps[ours_positive], expected_overlaps[ours_positive], atol=1e-6, rtol=1e-5)
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
    for level, (labels, boxes, positive, weights) in enumerate(
        zip(
            targets.labels.split(sizes, dim=1),
            targets.box_targets.split(sizes, dim=1),
            targets.positive.split(sizes, dim=1),
            targets.label_weights.split(sizes, dim=1),
        )
    ):
        prefix = f"targets/{scenario}"
        torch.testing.assert_close(labels, expected[f"{prefix}/labels/{level}"], atol=0, rtol=0)
        torch.testing.assert_close(weights, expected[f"{prefix}/label_weights/{level}"], atol=0, rtol=0)
        expected_positive = expected[f"{prefix}/bbox_weights/{level}"] > 0
        assert torch.equal(expected_positive, positive[..., None].expand_as(expected_positive)), level
        # bbox targets are the gt box for positives; MMDetection writes 0 elsewhere, hf_kd the prior box (unused)
        torch.testing.assert_close(boxes[positive], expected[f"{prefix}/bbox_targets/{level}"][positive])
    torch.testing.assert_close(targets.avg_factor, expected[f"targets/{scenario}/avg_factor"], atol=0, rtol=0)
    assert targets.avg_factor.item() == golden["losses"][f"targets/{scenario}/avg_factor"]


# ---------------------------------------------------------------------------------------------------------------------
# Student and teacher: head outputs, losses, detections
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_head_outputs(golden_with_teacher, name):
    outputs, saved = golden_with_teacher["outputs"][name], golden_with_teacher["saved"][name]
    cls_scores = per_level_maps(outputs.logits, outputs.feature_maps)
    bbox_preds = per_level_maps(outputs.bbox_regression, outputs.feature_maps)  # channel = side * 17 + bin
    for level in range(NUM_LEVELS):
        torch.testing.assert_close(cls_scores[level], saved[f"cls_scores/{level}"], **FEATURE_TOLERANCE)
        torch.testing.assert_close(bbox_preds[level], saved[f"bbox_preds/{level}"], **FEATURE_TOLERANCE)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", ["student", "teacher"])
def test_losses_per_level(golden_with_teacher, name, scenario):
    golden = golden_with_teacher
    model, outputs = golden["models"][name], golden["outputs"][name]
    gt = model.prepare_ground_truth(ground_truth(golden["targets"], scenario), outputs.image_sizes)
    with torch.no_grad():
        terms = model.loss_function.loss_maps(outputs, model.loss_function.targets(outputs, gt))
    for loss_name in LOSS_NAMES:
        actual = per_level_sums(terms[loss_name], outputs.feature_maps)
        expected = torch.stack([golden["saved"][name][f"losses/{scenario}/{loss_name}/{level}"] for level in range(5)])
        as_numbers = [golden["losses"][f"{name}/gfl/{scenario}/{loss_name}/{level}"] for level in range(5)]
        torch.testing.assert_close(actual, expected, **LOSS_TOLERANCE, msg=f"{name} {scenario} {loss_name}")
        torch.testing.assert_close(actual, torch.tensor(as_numbers), **LOSS_TOLERANCE)
    if scenario == "all_empty":  # no positives: only the classification loss, over every valid prior
        assert terms["loss_bbox"].abs().sum() == 0 and terms["loss_dfl"].abs().sum() == 0
        assert terms["loss_cls"].sum() > 0


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
        name: sum(golden["losses"][f"student/gfl/{scenario}/{name}/{level}"] for level in range(5))
        for name in LOSS_NAMES
    }
    assert set(outputs.loss_dict) == set(LOSS_NAMES)
    for name in LOSS_NAMES:
        torch.testing.assert_close(outputs.loss_dict[name], torch.tensor(expected[name]), **LOSS_TOLERANCE)
    torch.testing.assert_close(outputs.loss, torch.tensor(sum(expected.values())), **LOSS_TOLERANCE)


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_detections(golden_with_teacher, name):
    """The image processor's post-processing (MMDetection's test settings, score threshold 0.05) in the input frame."""
    outputs, saved = golden_with_teacher["outputs"][name], golden_with_teacher["saved"][name]
    detections = GFLImageProcessor().post_process_object_detection(outputs, threshold=0.0, candidate_threshold=0.05)
    assert_detections_match(detections, saved, "det")
    num_detections = golden_with_teacher["manifest"]["num_detections"][name]
    assert [len(image["scores"]) for image in detections] == num_detections["det"]


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_detections_before_nms(golden_with_teacher, name):
    outputs, saved = golden_with_teacher["outputs"][name], golden_with_teacher["saved"][name]
    # MMDetection's with_nms=False: score threshold and per-level top-k only, level by level, no max_per_img cap
    candidates = mmdet_detections(outputs, nms_iou_threshold=None, max_detections=None)
    assert_detections_match(candidates, saved, "det_prenms", window=3)
    # the default max_detections (100) only applies after NMS
    assert [len(c["scores"]) for c in mmdet_detections(outputs, nms_iou_threshold=None)] == [
        len(c["scores"]) for c in candidates
    ]


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_detections_rescaled(golden_with_teacher, name):
    """post_process_object_detection to the original sizes = MMDetection's rescale=True (boxes / scale_factor)."""
    golden = golden_with_teacher
    outputs, saved = golden["outputs"][name], golden["saved"][name]
    original_sizes = torch.tensor([meta["ori_shape"] for meta in golden["manifest"]["img_metas_rescaled"]])
    results = GFLImageProcessor().post_process_object_detection(
        outputs, threshold=0.0, candidate_threshold=0.05, target_sizes=original_sizes
    )
    assert_detections_match(results, saved, "det_rescaled")


def test_caller_threshold_below_the_test_setting_is_honoured(golden_with_teacher):
    """A threshold below MMDetection's 0.05 gives the candidates MMDetection would discard (post-processing is not
    done in `forward` with the config's threshold)."""
    outputs = golden_with_teacher["outputs"]["teacher"]
    processor = GFLImageProcessor()
    at_test_setting = processor.post_process_object_detection(outputs, threshold=0.05, max_detections=1000)
    lower = processor.post_process_object_detection(outputs, threshold=0.01, max_detections=1000)
    assert all(len(low["scores"]) > len(test["scores"]) for low, test in zip(lower, at_test_setting))
    assert all((low["scores"] > 0.01).all() and (low["scores"] <= 0.05).any() for low in lower)


# ---------------------------------------------------------------------------------------------------------------------
# Teacher checkpoint
# ---------------------------------------------------------------------------------------------------------------------


def test_teacher_backbone_is_not_a_timm_resnet50(golden):
    """MMDetection's ResNet-50 with base_channels=16 has a 16-wide 7x7 stem; timm's `stem_width` only applies to deep
    stems, so the full teacher checkpoint cannot load into a timm resnet50, and the converter says which keys differ."""
    teacher = GFLForObjectDetection(teacher_config())
    with pytest.raises(
        ValueError, match=r"backbone\.conv1\.weight: checkpoint \(16, 3, 7, 7\) vs model \(64, 3, 7, 7\)"
    ):
        load_converted_weights(teacher, golden["teacher_r50"])


def test_golden_student_weights_are_loaded_from_the_file(golden_dir):
    """The converted student holds exactly the file's tensors (a guard against a silently skipped load)."""
    weights = load_file(golden_dir / "student_r18.safetensors")
    model = GFLForObjectDetection(student_config())
    load_converted_weights(model, weights)
    torch.testing.assert_close(model.head.gfl_cls.weight, weights["bbox_head.gfl_cls.weight"], atol=0, rtol=0)
