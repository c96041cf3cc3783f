"""MMDetection checkpoint conversion (`hf_kd.convert.mmdet`) for every family: the family, widths, classes and backbone
read from the checkpoint, outputs equal to MMDetection's on the golden inputs, the command line, and the checkpoints
it refuses (unknown keys, a backbone that is not a timm network, caffe-style ResNets)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import timm
import torch
from golden_utils import FEATURE_TOLERANCE
from huggingface_hub import HfApi
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForObjectDetection

from hf_kd import FCOSConfig, FCOSForObjectDetection, convert_mmdet_checkpoint
from hf_kd.convert import mmdet
from hf_kd.models.detection import FAMILIES

FAMILY_DIRS = {"gfl": ".", "retinanet": "retinanet", "fcos": "fcos", "atss": "atss"}
CLASSES = ("a", "b", "c")


def golden_student_state_dict(golden_dir: Path, family: str) -> dict[str, torch.Tensor]:
    """The golden student of a family in MMDetection's keys (the families share the GFL student's backbone)."""
    weights = load_file(golden_dir / FAMILY_DIRS[family] / "student_r18.safetensors")
    backbone = {
        k: v for k, v in load_file(golden_dir / "student_r18.safetensors").items() if k.startswith("backbone.")
    }
    return backbone | weights


def level0_logits(golden_dir: Path, family: str, model) -> tuple[torch.Tensor, torch.Tensor]:
    """Level-0 classification logits of `model` on the golden inputs (image 0), and MMDetection's."""
    pixel_values = load_file(golden_dir / "inputs.safetensors")["inputs"][:1]
    expected = load_file(golden_dir / FAMILY_DIRS[family] / "student_outputs.safetensors")["cls_scores/0"][:1]
    with torch.no_grad():
        logits = model(pixel_values).logits[:, : expected.shape[-2] * expected.shape[-1] * model.priors_per_location]
    return logits.reshape(1, -1), expected.permute(0, 2, 3, 1).reshape(1, -1)


def save_mmdet(path: Path, state_dict: dict[str, torch.Tensor], meta: dict | None = None) -> Path:
    torch.save({"state_dict": state_dict, "meta": meta or {}}, path)
    return path


@pytest.mark.parametrize("family", sorted(FAMILY_DIRS))
def test_convert_reads_everything_from_the_checkpoint(golden_dir, tmp_path, family):
    checkpoint = save_mmdet(
        tmp_path / f"{family}.pth",
        golden_student_state_dict(golden_dir, family),
        {"dataset_meta": {"classes": CLASSES}},
    )
    convert_mmdet_checkpoint(checkpoint, tmp_path / "out")
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()
    }
    model = AutoModelForObjectDetection.from_pretrained(tmp_path / "out")
    config = model.config
    assert type(model) is FAMILIES[family][1] and config.model_type == family
    assert (config.backbone, config.id2label, config.stacked_convs) == ("resnet18", dict(enumerate(CLASSES)), 4)
    width = 32 if family == "retinanet" else 64
    assert (config.fpn_channels, config.head_channels) == (width, width)
    assert config.fpn_extra_convs_on == ("input" if family == "retinanet" else "output")
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "out")) is FAMILIES[family][2]
    torch.testing.assert_close(*level0_logits(golden_dir, family, model), **FEATURE_TOLERANCE)


def test_convert_cli(golden_dir, tmp_path):
    checkpoint = save_mmdet(tmp_path / "gfl.pth", golden_student_state_dict(golden_dir, "gfl"))
    command = [sys.executable, "-m", "hf_kd.convert.mmdet", str(checkpoint), str(tmp_path / "out")]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Converted" in result.stdout and "gfl, resnet18" in result.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "gfl" and len(config["id2label"]) == 3 and config["reg_max"] == 16
    model = AutoModelForObjectDetection.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(*level0_logits(golden_dir, "gfl", model), **FEATURE_TOLERANCE)


def test_convert_writes_a_card_and_pushes_the_folder_without_the_token(golden_dir, tmp_path, capsys):
    """The card names the source checkpoint by its file name and MMDetection version (no local path); an output folder
    with files hf_kd did not write is refused; `--push_to_hub` uploads the folder (a mocked Hub) without the token."""
    meta = {"dataset_meta": {"classes": CLASSES}, "mmdet_version": "3.3.0"}
    checkpoint = save_mmdet(tmp_path / "gfl_r18.pth", golden_student_state_dict(golden_dir, "gfl"), meta)
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no hf_kd detector"):
        mmdet.main([str(checkpoint), str(user_dir)])
    assert [path.name for path in user_dir.iterdir()] == ["notes.txt"]

    token = "hf_SecretTokenThatMustNotLeave0123456789"
    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
        uploaded.update(repo_id=repo_id, files={path.name: path.read_bytes() for path in Path(folder_path).iterdir()})
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/1")

    out = tmp_path / "out"
    create_repo = mock.Mock(return_value=mock.Mock(repo_id="user/gfl-r18"))
    with (
        mock.patch.object(HfApi, "create_repo", create_repo),
        mock.patch.object(HfApi, "upload_folder", upload_folder),
    ):
        arguments = ["--push_to_hub", "--hub_model_id", "user/gfl-r18", "--hub_token", token]
        mmdet.main([str(checkpoint), str(out), *arguments])
        mmdet.main([str(checkpoint), str(out), *arguments])  # a conversion's folder is converted into again
    assert "Pushed to https://huggingface.co/user/gfl-r18/commit/1" in capsys.readouterr().out
    create_repo.assert_called_with("user/gfl-r18", private=False, exist_ok=True)
    assert uploaded["repo_id"] == "user/gfl-r18"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(uploaded["files"])
    assert not any(token.encode() in content for content in uploaded["files"].values())
    card = uploaded["files"]["README.md"].decode()
    assert "pipeline_tag: object-detection" in card and "library_name: transformers" in card
    assert "`gfl_r18.pth` (MMDetection 3.3.0)" in card and 'model="user/gfl-r18"' in card
    assert "GFL with a timm `resnet18` backbone" in card and str(tmp_path) not in card


def test_convert_safetensors_state_dict_takes_num_labels_from_the_head(golden_dir):
    model = convert_mmdet_checkpoint(golden_dir / "student_r18.safetensors")
    assert model.config.num_labels == 3 and not model.training


def test_convert_unknown_and_missing_keys(golden_dir, tmp_path):
    state_dict = golden_student_state_dict(golden_dir, "gfl")
    unknown = dict(state_dict, **{"bbox_head.extra_conv.weight": torch.zeros(1), "roi_head.fc.bias": torch.zeros(1)})
    with pytest.raises(
        ValueError, match=r"Unknown MMDetection keys \(2\): \['bbox_head\.extra_conv\.weight', 'roi_head\.fc\.bias'\]"
    ):
        convert_mmdet_checkpoint(save_mmdet(tmp_path / "unknown.pth", unknown))
    missing = {k: v for k, v in state_dict.items() if not k.startswith("neck.fpn_convs.4.")}
    with pytest.raises(
        ValueError, match=r"missing keys \(2\): \['neck\.fpn_convs\.4\.bias', 'neck\.fpn_convs\.4\.weight'\]"
    ):
        convert_mmdet_checkpoint(save_mmdet(tmp_path / "missing.pth", missing))
    not_a_detector = {k: v for k, v in state_dict.items() if not k.startswith("bbox_head.gfl_cls")}
    with pytest.raises(ValueError, match=r"Not an MMDetection GFL, RetinaNet, FCOS or ATSS checkpoint"):
        convert_mmdet_checkpoint(save_mmdet(tmp_path / "headless.pth", not_a_detector))


def test_narrow_resnet_backbone_is_named_as_not_a_timm_network(golden_dir, tmp_path):
    """The golden teachers' ResNet-50 has a 16-wide stem: not a timm network; the converter says what to do, and with
    a backbone named it lists the keys whose shapes differ."""
    teacher = save_mmdet(tmp_path / "teacher.pth", load_file(golden_dir / "teacher_r50.safetensors"))
    with pytest.raises(ValueError, match=r"not a standard ResNet-18/34/50/101/152 \(stem 64 wide\)"):
        convert_mmdet_checkpoint(teacher)
    with pytest.raises(
        ValueError, match=r"backbone\.conv1\.weight: checkpoint \(16, 3, 7, 7\) vs model \(64, 3, 7, 7\)"
    ):
        convert_mmdet_checkpoint(teacher, backbone="resnet50")


def to_mmdet_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """hf_kd keys back to MMDetection's (the inverse of the converter's rules), for building test checkpoints."""
    inverse = (
        (r"^neck\.(lateral|fpn)_convs\.(\d+)\.(weight|bias)$", r"neck.\1_convs.\2.conv.\3"),
        (r"^head\.(cls|reg)_convs\.(\d+)\.conv\.(weight|bias)$", r"bbox_head.\1_convs.\2.conv.\3"),
        (r"^head\.(cls|reg)_convs\.(\d+)\.norm\.(weight|bias)$", r"bbox_head.\1_convs.\2.gn.\3"),
        (r"^head\.(.+)$", r"bbox_head.\1"),
    )
    converted = {}
    for key, value in state_dict.items():
        for pattern, replacement in inverse:
            if re.match(pattern, key):
                key = re.sub(pattern, replacement, key)
                break
        converted[key] = value
    return converted


def test_caffe_style_resnet50_fcos_is_refused_unless_declared_pytorch(tmp_path):
    """MMDetection's FCOS uses caffe-style ResNets, which have timm's keys and shapes but not its strides or input:
    without a word from the checkpoint or the user the converter refuses; `backbone_style='pytorch'` converts."""
    model = FCOSForObjectDetection(FCOSConfig(backbone="resnet50", fpn_channels=32, head_channels=32, num_labels=3))
    state_dict = to_mmdet_keys(model.state_dict())
    bare = save_mmdet(tmp_path / "fcos.pth", state_dict)
    with pytest.raises(ValueError, match=r"FCOS configs use caffe-style ResNets.*backbone_style='pytorch'"):
        convert_mmdet_checkpoint(bare)
    caffe = save_mmdet(tmp_path / "caffe.pth", state_dict, {"cfg": "backbone=dict(type='ResNet', style='caffe')"})
    with pytest.raises(ValueError, match=r"caffe-style ResNet .* not a timm network"):
        convert_mmdet_checkpoint(caffe, backbone_style=None)
    converted = convert_mmdet_checkpoint(bare, backbone_style="pytorch")
    assert converted.config.backbone == "resnet50" and converted.config.num_labels == 3
    for name, value in model.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], value, atol=0, rtol=0, msg=name)
    assert timm.is_model(converted.config.backbone)
