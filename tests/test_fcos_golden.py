"""FCOS parity with MMDetection 3.3.0 and the official CrossKD code: the golden FCOS student and teacher of
../shared/golden/fcos (see ../shared/golden/README.md, "RetinaNet, FCOS and ATSS").

The student (a standard ResNet-18 FCOS whose backbone is the GFL student's) is checked from the input pixels: FPN
features (ReLU before P7), head outputs, points and valid flags, assignment, targets, losses of the three ground-truth
scenarios and detections. The teacher's caffe-style narrow ResNet-50 is not a timm model, so its head is checked from
its saved FPN outputs. CrossKD (cross-head from conv 2, KD losses over all points divided by the centre-ness sum) is
checked through `DetectionDistiller`.
"""

from dataclasses import asdict

import pytest
import torch
from golden_utils import (
    BOX_TOLERANCE,
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
)
from safetensors.torch import load_file

from hf_kd import DetectionDistiller, DistillationConfig
from hf_kd.convert.mmdet import convert_state_dict, load_converted_weights
from hf_kd.models.detection.assigners import fcos_assign
from hf_kd.models.detection.box_ops import box_to_distance, distance_to_box
from hf_kd.models.detection.configuration_fcos import FCOSConfig
from hf_kd.models.detection.fpn import FeaturePyramid
from hf_kd.models.detection.heads import flatten_levels
from hf_kd.models.detection.image_processing_dense import FCOSImageProcessor
from hf_kd.models.detection.modeling_fcos import FCOSForObjectDetection
from hf_kd.models.detection.priors import level_sizes

NUM_CLASSES = 3
LOSS_NAMES = ("loss_cls", "loss_bbox", "loss_centerness")
# hf_kd loss name -> the official CrossKDFCOS name
CROSSKD_LOSS_NAMES = {name: name for name in LOSS_NAMES} | {"loss_cls_kd": "loss_cls_kd", "loss_loc_kd": "loss_reg_kd"}
DEPTH = 2  # CrossKD's reused_teacher_head_idx for FCOS
# head output name -> (golden key, channels per point)
HEAD_OUTPUTS = {"logits": ("cls_scores", NUM_CLASSES), "bbox_regression": ("bbox_preds", 4)}


def golden_config() -> FCOSConfig:
    """Student and teacher: FPN and head width 64 (the teacher's FPN inputs have the ResNet-18 widths, too)."""
    return FCOSConfig(backbone="resnet18", fpn_channels=64, head_channels=64, num_labels=NUM_CLASSES)


def student_weights(golden_dir) -> dict[str, torch.Tensor]:
    """The student's full MMDetection state dict: the GFL student's backbone and the FCOS file's FPN and head."""
    weights = {k: v for k, v in load_file(golden_dir / "student_r18.safetensors").items() if k.startswith("backbone.")}
    return weights | load_file(golden_dir / "fcos" / "student_r18.safetensors")


def outputs_with_states(model, feature_maps, image_sizes, reference=None):
    """The model's outputs from FPN outputs and its tower states after `DEPTH` convs (on `reference`'s points)."""
    states = [model.head.forward_towers(feature, DEPTH) for feature in feature_maps]
    maps = [model.head.forward_from(*state, level, DEPTH) for level, state in enumerate(states)]
    priors = None if reference is None else reference.priors
    valid = None if reference is None else reference.valid_mask
    return model.detection_outputs(maps, list(feature_maps), image_sizes, priors, valid), states


@pytest.fixture(scope="module")
def golden(golden_dir):
    """The golden files; the student from the input pixels, the teacher's FPN and head on its saved FPN outputs, both
    with their tower states after 2 convs."""
    data = load_golden(golden_dir / "fcos")
    data["pixel_values"], data["pixel_mask"] = data["inputs"]["inputs"], golden_pixel_mask()
    data["saved"] = {"student": data["student_outputs"], "teacher": data["teacher_outputs"]}
    student = FCOSForObjectDetection(golden_config()).eval()
    load_converted_weights(student, student_weights(golden_dir))
    teacher = FCOSForObjectDetection(golden_config()).eval()
    weights = convert_state_dict({k: v for k, v in data["teacher_r50"].items() if not k.startswith("backbone.")})
    missing, unexpected = teacher.load_state_dict(weights, strict=False)
    assert unexpected == [] and missing and all(key.startswith("backbone.") for key in missing)
    with torch.no_grad():
        forward_outputs = student(data["pixel_values"], pixel_mask=data["pixel_mask"])
        image_sizes = forward_outputs.image_sizes
        student_outputs, student_states = outputs_with_states(student, forward_outputs.feature_maps, image_sizes)
        teacher_features = [data["teacher_outputs"][f"neck/{level}"] for level in range(NUM_LEVELS)]
        teacher_outputs, teacher_states = outputs_with_states(teacher, teacher_features, image_sizes, student_outputs)
    data["models"] = {"student": student, "teacher": teacher}
    data["forward_outputs"] = forward_outputs
    data["outputs"] = {"student": student_outputs, "teacher": teacher_outputs}
    data["states"] = {"student": student_states, "teacher": teacher_states}
    return data


def distiller(golden) -> DetectionDistiller:
    config = DistillationConfig.from_method("crosskd", "fcos")
    return DetectionDistiller(golden["models"]["student"], golden["models"]["teacher"], config)


def targets_of(golden, name: str, scenario: str):
    model, outputs = golden["models"][name], golden["outputs"][name]
    gt = model.prepare_ground_truth(ground_truth(golden["targets"], scenario), outputs.image_sizes)
    return model.loss_function.targets(outputs, gt)


# ---------------------------------------------------------------------------------------------------------------------
# Student from pixels: features, points, assignment, targets
# ---------------------------------------------------------------------------------------------------------------------


def test_fpn_features(golden):
    feature_maps = golden["forward_outputs"].feature_maps
    assert len(feature_maps) == NUM_LEVELS
    for level, feature in enumerate(feature_maps):
        torch.testing.assert_close(feature, golden["saved"]["student"][f"neck/{level}"], **FEATURE_TOLERANCE)


def test_fpn_relu_before_p7_matters(golden):
    """FCOS's FPN: P6 from the P5 output without a ReLU, P7 from ReLU(P6); without that ReLU P7 differs."""
    model = golden["models"]["student"]
    assert model.config.fpn_extra_convs_on == "output" and model.config.fpn_relu_before_extra_convs
    plain = FeaturePyramid(model.backbone.feature_info.channels(), 64, NUM_LEVELS, "output", False)
    plain.load_state_dict(model.neck.state_dict())
    with torch.no_grad():
        features = plain(model.backbone(golden["pixel_values"]))
    torch.testing.assert_close(features[3], golden["saved"]["student"]["neck/3"], **FEATURE_TOLERANCE)
    assert (features[4] - golden["saved"]["student"]["neck/4"]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_head_outputs(golden, name):
    """Class logits, distances in pixels (`exp(scale * conv_reg)`) and centre-ness logits (on the cls tower)."""
    outputs, saved = golden["outputs"][name], golden["saved"][name]
    maps = {
        key: per_level_maps(getattr(outputs, field), outputs.feature_maps) for field, (key, _) in HEAD_OUTPUTS.items()
    }
    maps["centernesses"] = per_level_maps(outputs.centerness_logits[..., None], outputs.feature_maps)
    for key, level_maps in maps.items():
        for level in range(NUM_LEVELS):
            torch.testing.assert_close(level_maps[level], saved[f"{key}/{level}"], **FEATURE_TOLERANCE, msg=key)
    if name == "student":  # forward() gives the same outputs as the tower-state path the distiller takes
        forward_outputs = golden["forward_outputs"]
        for field in ("logits", "bbox_regression", "centerness_logits", "pred_boxes"):
            torch.testing.assert_close(getattr(forward_outputs, field), getattr(outputs, field), atol=0, rtol=0)


def test_points_and_valid_flags(golden):
    outputs, targets = golden["outputs"]["student"], golden["targets"]
    sizes = level_sizes(outputs.feature_maps, len(outputs.priors))
    assert golden["models"]["student"].priors_per_location == 1 and outputs.priors.shape[-1] == 2
    for level, (points, valid) in enumerate(zip(outputs.priors.split(sizes), outputs.valid_mask.split(sizes, dim=1))):
        torch.testing.assert_close(points, targets[f"priors/{level}"], atol=0, rtol=0)
        for image in range(2):
            assert torch.equal(valid[image], targets[f"valid_flags/img{image}/{level}"]), (level, image)
    assert not outputs.valid_mask[1].all(), "image 1 is smaller than the batch: some of its points lie outside it"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fcos_assignment(golden, scenario):
    """Scale-range assignment over every point of the padded batch: the positives and their boxes."""
    model, outputs, targets = golden["models"]["student"], golden["outputs"]["student"], golden["targets"]
    gt = model.prepare_ground_truth(ground_truth(targets, scenario), outputs.image_sizes)
    sizes = level_sizes(outputs.feature_maps, len(outputs.priors))
    assigned, positive = fcos_assign(outputs.priors, sizes, model.config.regress_ranges, gt)
    expected_labels = torch.cat([targets[f"targets/{scenario}/labels/{level}"] for level in range(NUM_LEVELS)], 1)
    assert torch.equal(positive, expected_labels != NUM_CLASSES)
    torch.testing.assert_close(gt.classes.gather(1, assigned)[positive], expected_labels[positive], atol=0, rtol=0)
    expected_distances = torch.cat(
        [targets[f"targets/{scenario}/bbox_targets/{level}"] for level in range(NUM_LEVELS)], dim=1
    )
    boxes = gt.boxes.gather(1, assigned[..., None].expand(-1, -1, 4))
    distances = box_to_distance(outputs.priors, boxes)
    torch.testing.assert_close(distances[positive], expected_distances[positive], atol=0, rtol=0)
    assert positive.sum().item() == golden["losses"][f"targets/{scenario}/num_pos"]
    assert (positive.sum() > 0) == (scenario != "all_empty")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_targets(golden, scenario):
    outputs, expected = golden["outputs"]["student"], golden["targets"]
    targets = targets_of(golden, "student", scenario)
    sizes = level_sizes(outputs.feature_maps, len(outputs.priors))
    has_boxes = torch.tensor([len(expected[f"gt/{scenario}/img{image}/labels"]) > 0 for image in range(2)])
    for level, (labels, distances, centerness, weights) in enumerate(
        zip(
            targets.labels.split(sizes, dim=1),
            targets.box_targets.split(sizes, dim=1),
            targets.centerness.split(sizes, dim=1),
            targets.label_weights.split(sizes, dim=1),
        )
    ):
        prefix = f"targets/{scenario}"
        torch.testing.assert_close(labels, expected[f"{prefix}/labels/{level}"], atol=0, rtol=0)
        assert torch.equal(weights, torch.ones_like(weights)), "every point is a sample: no valid flags"
        # distances to the assigned box (to box 0 for background points); MMDetection writes 0 for images without gt
        torch.testing.assert_close(
            distances[has_boxes], expected[f"{prefix}/bbox_targets/{level}"][has_boxes], atol=0, rtol=0
        )
        torch.testing.assert_close(centerness, expected[f"{prefix}/centerness_targets/{level}"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(targets.avg_factor, expected[f"targets/{scenario}/num_pos"], atol=0, rtol=0)
    torch.testing.assert_close(
        targets.kd_avg_factor, expected[f"targets/{scenario}/centerness_denorm"], rtol=1e-6, atol=0
    )
    assert targets.avg_factor.item() == golden["losses"][f"targets/{scenario}/num_pos_clamped"]
    if scenario == "all_empty":  # no positives: D is its floor 1e-6
        assert targets.centerness.sum() == 0 and targets.kd_avg_factor.item() == pytest.approx(1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Student and teacher: losses, detections
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", ["student", "teacher"])
def test_losses(golden, name, scenario):
    """FCOS's losses are one scalar each over all levels: the sums of the per-point maps."""
    model, outputs = golden["models"][name], golden["outputs"][name]
    with torch.no_grad():
        maps = model.loss_function.loss_maps(outputs, targets_of(golden, name, scenario))
    assert set(maps) == set(LOSS_NAMES)
    for loss_name in LOSS_NAMES:
        assert maps[loss_name].shape == outputs.logits.shape[:2]
        actual = maps[loss_name].sum()
        expected = golden["saved"][name][f"losses/{scenario}/{loss_name}"]
        as_number = golden["losses"][f"{name}/fcos/{scenario}/{loss_name}"]
        torch.testing.assert_close(actual, expected, **LOSS_TOLERANCE, msg=f"{name} {scenario} {loss_name}")
        torch.testing.assert_close(actual, torch.tensor(as_number), **LOSS_TOLERANCE)
    # points in the padding are samples too (MMDetection's FCOS has no valid flags)
    assert maps["loss_cls"][~outputs.valid_mask].sum() > 0
    if scenario == "all_empty":  # no positives: only the classification loss
        assert maps["loss_bbox"].abs().sum() == 0 and maps["loss_centerness"].abs().sum() == 0
        assert maps["loss_cls"].sum() > 0


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_forward_loss_from_pixels(golden, scenario):
    """`forward(labels=...)` gives the losses in `loss_dict` and their sum in `loss`."""
    model = golden["models"]["student"]
    with torch.no_grad():
        outputs = model(
            golden["pixel_values"],
            pixel_mask=golden["pixel_mask"],
            labels=ground_truth(golden["targets"], scenario),
        )
    expected = {name: golden["losses"][f"student/fcos/{scenario}/{name}"] for name in LOSS_NAMES}
    assert set(outputs.loss_dict) == set(LOSS_NAMES)
    for name in LOSS_NAMES:
        torch.testing.assert_close(outputs.loss_dict[name], torch.tensor(expected[name]), **LOSS_TOLERANCE)
    torch.testing.assert_close(outputs.loss, torch.tensor(sum(expected.values())), **LOSS_TOLERANCE)


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_detections(golden, name):
    """The image processor's post-processing (NMS IoU 0.5, scores times the centre-ness) in the input frame."""
    outputs, saved = golden["outputs"][name], golden["saved"][name]
    detections = FCOSImageProcessor().post_process_object_detection(outputs, threshold=0.0, candidate_threshold=0.05)
    assert_detections_match(detections, saved, "det")
    num_detections = golden["manifest"]["num_detections"][name]
    assert [len(image["scores"]) for image in detections] == num_detections["det"]


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_detections_before_nms(golden, name):
    outputs, saved = golden["outputs"][name], golden["saved"][name]
    # MMDetection's with_nms=False: score threshold and per-level top-k on the class score, level by level
    candidates = mmdet_detections(outputs, nms_iou_threshold=None, max_detections=None)
    assert_detections_match(candidates, saved, "det_prenms", window=3)
    num_detections = golden["manifest"]["num_detections"][name]
    assert [len(image["scores"]) for image in candidates] == num_detections["det_prenms"]
    # the scores are the class scores times the centre-ness: some fall below the threshold the class scores passed
    assert any((image["scores"] <= 0.05).any() for image in candidates)


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_detections_rescaled(golden, name):
    """post_process_object_detection to the original sizes = MMDetection's rescale=True (boxes / scale_factor)."""
    outputs, saved = golden["outputs"][name], golden["saved"][name]
    original_sizes = torch.tensor([meta["ori_shape"] for meta in golden["manifest"]["img_metas_rescaled"]])
    processor = FCOSImageProcessor()
    results = processor.post_process_object_detection(
        outputs, threshold=0.0, candidate_threshold=0.05, target_sizes=original_sizes
    )
    assert_detections_match(results, saved, "det_rescaled")


def test_golden_student_weights_are_loaded_from_the_file(golden_dir):
    """The converted student holds exactly the files' tensors (a guard against a silently skipped load)."""
    weights = student_weights(golden_dir)
    model = FCOSForObjectDetection(golden_config())
    load_converted_weights(model, weights)
    for mmdet_key, key in (
        ("bbox_head.conv_centerness.weight", "head.conv_centerness.weight"),
        ("bbox_head.scales.4.scale", "head.scales.4.scale"),
        ("backbone.layer4.1.conv2.weight", "backbone.layer4.1.conv2.weight"),
    ):
        torch.testing.assert_close(model.state_dict()[key], weights[mmdet_key], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# CrossKD (official CrossKDFCOS): tower holds, cross-head, losses
# ---------------------------------------------------------------------------------------------------------------------


def test_crosskd_settings():
    """The official CrossKD FCOS config: cross-head from conv 2, KD weights 0.4 (classification) and 0.75 (-log IoU,
    weighted by the teacher's best class score), no centre-ness KD, every level."""
    config = DistillationConfig.from_method("crosskd", "fcos")
    assert asdict(config) == asdict(DistillationConfig()) | {
        "cross_head_index": 2,
        "cls_kd_weight": 0.4,
        "loc_kd": "log_iou",
        "loc_kd_weight": 0.75,
    }


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_tower_holds(golden, name):
    """The tower states after 2 convs (conv, GroupNorm, ReLU: the official code's holds are the activated states)."""
    for level, (cls_state, reg_state) in enumerate(golden["states"][name]):
        torch.testing.assert_close(cls_state, golden["crosskd"][f"{name}_cls_hold/{level}"], **FEATURE_TOLERANCE)
        torch.testing.assert_close(reg_state, golden["crosskd"][f"{name}_reg_hold/{level}"], **FEATURE_TOLERANCE)


def test_cross_head_outputs(golden):
    """The student's aligned holds through the teacher's last two convs and predictors."""
    crosskd, student_outputs = golden["crosskd"], golden["outputs"]["student"]
    with torch.no_grad():
        cross = distiller(golden).cross_head_outputs(
            golden["states"]["student"], golden["states"]["teacher"], student_outputs
        )
    expected = {
        field: flatten_levels([crosskd[f"reused_{key}/{level}"] for level in range(NUM_LEVELS)], channels)
        for field, (key, channels) in HEAD_OUTPUTS.items()
    }
    for field, value in expected.items():
        torch.testing.assert_close(getattr(cross, field), value, **FEATURE_TOLERANCE, msg=field)
    centerness = flatten_levels([crosskd[f"reused_centernesses/{level}"] for level in range(NUM_LEVELS)], 1)
    torch.testing.assert_close(cross.centerness_logits, centerness.squeeze(-1), **FEATURE_TOLERANCE)
    # the boxes the KD loss compares: decoded at the student's points, not clipped to the image
    torch.testing.assert_close(cross.priors, student_outputs.priors, atol=0, rtol=0)
    expected_boxes = distance_to_box(student_outputs.priors, expected["bbox_regression"])
    torch.testing.assert_close(cross.pred_boxes, expected_boxes, **BOX_TOLERANCE)
    assert (cross.pred_boxes < 0).any(), "reused boxes reach past the image and are not clipped"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_crosskd_losses(golden, scenario):
    """The student's own losses and the KD losses of `CrossKDFCOS.loss`: over all points (label weights 1), divided
    by the centre-ness sum D (1e-6 without positives: the KD losses are then ~1e6 times larger, as the official)."""
    kd = distiller(golden)
    student, teacher = golden["outputs"]["student"], golden["outputs"]["teacher"]
    loss = golden["models"]["student"].loss_function
    with torch.no_grad():
        targets = targets_of(golden, "student", scenario)
        losses = loss.loss_maps(student, targets)
        cross = kd.cross_head_outputs(golden["states"]["student"], golden["states"]["teacher"], student)
        losses.update(kd.kd_loss_maps(cross, teacher, targets))
    assert set(losses) == set(CROSSKD_LOSS_NAMES)
    for ours, theirs in CROSSKD_LOSS_NAMES.items():
        expected = golden["crosskd"][f"losses/{scenario}/{theirs}"]
        torch.testing.assert_close(losses[ours].sum(), expected, **LOSS_TOLERANCE, msg=f"{scenario} {ours}")
        assert losses[ours].sum().item() == pytest.approx(golden["losses"][f"crosskd/{scenario}/{theirs}"], rel=1e-4)
    if scenario == "all_empty":
        assert targets.kd_avg_factor.item() == pytest.approx(1e-6) and losses["loss_cls_kd"].sum() > 1e5
