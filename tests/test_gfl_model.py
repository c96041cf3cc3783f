"""GFLForObjectDetection as a transformers model: save/load (also as remote code), pipeline, training, bad input,
backbone freezing and pretrained weights, the image processor and the MMDetection converter."""

import math

import numpy as np
import pytest
import timm
import torch
from model_utils import TINY_LABELS, random_batch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForObjectDetection

from hf_kd import GFLConfig, GFLForObjectDetection, GFLImageProcessor
from hf_kd.convert.mmdet import load_converted_weights
from hf_kd.models.detection.image_processing_dense import get_resize_output_size


def tiny_config(**kwargs) -> GFLConfig:
    defaults = {"backbone": "resnet18", "fpn_channels": 32, "head_channels": 32, "id2label": TINY_LABELS}
    return GFLConfig(**(defaults | kwargs))


@pytest.fixture(scope="module")
def tiny_model() -> GFLForObjectDetection:
    """A small random GFL in eval mode, with non-trivial BatchNorm statistics and detections above the threshold."""
    torch.manual_seed(0)
    model = GFLForObjectDetection(tiny_config())
    with torch.no_grad():
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(7)
        model.head.gfl_cls.bias.zero_()  # scores around 0.5, so that eval mode gives detections to compare
    return model.eval()


def detections(outputs) -> list[dict[str, torch.Tensor]]:
    return GFLImageProcessor().post_process_object_detection(outputs, threshold=0.05)


# ---------------------------------------------------------------------------------------------------------------------
# (a) config round trip (save/load, remote code, pipeline and overfitting of every family: tests/test_families.py)
# ---------------------------------------------------------------------------------------------------------------------


def test_two_default_labels_survive_save_pretrained(tmp_path):
    """transformers leaves `{0: "LABEL_0", 1: "LABEL_1"}` out of config.json as its own default; a two-class GFL must
    not come back with GFLConfig's default 80 COCO classes."""
    GFLForObjectDetection(tiny_config(id2label=None, num_labels=2)).save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).num_labels == 2
    assert AutoModelForObjectDetection.from_pretrained(tmp_path).head.gfl_cls.out_channels == 2


# ---------------------------------------------------------------------------------------------------------------------
# (e) bad input: a ValueError that names the problem
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("boxes", "class_labels", "message"),
    [
        ([[50.0, 40.0, 10.0, 60.0]], [0], "negative width or height"),
        ([[200.0, 10.0, 260.0, 50.0]], [1], "entirely outside the 128x160 image"),
        ([[-90.0, -90.0, -10.0, -20.0]], [1], "entirely outside"),
        ([[10.0, 10.0, 50.0, 50.0]], [3], r"class_labels must be in \[0, 2\]"),
        ([[10.0, 10.0, 50.0, 50.0]], [-1], r"class_labels must be in \[0, 2\]"),
        ([[10.0, 10.0, float("nan"), 50.0]], [0], "NaN"),
    ],
)
def test_bad_labels(tiny_model, boxes, class_labels, message):
    labels = [
        {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "class_labels": torch.tensor([0])},
        {"boxes": torch.tensor(boxes), "class_labels": torch.tensor(class_labels), "image_id": 17},
    ]
    batch = random_batch()
    batch["pixel_mask"][1] = 1  # both images 128x160
    with pytest.raises(ValueError, match=f"image 17 \\(batch index 1\\).*{message}"):
        tiny_model(**batch, labels=labels)


def test_wrong_channel_count(tiny_model):
    with pytest.raises(
        ValueError, match=r"pixel_values must have shape \(batch, 3, height, width\), got \(1, 4, 64, 64\)"
    ):
        tiny_model(torch.zeros(1, 4, 64, 64))


@pytest.mark.parametrize(
    ("backbone", "message"),
    [
        ("resnet_does_not_exist", "Unknown timm backbone 'resnet_does_not_exist'"),
        ("vit_tiny_patch16_224", r"features at strides \[16, 16, 16\]; dense detectors need strides 8, 16 and 32"),
    ],
)
def test_unusable_backbone(backbone, message):
    with pytest.raises(ValueError, match=message):
        GFLForObjectDetection(tiny_config(backbone=backbone))


@pytest.mark.parametrize(
    ("config_kwargs", "message"),
    [
        ({"num_labels": 5}, r"head\.gfl_cls\.weight: checkpoint \(3, 64, 3, 3\) vs model \(5, 64, 3, 3\)"),
        ({"num_labels": 3, "fpn_channels": 128}, r"neck\.lateral_convs\.0\.weight: checkpoint \(64, 128, 1, 1\)"),
        ({"num_labels": 3, "stacked_convs": 2}, r"unexpected keys \(12\): \['head\.cls_convs\.2\.conv\.weight'"),
    ],
)
def test_checkpoint_head_does_not_match_config(golden_dir, config_kwargs, message):
    config = GFLConfig(**({"backbone": "resnet18", "fpn_channels": 64, "head_channels": 64} | config_kwargs))
    with pytest.raises(ValueError, match=message):
        load_converted_weights(GFLForObjectDetection(config), load_file(golden_dir / "student_r18.safetensors"))


# ---------------------------------------------------------------------------------------------------------------------
# (f) frozen backbone stages and BatchNorm
# ---------------------------------------------------------------------------------------------------------------------


def frozen_parameter_prefixes(model: GFLForObjectDetection) -> set[str]:
    return {name.split(".")[1] for name, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize(
    ("frozen_stages", "expected"),
    [(-1, set()), (0, {"conv1", "bn1"}), (1, {"conv1", "bn1", "layer1"}), (2, {"conv1", "bn1", "layer1", "layer2"})],
)
def test_frozen_stages(frozen_stages, expected):
    model = GFLForObjectDetection(tiny_config(backbone_frozen_stages=frozen_stages))
    assert frozen_parameter_prefixes(model) == expected
    assert all(p.requires_grad for name, p in model.named_parameters() if not name.startswith("backbone."))


def test_frozen_batch_norm_stays_in_eval_mode_and_keeps_statistics():
    model = GFLForObjectDetection(tiny_config()).train()  # defaults: frozen_stages=1, freeze_backbone_norm=True
    norms = [module for module in model.backbone.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert norms and not any(norm.training for norm in norms)
    assert model.training and model.neck.training and model.head.training
    statistics = {name: buffer.clone() for name, buffer in model.backbone.named_buffers()}
    model(
        **random_batch(),
        labels=[{"boxes": torch.tensor([[8.0, 8.0, 60.0, 70.0]]), "class_labels": torch.tensor([1])}] * 2,
    ).loss.backward()
    for name, buffer in model.backbone.named_buffers():
        assert torch.equal(buffer, statistics[name]), name
    assert model.backbone.conv1.weight.grad is None and model.backbone.layer2[0].conv1.weight.grad is not None


def test_unfrozen_batch_norm_trains_except_in_frozen_stages():
    model = GFLForObjectDetection(tiny_config(freeze_backbone_norm=False)).train()
    assert not model.backbone.bn1.training and not model.backbone.layer1[0].bn1.training  # frozen stage 1
    assert model.backbone.layer2[0].bn1.training and model.backbone.layer4[1].bn2.training
    model.eval()
    assert not model.backbone.layer2[0].bn1.training


def test_one_small_image_trains_with_one_channel_per_norm_group():
    """A 96x128 image has a 1x1 P7 map; with 32 groups of 32 channels each head GroupNorm group then holds one value.
    Alone in a batch it trains (torch's GroupNorm refuses that case in training), with the head states and
    classification loss it has beside a copy of itself: GroupNorm statistics are per image."""
    torch.manual_seed(0)
    model = GFLForObjectDetection(tiny_config(norm_groups=32)).train()
    image = torch.randn(1, 3, 96, 128)
    labels = {"boxes": torch.tensor([[8.0, 16.0, 60.0, 80.0]]), "class_labels": torch.tensor([1])}

    alone = model(image, labels=[labels])
    alone.loss.backward()
    assert alone.feature_maps[-1].shape[-2:] == (1, 1)
    assert model.head.cls_convs[3].norm.weight.grad.abs().sum() > 0
    with torch.no_grad():
        pair = model(image.expand(2, -1, -1, -1), labels=[labels, labels])
        for feature, paired_feature in zip(alone.feature_maps, pair.feature_maps):
            states = model.head.forward_towers(feature, 4)
            for state, paired_state in zip(states, model.head.forward_towers(paired_feature, 4)):
                torch.testing.assert_close(state[0], paired_state[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alone.loss_dict["loss_cls"], pair.loss_dict["loss_cls"])


# ---------------------------------------------------------------------------------------------------------------------
# (g) image processor
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [((480, 640), (800, 1067)), ((640, 480), (1067, 800)), ((1000, 200), (1333, 267)), ((800, 1333), (800, 1333))],
)
def test_resize_output_size(size, expected):
    assert get_resize_output_size(*size, shortest_edge=800, longest_edge=1333) == expected


def test_image_processor_resize_pad_normalize_and_annotations():
    processor = GFLImageProcessor(size={"shortest_edge": 100, "longest_edge": 150})
    images = [
        Image.fromarray(np.full((480, 640, 3), (255, 128, 0), dtype=np.uint8)),  # -> 100x133
        Image.fromarray(np.zeros((300, 200, 3), dtype=np.uint8)),  # -> 150x100
    ]
    annotations = [
        {
            "image_id": 7,
            "annotations": [
                {"bbox": [10.0, 20.0, 30.0, 40.0], "category_id": 2, "iscrowd": 0, "area": 1200.0},
                {"bbox": [0.0, 0.0, 50.0, 50.0], "category_id": 1, "iscrowd": 1, "area": 2500.0},
            ],
        },
        {"image_id": 8, "annotations": []},
    ]
    batch = processor(images=images, annotations=annotations, return_tensors="pt")
    assert batch["pixel_values"].shape == (2, 3, 160, 160)  # batch max 150x133, padded to multiples of 32
    expected_mask = torch.zeros(2, 160, 160, dtype=batch["pixel_mask"].dtype)
    expected_mask[0, :100, :133] = 1
    expected_mask[1, :150, :100] = 1
    assert torch.equal(batch["pixel_mask"], expected_mask)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expected_pixel = (torch.tensor([255.0, 128.0, 0.0]) / 255 - mean) / std
    torch.testing.assert_close(batch["pixel_values"][0, :, 50, 60], expected_pixel)
    assert batch["pixel_values"][0, :, 100:].abs().sum() == 0 and batch["pixel_values"][0, :, :, 133:].abs().sum() == 0
    first, second = batch["labels"]
    # xywh of the 640x480 original -> xyxy in the 133x100 resized frame; the crowd box is dropped
    scale = torch.tensor([133 / 640, 100 / 480, 133 / 640, 100 / 480])
    torch.testing.assert_close(first["boxes"], torch.tensor([[10.0, 20.0, 40.0, 60.0]]) * scale)
    assert first["class_labels"].tolist() == [2] and first["image_id"].item() == 7
    assert first["orig_size"].tolist() == [480, 640] and first["size"].tolist() == [100, 133]
    assert second["boxes"].shape == (0, 4) and second["class_labels"].shape == (0,)


def test_post_process_scales_boxes_to_target_sizes(tiny_model):
    batch = random_batch()
    with torch.no_grad():
        outputs = tiny_model(**batch)
    in_input_frame = detections(outputs)
    threshold = in_input_frame[0]["scores"].median().item()
    processor = GFLImageProcessor()
    results = processor.post_process_object_detection(outputs, threshold, target_sizes=[(256, 320), (48, 64)])
    # image sizes come from pixel_mask: 128x160 and 96x128; targets are 2x and 0.5x those
    for result, image_detections, factor in zip(results, in_input_frame, (2.0, 0.5)):
        keep = image_detections["scores"] > threshold
        assert keep.any()
        torch.testing.assert_close(result["boxes"], image_detections["boxes"][keep] * factor)
        assert torch.equal(result["labels"], image_detections["labels"][keep])
        assert torch.equal(result["scores"], image_detections["scores"][keep])
    assert len(results[0]["scores"]) < len(in_input_frame[0]["scores"])
    with pytest.raises(ValueError, match="Got 1 target sizes for 2 images"):
        processor.post_process_object_detection(outputs, target_sizes=[(256, 320)])


# ---------------------------------------------------------------------------------------------------------------------
# (h) ImageNet-pretrained backbone from a local timm checkpoint
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_from_pretrained_backbone_local_file(tmp_path, suffix):
    torch.manual_seed(1)
    timm_model = timm.create_model("resnet18")
    with torch.no_grad():  # statistics that no initialization would produce
        for module in timm_model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    weights = timm_model.state_dict()
    path = tmp_path / f"resnet18{suffix}"
    save_file(weights, path) if suffix == ".safetensors" else torch.save(weights, path)

    model = GFLForObjectDetection.from_pretrained_backbone(tiny_config(), checkpoint_path=str(path))

    def assert_backbone_weights(model: GFLForObjectDetection) -> None:
        state = model.backbone.state_dict()
        assert set(state) == {key for key in weights if not key.startswith("fc.")}
        for key, value in state.items():
            torch.testing.assert_close(value, weights[key], atol=0, rtol=0, msg=key)

    assert_backbone_weights(model)
    model.post_init()  # the transformers initialization must not overwrite the loaded weights
    assert_backbone_weights(model)
    model.save_pretrained(tmp_path / "detector")
    assert_backbone_weights(GFLForObjectDetection.from_pretrained(tmp_path / "detector"))


def test_initialization_of_a_new_detector():
    """Fresh detectors get MMDetection's init: head convs N(0, 0.01), classification bias -log(99), Xavier FPN; the
    timm backbone keeps timm's own initialization."""
    torch.manual_seed(0)
    model = GFLForObjectDetection(tiny_config(fpn_channels=64, head_channels=64))
    torch.testing.assert_close(model.head.gfl_cls.bias, torch.full((3,), -math.log(99)))
    assert abs(model.head.cls_convs[0].conv.weight.std().item() - 0.01) < 1e-3
    assert abs(model.head.gfl_reg.weight.std().item() - 0.01) < 1e-3
    assert model.head.gfl_reg.bias.abs().max() == 0 and model.neck.fpn_convs[0].bias.abs().max() == 0
    fan_in, fan_out = 64 * 9, 64 * 9  # Xavier uniform: std = sqrt(2 / (fan_in + fan_out))
    assert abs(model.neck.fpn_convs[0].weight.std().item() - math.sqrt(2 / (fan_in + fan_out))) < 3e-3
    # timm's ResNet init: Kaiming normal, fan_out (transformers' default init would give std 0.01)
    assert abs(model.backbone.conv1.weight.std().item() - math.sqrt(2 / (64 * 7 * 7))) < 2e-3
