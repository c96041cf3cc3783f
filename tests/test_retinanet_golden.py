"""RetinaNet parity with MMDetection 3.3.0 and the official CrossKD code: the golden student and teacher of
../shared/golden/retinanet (see ../shared/golden/README.md, "RetinaNet, FCOS and ATSS").

The student (a standard ResNet-18 RetinaNet, FPN and head 32 wide) is checked from the input pixels: backbone and FPN
features, head outputs, anchors and valid flags, MaxIoU assignment, targets, losses of the three ground-truth
scenarios and detections. Its backbone is the GFL golden student's (`../student_r18.safetensors`); the family's file
holds only the FPN and the head. The teacher's narrow ResNet-50 is not a timm model, so its head is checked from its
saved FPN outputs. CrossKD (cross-head from conv 3) is checked through `DetectionDistiller`.
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

from hf_kd import DetectionDistiller, DistillationConfig
from hf_kd.convert.mmdet import convert_state_dict, load_converted_weights
from hf_kd.models.detection.assigners import max_iou_assign
from hf_kd.models.detection.box_ops import box_iou
from hf_kd.models.detection.configuration_retinanet import RetinaNetConfig
from hf_kd.models.detection.heads import flatten_levels
from hf_kd.models.detection.image_processing_dense import RetinaNetImageProcessor
from hf_kd.models.detection.modeling_retinanet import RetinaNetForObjectDetection
from hf_kd.models.detection.priors import level_sizes

LOSS_NAMES = ("loss_cls", "loss_bbox")
# hf_kd loss name -> the official CrossKD code's name
CROSSKD_LOSS_NAMES = {
    "loss_cls": "loss_cls",
    "loss_bbox": "loss_bbox",
    "loss_cls_kd": "loss_cls_kd",
    "loss_loc_kd": "loss_reg_kd",
}
DEPTH = 3  # CrossKD's reused_teacher_head_idx for RetinaNet
ANCHORS_PER_LOCATION = 9


def golden_config() -> RetinaNetConfig:
    """Student and teacher: RetinaNet defaults, FPN and head 32 wide, 3 classes. The teacher's narrow ResNet-50 gives
    C3-C5 of the same widths as ResNet-18 (128, 256, 512), so its FPN and head load into this config too."""
    return RetinaNetConfig(backbone="resnet18", fpn_channels=32, head_channels=32, num_labels=3)


def student_weights(golden_dir) -> dict[str, torch.Tensor]:
    """The full student state dict (MMDetection keys): the GFL student's backbone, the family's FPN and head."""
    backbone = {
        k: v for k, v in load_file(golden_dir / "student_r18.safetensors").items() if k.startswith("backbone.")
    }
    return backbone | load_file(golden_dir / "retinanet" / "student_r18.safetensors")


def outputs_with_states(model, feature_maps, image_sizes, reference=None):
    """The model's outputs from FPN outputs, and its tower states after `DEPTH` convs (on `reference`'s priors)."""
    states = [model.head.forward_towers(feature, DEPTH) for feature in feature_maps]
    maps = [model.head.forward_from(*state, level, DEPTH) for level, state in enumerate(states)]
    priors = None if reference is None else reference.priors
    valid = None if reference is None else reference.valid_mask
    return model.detection_outputs(maps, list(feature_maps), image_sizes, priors, valid), states


@pytest.fixture(scope="module")
def golden(golden_dir):
    """The golden files; the converted student, its outputs from the input pixels and its tower states; the teacher
    (FPN and head weights) with its outputs and tower states from its saved FPN outputs."""
    data = load_golden(golden_dir / "retinanet")
    data["student_backbone_outputs"] = load_file(golden_dir / "student_outputs.safetensors")
    data["pixel_values"] = data["inputs"]["inputs"]
    data["pixel_mask"] = golden_pixel_mask()
    data["saved"] = {"student": data["student_outputs"], "teacher": data["teacher_outputs"]}

    student = RetinaNetForObjectDetection(golden_config())
    load_converted_weights(student, student_weights(golden_dir))
    student.eval()
    teacher = RetinaNetForObjectDetection(golden_config())
    weights = convert_state_dict({k: v for k, v in data["teacher_r50"].items() if not k.startswith("backbone.")})
    missing, unexpected = teacher.load_state_dict(weights, strict=False)
    assert unexpected == [] and missing and all(key.startswith("backbone.") for key in missing)
    teacher.eval()

    with torch.no_grad():
        data["backbone_features"] = student.backbone(data["pixel_values"])
        student_outputs = student(data["pixel_values"], pixel_mask=data["pixel_mask"])
        _, student_states = outputs_with_states(student, student_outputs.feature_maps, student_outputs.image_sizes)
        teacher_features = [data["teacher_outputs"][f"neck/{level}"] for level in range(NUM_LEVELS)]
        teacher_outputs, teacher_states = outputs_with_states(
            teacher, teacher_features, student_outputs.image_sizes, student_outputs
        )
    data["models"] = {"student": student, "teacher": teacher}
    data["outputs"] = {"student": student_outputs, "teacher": teacher_outputs}
    data["states"] = {"student": student_states, "teacher": teacher_states}
    return data


def crosskd_distiller(golden) -> DetectionDistiller:
    config = DistillationConfig.from_method("crosskd", "retinanet")
    return DetectionDistiller(golden["models"]["student"], golden["models"]["teacher"], config)


# ---------------------------------------------------------------------------------------------------------------------
# Student from pixels: features, anchors, assignment, targets
# ---------------------------------------------------------------------------------------------------------------------


def test_backbone_features(golden):
    # golden backbone/0 is the stride-4 C2, which the detector does not use; ours are C3-C5.
    assert len(golden["backbone_features"]) == 3
    for index, feature in enumerate(golden["backbone_features"], start=1):
        expected = golden["student_backbone_outputs"][f"backbone/{index}"]
        torch.testing.assert_close(feature, expected, **FEATURE_TOLERANCE)


def test_fpn_features(golden):
    """P3-P5 from the laterals; P6 from C5 (MMDetection's `add_extra_convs='on_input'`), P7 from P6."""
    neck = golden["models"]["student"].neck
    assert neck.fpn_convs[3].in_channels == 512 and neck.fpn_convs[4].in_channels == 32
    feature_maps = golden["outputs"]["student"].feature_maps
    assert len(feature_maps) == NUM_LEVELS
    for level, feature in enumerate(feature_maps):
        torch.testing.assert_close(feature, golden["saved"]["student"][f"neck/{level}"], **FEATURE_TOLERANCE)


def test_priors_and_valid_flags(golden):
    outputs, targets = golden["outputs"]["student"], golden["targets"]
    assert golden["models"]["student"].priors_per_location == ANCHORS_PER_LOCATION
    sizes = level_sizes(outputs.feature_maps, len(outputs.priors))
    assert sizes == [feature.shape[-2] * feature.shape[-1] * ANCHORS_PER_LOCATION for feature in outputs.feature_maps]
    priors = outputs.priors.split(sizes)
    valid = outputs.valid_mask.split(sizes, dim=1)
    for level in range(NUM_LEVELS):
        torch.testing.assert_close(priors[level], targets[f"priors/{level}"], atol=0, rtol=0)
        for image in range(2):
            assert torch.equal(valid[level][image], targets[f"valid_flags/img{image}/{level}"]), (level, image)
    for image in range(2):
        for scenario in SCENARIOS:  # allowed_border=-1: the assigner's inside flags are the valid flags
            assert torch.equal(outputs.valid_mask[image], targets[f"assign/{scenario}/img{image}/inside_flags"])
    assert not outputs.valid_mask[1].all(), "image 1 is smaller than the batch: some of its anchors are invalid"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_max_iou_assignment(golden, scenario):
    model, outputs, targets = golden["models"]["student"], golden["outputs"]["student"], golden["targets"]
    config = model.config
    gt = model.prepare_ground_truth(ground_truth(targets, scenario), outputs.image_sizes)
    assigned, positive, negative = max_iou_assign(
        outputs.priors,
        outputs.valid_mask,
        gt,
        config.pos_iou_threshold,
        config.neg_iou_threshold,
        config.min_pos_iou,
    )
    assert not (positive & negative).any() and not ((positive | negative) & ~outputs.valid_mask).any()
    for image in range(2):
        inside = outputs.valid_mask[image]  # MMDetection's assigner only sees the inside (valid) anchors
        prefix = f"assign/{scenario}/img{image}"
        ours_positive, ours_assigned = positive[image, inside], assigned[image, inside]
        gt_inds = torch.where(ours_positive, ours_assigned + 1, torch.where(negative[image, inside], 0, -1))
        torch.testing.assert_close(gt_inds, targets[f"{prefix}/assigned_gt_inds"], atol=0, rtol=0)
        labels = torch.where(ours_positive, gt.classes[image, ours_assigned], -1)
        torch.testing.assert_close(labels, targets[f"{prefix}/labels"], atol=0, rtol=0)
        real_boxes = gt.boxes[image, gt.mask[image]]
        max_overlaps = torch.zeros(int(inside.sum()))
        if len(real_boxes):
            max_overlaps = box_iou(outputs.priors[inside, None, :], real_boxes[None]).amax(-1)
        torch.testing.assert_close(max_overlaps, targets[f"{prefix}/max_overlaps"], atol=0, rtol=0)
        assert ours_positive.sum().item() == golden["losses"][f"{prefix}/num_pos"]
        assert (gt_inds == -1).sum().item() == golden["losses"][f"{prefix}/num_ignored"]
    num_positive = golden["losses"][f"targets/{scenario}/num_pos"]
    assert positive.sum().item() == num_positive
    if scenario != "all_empty":
        assert num_positive > 0 and (~positive & ~negative & outputs.valid_mask).any(), "some anchors are ignored"


def test_float32_tie_of_the_tiny_border_box(golden):
    """Gt 4 of image 0 (`main`) lies inside four wide anchors (ratio 0.5) whose IoUs with it are mathematically equal
    (its area over theirs); in MMDetection's float32 order of operations two of them give its best IoU, so only those
    two are its positives."""
    model, outputs, targets = golden["models"]["student"], golden["outputs"]["student"], golden["targets"]
    gt = model.prepare_ground_truth(ground_truth(targets, "main"), outputs.image_sizes)
    assigned, positive, _ = max_iou_assign(outputs.priors, outputs.valid_mask, gt)
    box, priors = gt.boxes[0, 4], outputs.priors
    overlaps = box_iou(priors, box).masked_fill(~outputs.valid_mask[0], 0)
    best = overlaps == overlaps.max()
    contains = (priors[:, :2] <= box[:2]).all(-1) & (priors[:, 2:] >= box[2:]).all(-1)
    wide = priors[:, 2] - priors[:, 0] > priors[:, 3] - priors[:, 1]
    tied = torch.isclose(overlaps, overlaps.max(), rtol=1e-6, atol=0) & contains & wide
    assert tied.sum() == 4 and len(overlaps[tied].unique()) == 2
    assert best.sum() == 2 and (best <= tied).all()
    assigned_to_box = positive[0] & (assigned[0] == 4)
    assert torch.equal(assigned_to_box, best)
    expected = targets["assign/main/img0/assigned_gt_inds"] == 5
    assert torch.equal(assigned_to_box[outputs.valid_mask[0]], expected)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_targets(golden, scenario):
    model, outputs, expected = golden["models"]["student"], golden["outputs"]["student"], golden["targets"]
    gt = model.prepare_ground_truth(ground_truth(expected, scenario), outputs.image_sizes)
    targets = model.loss_function.targets(outputs, gt)
    sizes = level_sizes(outputs.feature_maps, len(outputs.priors))
    prefix = f"targets/{scenario}"
    for level, (labels, weights, deltas, positive) in enumerate(
        zip(
            targets.labels.split(sizes, dim=1),
            targets.label_weights.split(sizes, dim=1),
            targets.box_targets.split(sizes, dim=1),
            targets.positive.split(sizes, dim=1),
        )
    ):
        torch.testing.assert_close(labels, expected[f"{prefix}/labels/{level}"], atol=0, rtol=0)
        torch.testing.assert_close(weights, expected[f"{prefix}/label_weights/{level}"], atol=0, rtol=0)
        bbox_weights = positive[..., None].expand(-1, -1, 4).float()
        torch.testing.assert_close(bbox_weights, expected[f"{prefix}/bbox_weights/{level}"], atol=0, rtol=0)
        # encoded deltas for the positives, 0 elsewhere (as MMDetection writes them)
        torch.testing.assert_close(deltas, expected[f"{prefix}/bbox_targets/{level}"])
    torch.testing.assert_close(targets.avg_factor, expected[f"{prefix}/avg_factor"], atol=0, rtol=0)
    assert targets.avg_factor.item() == golden["losses"][f"{prefix}/avg_factor"]
    assert targets.kd_avg_factor is targets.avg_factor
    assert targets.positive.sum().item() == golden["losses"][f"{prefix}/num_pos"]


# ---------------------------------------------------------------------------------------------------------------------
# Student and teacher: head outputs, losses, detections
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_head_outputs(golden, name):
    outputs, saved = golden["outputs"][name], golden["saved"][name]
    cls_scores = per_level_maps(outputs.logits, outputs.feature_maps)  # channel = anchor * 3 + class
    bbox_preds = per_level_maps(outputs.bbox_regression, outputs.feature_maps)  # channel = anchor * 4 + coordinate
    for level in range(NUM_LEVELS):
        torch.testing.assert_close(cls_scores[level], saved[f"cls_scores/{level}"], **FEATURE_TOLERANCE)
        torch.testing.assert_close(bbox_preds[level], saved[f"bbox_preds/{level}"], **FEATURE_TOLERANCE)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("name", ["student", "teacher"])
def test_losses_per_level(golden, name, scenario):
    model, outputs = golden["models"][name], golden["outputs"][name]
    gt = model.prepare_ground_truth(ground_truth(golden["targets"], scenario), outputs.image_sizes)
    with torch.no_grad():
        targets = model.loss_function.targets(outputs, gt)
        terms = model.loss_function.loss_maps(outputs, targets)
    for loss_name in LOSS_NAMES:
        actual = per_level_sums(terms[loss_name], outputs.feature_maps)
        expected = torch.stack(
            [golden["saved"][name][f"losses/{scenario}/{loss_name}/{level}"] for level in range(NUM_LEVELS)]
        )
        as_numbers = [golden["losses"][f"{name}/retinanet/{scenario}/{loss_name}/{level}"] for level in range(5)]
        torch.testing.assert_close(actual, expected, **LOSS_TOLERANCE, msg=f"{name} {scenario} {loss_name}")
        torch.testing.assert_close(actual, torch.tensor(as_numbers), **LOSS_TOLERANCE)
    if scenario == "all_empty":  # no positives: only the classification loss, over every valid anchor
        assert terms["loss_bbox"].abs().sum() == 0 and terms["loss_cls"].sum() > 0
        assert torch.equal(targets.label_weights, outputs.valid_mask.float())


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
        name: sum(golden["losses"][f"student/retinanet/{scenario}/{name}/{level}"] for level in range(NUM_LEVELS))
        for name in LOSS_NAMES
    }
    assert set(outputs.loss_dict) == set(LOSS_NAMES)
    for name in LOSS_NAMES:
        torch.testing.assert_close(outputs.loss_dict[name], torch.tensor(expected[name]), **LOSS_TOLERANCE)
    torch.testing.assert_close(outputs.loss, torch.tensor(sum(expected.values())), **LOSS_TOLERANCE)


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_detections(golden, name):
    """The image processor's post-processing (MMDetection's test settings: score threshold 0.05, NMS IoU 0.5, 100
    per image) in the input frame."""
    outputs, saved = golden["outputs"][name], golden["saved"][name]
    processor = RetinaNetImageProcessor()
    assert processor.nms_iou_threshold == 0.5
    detections = processor.post_process_object_detection(outputs, threshold=0.05)
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
    results = RetinaNetImageProcessor().post_process_object_detection(
        outputs, threshold=0.05, target_sizes=original_sizes
    )
    assert_detections_match(results, saved, "det_rescaled")


# ---------------------------------------------------------------------------------------------------------------------
# CrossKD (official CrossKDRetinaNet.loss): tower holds, cross-head, KD losses
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_crosskd_tower_holds(golden, name):
    """The tower states after 3 convs (conv with bias, ReLU: the official code's holds, activated in place)."""
    crosskd = golden["crosskd"]
    for level in range(NUM_LEVELS):
        cls_state, reg_state = golden["states"][name][level]
        torch.testing.assert_close(cls_state, crosskd[f"{name}_cls_hold/{level}"], **FEATURE_TOLERANCE)
        torch.testing.assert_close(reg_state, crosskd[f"{name}_reg_hold/{level}"], **FEATURE_TOLERANCE)


def test_crosskd_cross_head_outputs(golden):
    """The student's holds aligned to the teacher's statistics, then the teacher's conv 4, `retina_cls`,
    `retina_reg`."""
    crosskd = golden["crosskd"]
    kd = crosskd_distiller(golden)
    assert kd.config.cross_head_index == DEPTH and kd.config.loc_kd == "iou"
    with torch.no_grad():
        cross = kd.cross_head_outputs(
            golden["states"]["student"], golden["states"]["teacher"], golden["outputs"]["student"]
        )
    expected_logits = flatten_levels([crosskd[f"reused_cls_scores/{level}"] for level in range(NUM_LEVELS)], 3)
    expected_deltas = flatten_levels([crosskd[f"reused_bbox_preds/{level}"] for level in range(NUM_LEVELS)], 4)
    torch.testing.assert_close(cross.logits, expected_logits, **FEATURE_TOLERANCE)
    torch.testing.assert_close(cross.bbox_regression, expected_deltas, **FEATURE_TOLERANCE)
    torch.testing.assert_close(cross.priors, golden["outputs"]["student"].priors, atol=0, rtol=0)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_crosskd_losses_per_level(golden, scenario):
    """The student's own losses and the KD losses: `loss_cls_kd` over every anchor weighted by its label weight,
    `loss_loc_kd` the GIoU of the decoded cross-head and teacher boxes weighted by the teacher's best score where the
    label weight is not 0; both divided by the classification loss's `A`."""
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
        actual = per_level_sums(losses[ours], student.feature_maps)
        expected = torch.stack([golden["crosskd"][f"losses/{scenario}/{theirs}/{level}"] for level in range(5)])
        as_numbers = [golden["losses"][f"crosskd/{scenario}/{theirs}/{level}"] for level in range(NUM_LEVELS)]
        torch.testing.assert_close(actual, expected, **LOSS_TOLERANCE, msg=f"crosskd {scenario} {ours}")
        torch.testing.assert_close(actual, torch.tensor(as_numbers), **LOSS_TOLERANCE)
    # ignored and invalid anchors take no part in the KD losses
    outside = targets.label_weights == 0
    assert (
        outside.any() and (losses["loss_cls_kd"][outside] == 0).all() and (losses["loss_loc_kd"][outside] == 0).all()
    )


# ---------------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------------


def test_golden_student_weights_are_loaded_from_the_files(golden_dir):
    """The family's file holds the FPN and the head only; merged with the GFL student's backbone, the converted
    student holds exactly the files' tensors (a guard against a silently skipped load)."""
    family_weights = load_file(golden_dir / "retinanet" / "student_r18.safetensors")
    assert not any(key.startswith("backbone.") for key in family_weights)
    model = RetinaNetForObjectDetection(golden_config())
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): \['backbone\."):
        load_converted_weights(model, family_weights)
    weights = student_weights(golden_dir)
    load_converted_weights(model, weights)
    torch.testing.assert_close(model.head.retina_cls.weight, weights["bbox_head.retina_cls.weight"], atol=0, rtol=0)
    torch.testing.assert_close(model.head.cls_convs[0].conv.bias, weights["bbox_head.cls_convs.0.conv.bias"])
    torch.testing.assert_close(model.neck.fpn_convs[3].weight, weights["neck.fpn_convs.3.conv.weight"], atol=0, rtol=0)
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, weights["backbone.layer4.1.bn2.running_var"])
