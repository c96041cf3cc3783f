"""Every detector family as a transformers model and a distillation student: Auto classes, remote code in a fresh
process without hf_kd, the object-detection pipeline, overfitting real photos on CPU, CrossKD through
`run_distill.py` (a teacher of another family is an error), and a channels-last (Swin) backbone."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from model_utils import TINY_LABELS, random_batch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoImageProcessor, AutoModelForObjectDetection, pipeline

from hf_kd.cli import train as run_distill  # what examples/run_distill.py and hf-kd-train run
from hf_kd.data.synthetic import CLASS_NAMES, generate_synthetic_coco
from hf_kd.distill import DetectionDistiller
from hf_kd.models.detection import FAMILIES
from hf_kd.models.detection.box_ops import box_iou

REPO_DIR = Path(__file__).resolve().parents[1]

# coco128 images with one large object each (category ids: 24 zebra, 18 dog, 5 airplane, 23 bear)
OVERFIT_IMAGE_IDS = (34, 42, 81, 502)
OVERFIT_STEPS = 40
# The final 10-step mean loss of the overfit run is below this fraction of the first; FCOS's and ATSS's centre-ness
# BCE keeps the entropy of its soft targets (~0.5), so their totals fall less.
OVERFIT_LOSS_FALL = {"gfl": 0.25, "retinanet": 0.25, "fcos": 0.5, "atss": 0.5}
# RetinaNet's head has no norm: with MMDetection's init (std 0.01, made for a pretrained backbone and SGD) its output is
# ~1e-3 of its input, Adam's equal-size steps grow those weights fast and the classification loss spikes from scratch.
OVERFIT_CONFIG = {"retinanet": {"initializer_range": 0.05}}
KD_LOSSES = {"gfl": set(), "retinanet": set(), "fcos": set(), "atss": {"loss_center_kd"}}


def tiny_detector(family: str, seed: int = 0, width: int = 32, **config_kwargs):
    """A small random detector of `family` in eval mode whose scores are around 0.5 (classifier bias 0), so that
    post-processing has detections to compare."""
    config_class, model_class, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config_kwargs = {"backbone": "resnet18", "id2label": TINY_LABELS} | config_kwargs
    config = config_class(fpn_channels=width, head_channels=width, **config_kwargs)
    model = model_class(config)
    with torch.no_grad():
        model.head.classifier.bias.zero_()
    return model.eval()


def detections(processor, outputs) -> list[dict[str, torch.Tensor]]:
    return processor.post_process_object_detection(outputs, threshold=0.05)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory) -> tuple[str, object, Path]:
    """A tiny detector of each family and its image processor, saved with `save_pretrained`."""
    family = request.param
    model = tiny_detector(family)
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    FAMILIES[family][2](size={"shortest_edge": 128, "longest_edge": 160}).save_pretrained(path)
    return family, model, path


# ---------------------------------------------------------------------------------------------------------------------
# transformers: Auto classes, remote code, pipeline
# ---------------------------------------------------------------------------------------------------------------------


def test_auto_classes_round_trip(saved):
    family, expected_model, path = saved
    config_class, model_class, processor_class = FAMILIES[family]
    assert isinstance(AutoConfig.from_pretrained(path), config_class)
    model = AutoModelForObjectDetection.from_pretrained(path)
    assert type(model) is model_class and not model.training
    state, expected_state = model.state_dict(), expected_model.state_dict()
    assert state.keys() == expected_state.keys()
    for key, value in state.items():
        torch.testing.assert_close(value, expected_state[key], atol=0, rtol=0, msg=key)
    processor = AutoImageProcessor.from_pretrained(path)
    assert type(processor) is processor_class and processor.nms_iou_threshold == processor_class.nms_iou_threshold
    batch = random_batch()
    with torch.no_grad():
        outputs, expected = model(**batch), expected_model(**batch)
    for name in ("logits", "bbox_regression", "pred_boxes", "centerness_logits"):
        torch.testing.assert_close(getattr(outputs, name), getattr(expected, name), atol=0, rtol=0, msg=name)
    for image, expected_image in zip(detections(processor, outputs), detections(processor, expected), strict=True):
        assert len(expected_image["scores"]) > 0
        for key, value in image.items():
            torch.testing.assert_close(value, expected_image[key], atol=0, rtol=0, msg=key)


REMOTE_CODE_SCRIPT = """
import sys

sys.modules["hf_kd"] = None  # hf_kd is installed in this environment: make it unimportable here
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModelForObjectDetection, pipeline

model_dir, inputs_path, outputs_path = sys.argv[1:]
try:
    import hf_kd  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("hf_kd must not be importable")
model = AutoModelForObjectDetection.from_pretrained(model_dir, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=True)
for obj in (model, processor):
    assert type(obj).__module__.startswith("transformers_modules."), type(obj).__module__
with torch.no_grad():
    outputs = model(**load_file(inputs_path))
tensors = {name: getattr(outputs, name) for name in ("logits", "bbox_regression", "pred_boxes")}
for image, detections in enumerate(processor.post_process_object_detection(outputs, threshold=0.05)):
    tensors.update({f"{key}/{image}": value for key, value in detections.items()})
save_file({key: value.contiguous() for key, value in tensors.items()}, outputs_path)
results = pipeline("object-detection", model=model_dir, trust_remote_code=True)(Image.new("RGB", (90, 70)), threshold=0)
assert results and {"score", "label", "box"} <= set(results[0]), results
"""


def test_remote_code_in_fresh_process(saved, tmp_path):
    """The saved folder runs where hf_kd is not installed: the family's modeling file and the shared files it imports
    are copied flat beside it (transformers' object-detection pipeline logs that it does not know the model type;
    with `import hf_kd` it does)."""
    family, model, path = saved
    for file in path.glob("*.py"):  # copied flat: relative imports of sibling files only, no hf_kd
        source = file.read_text()
        assert not re.search(r"^\s*(from|import)\s+hf_kd", source, re.MULTILINE), file.name
        for module in re.findall(r"^\s*from\s+\.(\w+)\s+import", source, re.MULTILINE):
            assert (path / f"{module}.py").is_file(), f"{file.name} imports .{module}"
    assert (path / f"modeling_{family}.py").is_file()
    batch = random_batch(seed=1)
    save_file(batch, tmp_path / "inputs.safetensors")
    (tmp_path / "remote.py").write_text(REMOTE_CODE_SCRIPT)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    command = [sys.executable, "-I", "remote.py", str(path), "inputs.safetensors", "outputs.safetensors"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    remote = load_file(tmp_path / "outputs.safetensors")
    with torch.no_grad():
        expected = model(**batch)
    for name in ("logits", "bbox_regression", "pred_boxes"):
        torch.testing.assert_close(remote[name], getattr(expected, name), atol=0, rtol=0, msg=name)
    processor = FAMILIES[family][2]()
    for image, image_detections in enumerate(detections(processor, expected)):
        for key, value in image_detections.items():
            torch.testing.assert_close(remote[f"{key}/{image}"], value, atol=0, rtol=0, msg=f"{key}/{image}")


def test_pipeline_with_hf_kd_logs_no_error(saved, coco128_dir, caplog):
    _, _, path = saved
    with caplog.at_level("ERROR", logger="transformers"):
        detector = pipeline("object-detection", model=str(path))
        results = detector(Image.open(next((coco128_dir / "images").glob("*.jpg"))), threshold=0.1)
    assert "not supported" not in caplog.text
    assert results and all(result["label"] in TINY_LABELS.values() for result in results)


# ---------------------------------------------------------------------------------------------------------------------
# Training: overfitting real photos
# ---------------------------------------------------------------------------------------------------------------------


def coco_map50(ground_truth: list[dict], detections: list[dict], num_classes: int) -> float:
    """pycocotools mAP@0.5 of `detections` (`image_id`, `category_id`, xywh `bbox`, `score`)."""
    dataset = {
        "images": [{"id": image_id} for image_id in sorted({a["image_id"] for a in ground_truth})],
        "categories": [{"id": index} for index in range(num_classes)],
        "annotations": [dict(annotation, id=index + 1) for index, annotation in enumerate(ground_truth)],
    }
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return float(evaluator.stats[1])


@pytest.fixture(scope="module")
def overfit_data(coco128_dir) -> dict:
    """4 coco128 photos with one large object each, their annotations (contiguous labels) and class names."""
    coco = json.loads((coco128_dir / "annotations.json").read_text())
    images_by_id = {image["id"]: image for image in coco["images"]}
    annotations = [a for a in coco["annotations"] if a["image_id"] in OVERFIT_IMAGE_IDS and not a["iscrowd"]]
    category_ids = sorted({a["category_id"] for a in annotations})
    names = {c["id"]: c["name"] for c in coco["categories"]}
    to_label = {category_id: index for index, category_id in enumerate(category_ids)}
    return {
        "images": [
            Image.open(coco128_dir / "images" / images_by_id[image_id]["file_name"]).convert("RGB")
            for image_id in OVERFIT_IMAGE_IDS
        ],
        "annotations": [dict(a, category_id=to_label[a["category_id"]]) for a in annotations],
        "id2label": {index: names[category_id] for index, category_id in enumerate(category_ids)},
    }


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_overfits_real_photos(overfit_data, family, tmp_path):
    """A ResNet-18 detector from random init (FPN/head 64 wide, everything trained, BatchNorm included) learns 4
    coco128 photos resized to fit 256x192 in 40 AdamW steps: the loss falls steadily and mAP@0.5 on them exceeds 0.9
    (boxes in the original photos' pixels), and the pipeline finds the object of one of them."""
    config_class, model_class, processor_class = FAMILIES[family]
    processor = processor_class(size={"shortest_edge": 192, "longest_edge": 256})
    annotations = overfit_data["annotations"]
    batch = processor(
        images=overfit_data["images"],
        annotations=[
            {"image_id": image_id, "annotations": [a for a in annotations if a["image_id"] == image_id]}
            for image_id in OVERFIT_IMAGE_IDS
        ],
        return_tensors="pt",
    )
    config = config_class(
        backbone="resnet18",
        fpn_channels=64,
        head_channels=64,
        id2label=overfit_data["id2label"],
        backbone_frozen_stages=-1,  # no pretrained weights offline: train everything, BatchNorm included
        freeze_backbone_norm=False,
        **OVERFIT_CONFIG.get(family, {}),
    )
    torch.manual_seed(0)
    model = model_class(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    losses, start = [], time.perf_counter()
    for _ in range(OVERFIT_STEPS):
        loss = model(batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        outputs = model(batch["pixel_values"], pixel_mask=batch["pixel_mask"])
    original_sizes = [(image.height, image.width) for image in overfit_data["images"]]
    results = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=original_sizes)

    losses = torch.tensor(losses)
    assert torch.isfinite(losses).all()
    windows = losses.view(-1, 10).mean(1)  # mean loss of each 10 steps: falls steadily
    assert (windows[1:] < windows[:-1]).all(), windows
    assert windows[-1] < OVERFIT_LOSS_FALL[family] * windows[0], windows
    found = [
        {"image_id": image_id, "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
        for image_id, result in zip(OVERFIT_IMAGE_IDS, results)
        for (x1, y1, x2, y2), score, label in zip(
            result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist()
        )
    ]
    map50 = coco_map50(annotations, found, config.num_labels)
    assert map50 > 0.9, f"{family}: mAP@0.5 {map50:.3f} after {OVERFIT_STEPS} steps ({seconds:.0f} s)"

    # the pipeline on one of the photos: its best detection is the photo's object, in the original image's pixels
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    image = overfit_data["images"][1]
    results = pipeline("object-detection", model=str(tmp_path))(image, threshold=0.3)
    assert results and all({"score", "label", "box"} == set(result) for result in results)
    for result in results:
        assert result["label"] in config.id2label.values() and 0.3 < result["score"] <= 1
        box = result["box"]
        assert 0 <= box["xmin"] < box["xmax"] <= image.width and 0 <= box["ymin"] < box["ymax"] <= image.height
    (annotation,) = [a for a in annotations if a["image_id"] == OVERFIT_IMAGE_IDS[1]]
    best = max(results, key=lambda result: result["score"])
    assert best["label"] == config.id2label[annotation["category_id"]]
    x, y, width, height = annotation["bbox"]
    box = torch.tensor([[best["box"][key] for key in ("xmin", "ymin", "xmax", "ymax")]], dtype=torch.float32)
    assert box_iou(box, torch.tensor([[x, y, x + width, y + height]])).item() > 0.5


# ---------------------------------------------------------------------------------------------------------------------
# run_distill.py for every family; a channels-last (Swin) teacher
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    generate_synthetic_coco(root, num_images=8, image_size=144, val_fraction=0.25)
    return root


def save_teacher(path: Path, family: str, **config_kwargs) -> Path:
    config_class, model_class, processor_class = FAMILIES[family]
    torch.manual_seed(1)
    config = config_class(fpn_channels=32, head_channels=32, id2label=dict(enumerate(CLASS_NAMES)), **config_kwargs)
    model_class(config).save_pretrained(path)
    processor_class(size={"shortest_edge": 128, "longest_edge": 160}).save_pretrained(path)
    return path


def distill_args(coco_dir: Path, output_dir: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        "--data_dir", str(coco_dir), "--output_dir", str(output_dir), "--teacher_model_name_or_path", str(teacher),
        "--kd_method", "crosskd", "--student_backbone", "resnet18", "--shortest_edge", "128", "--longest_edge", "160",
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
        "--seed", "0", "--logging_steps", "1", "--learning_rate", "1e-3", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "2", "--max_steps", "2", "--save_strategy", "no",
        "--eval_score_threshold", "0.001", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_crosskd_through_run_distill(coco_dir, tmp_path, family):
    """A new ResNet-18 student of the teacher's family, 2 CrossKD steps with the family's losses, evaluation, and a
    saved student of that family."""
    teacher = save_teacher(tmp_path / "teacher", family, backbone="resnet18")
    metrics = run_distill.run(distill_args(coco_dir, tmp_path / "out", teacher))
    logged = [entry for entry in json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]]
    train = [entry for entry in logged if "loss" in entry]
    assert [entry["step"] for entry in train] == [1, 2]
    assert {"loss_cls_kd", "loss_loc_kd"} | KD_LOSSES[family] <= set(train[-1])
    assert "eval_map" in metrics
    student = AutoModelForObjectDetection.from_pretrained(tmp_path / "out")
    assert type(student) is FAMILIES[family][1] and student.config.backbone == "resnet18"


def test_a_student_of_another_family_is_an_error_before_training(coco_dir, tmp_path):
    teacher = save_teacher(tmp_path / "teacher", "gfl", backbone="resnet18")
    other = next(family for family in FAMILIES if family != "gfl")
    args = distill_args(coco_dir, tmp_path / "out", teacher, "--student_architecture", other)
    with pytest.raises(ValueError, match=f"--student_architecture {other} differs from the teacher's family"):
        run_distill.run(args)
    student = tmp_path / "student"
    tiny_detector(other, id2label=dict(enumerate(CLASS_NAMES))).save_pretrained(student)
    args = distill_args(coco_dir, tmp_path / "out", teacher, "--model_name_or_path", str(student))
    with pytest.raises(ValueError, match=f"student is a '{other}' detector and the teacher a 'gfl' one"):
        run_distill.run(args)


SWIN = {"backbone": "swin_tiny_patch4_window7_224", "backbone_kwargs": {"strict_img_size": False}}


def test_channels_last_backbone_round_trip(tmp_path):
    """Swin's features come channels-last; its relative-position indices are buffers that state dicts leave out, and
    `from_pretrained` must rebuild them: the reloaded detector gives identical outputs."""
    model = tiny_detector("gfl", **SWIN)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForObjectDetection.from_pretrained(tmp_path)
    buffers = dict(model.named_buffers())
    for name, buffer in reloaded.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    batch = random_batch()
    with torch.no_grad():
        outputs, expected = reloaded(**batch), model(**batch)
    for name in ("logits", "bbox_regression", "pred_boxes"):
        torch.testing.assert_close(getattr(outputs, name), getattr(expected, name), atol=0, rtol=0, msg=name)


def test_heterogeneous_crosskd_swin_teacher_resnet_student(coco_dir, tmp_path):
    """The paper's heterogeneous pair: a Swin-T RetinaNet teacher distilled into a ResNet student of the same FPN and
    head widths, through run_distill.py."""
    family = "retinanet"
    teacher = save_teacher(tmp_path / "teacher", family, **SWIN)
    run_distill.run(distill_args(coco_dir, tmp_path / "out", teacher))
    train = [
        e for e in json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"] if "loss" in e
    ]
    assert [entry["step"] for entry in train] == [1, 2] and all(entry["loss_cls_kd"] > 0 for entry in train)
    student = AutoModelForObjectDetection.from_pretrained(tmp_path / "out")
    assert (student.config.model_type, student.config.backbone) == (family, "resnet18")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradient_checkpointing_gives_the_same_gradients(family):
    """`activation_checkpointing_enable` (the Trainer's --gradient_checkpointing) checkpoints the timm backbone and
    the head towers: the same loss and gradients, recomputed in the backward pass."""
    labels = [
        {"boxes": torch.tensor([[10.0, 12.0, 90.0, 100.0]]), "class_labels": torch.tensor([1])},
        {"boxes": torch.tensor([[20.0, 30.0, 80.0, 90.0]]), "class_labels": torch.tensor([0])},
    ]
    gradients = []
    for checkpointing in (False, True):
        model = tiny_detector(family, backbone_frozen_stages=-1).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.head.gradient_checkpointing and model.backbone.grad_checkpointing
        model(**random_batch(), labels=labels).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) == len(list(model.parameters()))
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, msg=name)


def test_gradient_checkpointing_through_run_distill(coco_dir, tmp_path):
    """`--gradient_checkpointing` reaches the student through the distiller, and CrossKD trains with it."""
    teacher = save_teacher(tmp_path / "teacher", "gfl", backbone="resnet18")
    enabled = []
    enable = DetectionDistiller.activation_checkpointing_enable

    def record(distiller, *args, **kwargs):
        enable(distiller, *args, **kwargs)
        enabled.append(distiller.student.head.gradient_checkpointing and distiller.student.backbone.grad_checkpointing)

    with mock.patch.object(DetectionDistiller, "activation_checkpointing_enable", record):
        run_distill.run(distill_args(coco_dir, tmp_path / "out", teacher, "--gradient_checkpointing"))
    assert enabled == [True]
    train = [
        e for e in json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"] if "loss" in e
    ]
    assert [entry["step"] for entry in train] == [1, 2] and all(math.isfinite(entry["loss"]) for entry in train)
