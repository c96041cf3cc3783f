"""GFL parity with MMDetection 3.3.0: the golden student and teacher of ../shared/golden (see its README.md).

The student (a standard ResNet-18 GFL) is checked from the input pixels: backbone and FPN features, head outputs,
priors and valid flags, ATSS assignment, targets, losses of the three ground-truth scenarios and detections. The
teacher's narrow ResNet-50 is not a timm model, so its head is checked from its saved FPN outputs.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_kd import GFLConfig, GFLForObjectDetection, GFLImageProcessor
from hf_kd.convert.mmdet import convert_state_dict, load_converted_weights
from hf_kd.models.gfl.modeling_gfl import atss_assign, box_iou, detect, pad_ground_truth

SCENARIOS = ("main", "one_empty", "all_empty")
LOSS_NAMES = ("loss_cls", "loss_bbox", "loss_dfl")
NUM_LEVELS = 5
# golden/README.md: features and logits within atol = rtol = 1e-4 (thread count alone moves head outputs by 6e-6).
FEATURE_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
# Losses within rtol 1e-4; the atol only absorbs -0.0 vs 0.0 and float noise on levels without positives.
LOSS_TOLERANCE = {"atol": 1e-7, "rtol": 1e-4}
# Boxes are in pixels (up to ~2000 before clipping): a side is the expected bin (<= 16) times the stride (<= 128), so
# a 1e-5 change of the box logits moves it by up to ~1e-3 px; rtol 1e-4 covers the large coordinates.
BOX_TOLERANCE = {"atol": 1e-3, "rtol": 1e-4}


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


def golden_pixel_mask() -> torch.Tensor:
    """Image 0 fills the 256x320 batch; image 1 is 200x250 (golden img_metas)."""
    pixel_mask = torch.zeros(2, 256, 320, dtype=torch.long)
    pixel_mask[0] = 1
    pixel_mask[1, :200, :250] = 1
    return pixel_mask


def per_level_maps(flat: torch.Tensor, spatial_shapes: tuple[tuple[int, int], ...]) -> list[torch.Tensor]:
    """`(B, Q, C)` per-prior values back to MMDetection's per-level `(B, C, H, W)` maps."""
    sizes = [height * width for height, width in spatial_shapes]
    return [
        chunk.transpose(1, 2).reshape(len(flat), -1, height, width)
        for chunk, (height, width) in zip(flat.split(sizes, dim=1), spatial_shapes)
    ]


def per_level_sums(per_prior: torch.Tensor, num_per_level: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([chunk.sum() for chunk in per_prior.split(num_per_level, dim=1)])


def ground_truth(targets: dict[str, torch.Tensor], scenario: str) -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": targets[f"gt/{scenario}/img{i}/bboxes"], "class_labels": targets[f"gt/{scenario}/img{i}/labels"]}
        for i in range(2)
    ]


@pytest.fixture(scope="module")
def golden(golden_dir):
    """The golden files, the converted student and its outputs from the input pixels."""
    data = {
        "pixel_values": load_file(golden_dir / "inputs.safetensors")["inputs"],
        "pixel_mask": golden_pixel_mask(),
        "targets": load_file(golden_dir / "targets.safetensors"),
        "losses": json.loads((golden_dir / "losses.json").read_text()),
        "manifest": json.loads((golden_dir / "manifest.json").read_text()),
        "saved": {
            "student": load_file(golden_dir / "student_outputs.safetensors"),
            "teacher": load_file(golden_dir / "teacher_outputs.safetensors"),
        },
        "teacher_weights": load_file(golden_dir / "teacher_r50.safetensors"),
    }
    student = GFLForObjectDetection(student_config())
    load_converted_weights(student, load_file(golden_dir / "student_r18.safetensors"))
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
    weights = convert_state_dict({k: v for k, v in golden["teacher_weights"].items() if not k.startswith("backbone.")})
    missing, unexpected = teacher.load_state_dict(weights, strict=False)
    assert unexpected == [] and missing and all(key.startswith("backbone.") for key in missing)
    teacher.eval()
    feature_maps = [golden["saved"]["teacher"][f"neck/{level}"] for level in range(NUM_LEVELS)]
    with torch.no_grad():
        outputs = teacher.head_outputs(feature_maps, golden["outputs"]["student"].image_sizes)
        outputs.detections = detect(outputs)  # the config's test settings are MMDetection's test_cfg
    golden["models"]["teacher"] = teacher
    golden["outputs"]["teacher"] = outputs
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
    priors = outputs.priors.boxes.split(outputs.priors.num_per_level)
    valid = outputs.valid_mask.split(outputs.priors.num_per_level, dim=1)
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
    outputs, targets = golden["outputs"]["student"], golden["targets"]
    gt_boxes, gt_classes, gt_mask = pad_ground_truth(ground_truth(targets, scenario), outputs.valid_mask.device)
    assigned, positive = atss_assign(outputs.priors, outputs.valid_mask, gt_boxes, gt_mask, topk=9)
    for image in range(2):
        inside = outputs.valid_mask[image]  # MMDetection's assigner only sees the inside (valid) priors
        expected = {name: targets[f"assign/{scenario}/img{image}/{name}"] for name in ("assigned_gt_inds", "labels")}
        ours_positive, ours_assigned = positive[image, inside], assigned[image, inside]
        torch.testing.assert_close(
            torch.where(ours_positive, ours_assigned + 1, 0), expected["assigned_gt_inds"], atol=0, rtol=0
        )
        torch.testing.assert_close(
            torch.where(ours_positive, gt_classes[image, ours_assigned], -1), expected["labels"], atol=0, rtol=0
        )
        # max_overlaps: the IoU of each positive prior with its box (-INF or 0 elsewhere, nothing to compare)
        overlaps = box_iou(outputs.priors.boxes[inside], gt_boxes[image, ours_assigned])
        expected_overlaps = targets[f"assign/{scenario}/img{image}/max_overlaps"]
        torch.testing.assert_close(overlaps[ours_positive], expected_overlaps[ours_positive], atol=1e-6, rtol=1e-5)
    num_positive = golden["losses"][f"targets/{scenario}/num_pos"]
    assert positive.sum().item() == num_positive
    if scenario != "all_empty":
        assert num_positive > 0


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_targets(golden, scenario):
    model, outputs, expected = golden["models"]["student"], golden["outputs"]["student"], golden["targets"]
    _, targets = model.loss_terms(outputs, ground_truth(expected, scenario))
    sizes = outputs.priors.num_per_level
    for level, (labels, boxes, positive, valid) in enumerate(
        zip(
            targets.labels.split(sizes, dim=1),
            targets.boxes.split(sizes, dim=1),
            targets.positive.split(sizes, dim=1),
            targets.valid.split(sizes, dim=1),
        )
    ):
        prefix = f"targets/{scenario}"
        torch.testing.assert_close(labels, expected[f"{prefix}/labels/{level}"], atol=0, rtol=0)
        torch.testing.assert_close(valid.float(), expected[f"{prefix}/label_weights/{level}"], atol=0, rtol=0)
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
    cls_scores = per_level_maps(outputs.logits, outputs.spatial_shapes)
    bbox_preds = per_level_maps(outputs.box_logits.flatten(2), outputs.spatial_shapes)  # channel = side * 17 + bin
    for level in range(NUM_LEVELS):
        torch.testing.assert_close(cls_scores[level], saved[f"cls_scores/{level}"], **FEATURE_TOLERANCE)
        torch.testing.assert_close(bbox_preds[level], saved[f"bbox_preds/{level}"], **FEATURE_TOLERANCE)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", ["student", "teacher"])
def test_losses_per_level(golden_with_teacher, name, scenario):
    golden = golden_with_teacher
    model, outputs = golden["models"][name], golden["outputs"][name]
    labels = ground_truth(golden["targets"], scenario)
    with torch.no_grad():
        terms, _ = model.loss_terms(outputs, labels)
    for loss_name in LOSS_NAMES:
        actual = per_level_sums(terms[loss_name], outputs.priors.num_per_level)
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
    assert outputs.detections is None  # no post-processing when computing losses
    expected = {
        name: sum(golden["losses"][f"student/gfl/{scenario}/{name}/{level}"] for level in range(5))
        for name in LOSS_NAMES
    }
    assert set(outputs.loss_dict) == set(LOSS_NAMES)
    for name in LOSS_NAMES:
        torch.testing.assert_close(outputs.loss_dict[name], torch.tensor(expected[name]), **LOSS_TOLERANCE)
    torch.testing.assert_close(outputs.loss, torch.tensor(sum(expected.values())), **LOSS_TOLERANCE)


def assert_detections_match(actual: list[dict], saved: dict[str, torch.Tensor], key: str) -> None:
    for image, detections in enumerate(actual):
        prefix = f"{key}/img{image}"
        assert len(detections["scores"]) == len(saved[f"{prefix}/scores"]) > 0, prefix
        torch.testing.assert_close(detections["labels"], saved[f"{prefix}/labels"], atol=0, rtol=0, msg=prefix)
        torch.testing.assert_close(detections["scores"], saved[f"{prefix}/scores"], **FEATURE_TOLERANCE, msg=prefix)
        torch.testing.assert_close(detections["boxes"], saved[f"{prefix}/bboxes"], **BOX_TOLERANCE, msg=prefix)


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_detections(golden_with_teacher, name):
    outputs, saved = golden_with_teacher["outputs"][name], golden_with_teacher["saved"][name]
    assert_detections_match(outputs.detections, saved, "det")
    num_detections = golden_with_teacher["manifest"]["num_detections"][name]
    assert [len(detections["scores"]) for detections in outputs.detections] == num_detections["det"]


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_detections_before_nms(golden_with_teacher, name):
    outputs, saved = golden_with_teacher["outputs"][name], golden_with_teacher["saved"][name]
    # MMDetection's with_nms=False: score threshold and per-level top-k only, level by level, no max_per_img cap
    candidates = detect(outputs, nms_iou_threshold=None, max_detections=None)
    assert_detections_match(candidates, saved, "det_prenms")
    # the default max_detections (100) only applies after NMS
    assert [len(c["scores"]) for c in detect(outputs, nms_iou_threshold=None)] == [
        len(c["scores"]) for c in candidates
    ]


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_detections_rescaled(golden_with_teacher, name):
    """post_process_object_detection to the original sizes = MMDetection's rescale=True (boxes / scale_factor)."""
    golden = golden_with_teacher
    outputs, saved = golden["outputs"][name], golden["saved"][name]
    original_sizes = torch.tensor([meta["ori_shape"] for meta in golden["manifest"]["img_metas_rescaled"]])
    results = GFLImageProcessor().post_process_object_detection(outputs, threshold=0.05, target_sizes=original_sizes)
    assert_detections_match(results, saved, "det_rescaled")


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
        load_converted_weights(teacher, golden["teacher_weights"])
