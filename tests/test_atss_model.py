"""ATSSForObjectDetection as a transformers model: the config and its round trip, save/load, training on real photos
(a small ATSS overfits a few coco128 photos on CPU) and a CrossKD training step with an ATSS teacher."""

import contextlib
import copy
import io
import json
import time

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hf_kd import DetectionDistiller, DistillationConfig
from hf_kd.models.detection.configuration_atss import ATSSConfig
from hf_kd.models.detection.image_processing_dense import ATSSImageProcessor
from hf_kd.models.detection.modeling_atss import ATSSForObjectDetection

TINY_LABELS = {0: "cat", 1: "dog", 2: "bird"}
# coco128 images with one large object each (category ids: 24 zebra, 18 dog, 5 airplane, 23 bear)
OVERFIT_IMAGE_IDS = (34, 42, 81, 502)
OVERFIT_STEPS = 40
LOSS_NAMES = ("loss_cls", "loss_bbox", "loss_centerness")


def tiny_config(**kwargs) -> ATSSConfig:
    defaults = {"backbone": "resnet18", "fpn_channels": 32, "head_channels": 32, "id2label": TINY_LABELS}
    return ATSSConfig(**(defaults | kwargs))


def random_batch(seed: int = 0) -> dict:
    """Two normalized images of different sizes padded to 128x160, their pixel mask and one box each."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, 128, 160, generator=generator)
    pixel_mask = torch.ones(2, 128, 160, dtype=torch.bool)
    pixel_mask[1, 96:] = False
    pixel_mask[1, :, 128:] = False
    pixel_values[1] *= pixel_mask[1]
    labels = [
        {
            "boxes": torch.tensor([[10.0, 12.0, 90.0, 100.0], [100.0, 20.0, 150.0, 60.0]]),
            "class_labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.tensor([[20.0, 30.0, 80.0, 90.0]]), "class_labels": torch.tensor([0])},
    ]
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": labels}


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


def test_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = ATSSForObjectDetection(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    loaded = ATSSForObjectDetection.from_pretrained(tmp_path).eval()
    batch = random_batch()
    with torch.no_grad():
        expected, actual = model(batch["pixel_values"]), loaded(batch["pixel_values"])
    for name in ("logits", "bbox_regression", "centerness_logits", "pred_boxes"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), atol=0, rtol=0)


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


# ---------------------------------------------------------------------------------------------------------------------
# Training: a small ATSS overfits a few coco128 photos on CPU
# ---------------------------------------------------------------------------------------------------------------------


def coco_map50(ground_truth: list[dict], detections: list[dict], num_classes: int) -> float:
    """pycocotools mAP@0.5 of `detections` (`image_id`, `category_id`, xywh `bbox`, `score`)."""
    dataset = {
        "images": [{"id": image_id} for image_id in sorted({a["image_id"] for a in ground_truth})],
        "categories": [{"id": index} for index in range(num_classes)],
        "annotations": [dict(annotation, id=index + 1) for index, annotation in enumerate(ground_truth)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[1])


@pytest.fixture(scope="module")
def overfit(coco128_dir):
    """Trains a resnet18 ATSS (random init, FPN/head width 64) for 40 AdamW steps (lr 1e-3) on 4 coco128 photos resized
    to fit 256x192, then detects on them (boxes in the original photos' pixels)."""
    coco = json.loads((coco128_dir / "annotations.json").read_text())
    images_by_id = {image["id"]: image for image in coco["images"]}
    annotations = [a for a in coco["annotations"] if a["image_id"] in OVERFIT_IMAGE_IDS and not a["iscrowd"]]
    category_ids = sorted({a["category_id"] for a in annotations})
    names = {c["id"]: c["name"] for c in coco["categories"]}
    to_label = {category_id: index for index, category_id in enumerate(category_ids)}
    annotations = [dict(a, category_id=to_label[a["category_id"]]) for a in annotations]
    images = [
        Image.open(coco128_dir / "images" / images_by_id[image_id]["file_name"]).convert("RGB")
        for image_id in OVERFIT_IMAGE_IDS
    ]
    processor = ATSSImageProcessor(size={"shortest_edge": 192, "longest_edge": 256})
    batch = processor(
        images=images,
        annotations=[
            {"image_id": image_id, "annotations": [a for a in annotations if a["image_id"] == image_id]}
            for image_id in OVERFIT_IMAGE_IDS
        ],
        return_tensors="pt",
    )
    config = ATSSConfig(
        backbone="resnet18",
        fpn_channels=64,
        head_channels=64,
        id2label={index: names[category_id] for index, category_id in enumerate(category_ids)},
        backbone_frozen_stages=-1,  # no pretrained weights offline: train everything, BatchNorm included
        freeze_backbone_norm=False,
    )
    torch.manual_seed(0)
    model = ATSSForObjectDetection(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    losses, start = [], time.perf_counter()
    for _ in range(OVERFIT_STEPS):
        outputs = model(batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"])
        optimizer.zero_grad()
        outputs.loss.backward()
        optimizer.step()
        losses.append([outputs.loss_dict[name].item() for name in LOSS_NAMES])
    train_seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        outputs = model(batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    original_sizes = [(image.height, image.width) for image in images]
    results = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=original_sizes)
    return {
        "model": model,
        "annotations": annotations,
        "results": results,
        "losses": torch.tensor(losses),
        "train_seconds": train_seconds,
    }


def test_training_overfits_real_photos(overfit):
    losses = overfit["losses"]  # (steps, 3): loss_cls, loss_bbox, loss_centerness
    assert torch.isfinite(losses).all()
    windows = losses.view(-1, 10, len(LOSS_NAMES)).mean(1)  # mean of each 10 steps
    total = windows.sum(-1)
    assert (total[1:] < total[:-1]).all(), windows
    # focal and box losses fall towards 0; the centre-ness BCE towards the entropy of its soft targets (~0.57 here)
    assert (windows[-1, :2] < 0.25 * windows[0, :2]).all(), windows
    assert windows[-1, 2] < windows[0, 2], windows
    detections = [
        {"image_id": image_id, "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
        for image_id, result in zip(OVERFIT_IMAGE_IDS, overfit["results"])
        for (x1, y1, x2, y2), score, label in zip(
            result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist()
        )
    ]
    num_classes = overfit["model"].config.num_labels
    map50 = coco_map50(overfit["annotations"], detections, num_classes)
    assert map50 > 0.9, f"mAP@0.5 {map50:.3f} after {OVERFIT_STEPS} steps ({overfit['train_seconds']:.0f} s)"
