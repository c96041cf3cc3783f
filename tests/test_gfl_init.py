"""Fresh GFL detectors get MMDetection's initialisation; the timm backbone keeps timm's."""

import math

import timm
import torch

from hf_kd import GFLConfig, GFLForObjectDetection


def test_fresh_model_has_mmdetection_init():
    torch.manual_seed(0)
    model = GFLForObjectDetection(GFLConfig(backbone="resnet18", fpn_channels=64, head_channels=64, num_labels=5))
    prior_bias = -math.log(0.99 / 0.01)
    torch.testing.assert_close(model.head.gfl_cls.bias, torch.full((5,), prior_bias))
    assert abs(model.head.cls_convs[0].conv.weight.std().item() - 0.01) < 1e-3
    assert abs(model.head.gfl_reg.weight.std().item() - 0.01) < 1e-3
    assert torch.all(model.head.gfl_reg.bias == 0) and torch.all(model.neck.fpn_convs[0].bias == 0)
    assert torch.all(model.head.reg_convs[1].norm.weight == 1) and torch.all(model.head.scales[3].scale == 1)
    fan_in, fan_out = 64 * 9, 64 * 9
    xavier_std = math.sqrt(2.0 / (fan_in + fan_out))
    assert abs(model.neck.fpn_convs[0].weight.std().item() - xavier_std) < 0.1 * xavier_std
    timm_std = timm.create_model("resnet18").conv1.weight.std().item()
    assert abs(model.backbone.conv1.weight.std().item() - timm_std) < 0.1 * timm_std


def test_fresh_model_starts_with_small_classification_loss():
    model = GFLForObjectDetection(GFLConfig(backbone="resnet18", fpn_channels=64, head_channels=64, num_labels=5))
    labels = [{"boxes": torch.tensor([[10.0, 10.0, 100.0, 120.0]]), "class_labels": torch.tensor([1])}]
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 256, 320), labels=labels)
    assert outputs.loss_dict["loss_cls"] < 1.0  # a head at prior probability 0.01 is almost silent
