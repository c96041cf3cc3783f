"""examples/predict.py: PNG and JSON per image."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_utils import TINY_LABELS
from PIL import Image

from hf_kd import GFLConfig, GFLForObjectDetection, GFLImageProcessor

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "predict.py"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A small random GFL (classifier bias 0: scores around 0.5) and its image processor, saved."""
    torch.manual_seed(0)
    config = GFLConfig(backbone="resnet18", fpn_channels=32, head_channels=32, id2label=TINY_LABELS)
    model = GFLForObjectDetection(config)
    with torch.no_grad():
        model.head.gfl_cls.bias.zero_()
    path = tmp_path_factory.mktemp("tiny_gfl")
    model.save_pretrained(path)
    GFLImageProcessor(size={"shortest_edge": 128, "longest_edge": 160}).save_pretrained(path)
    return path


def test_predict_example_writes_png_and_json(tiny_model_dir, tmp_path):
    sizes = {"wide": (200, 150), "tall": (120, 180)}
    for name, size in sizes.items():
        gradient = np.linspace(0, 255, size[0] * size[1] * 3, dtype=np.float64).reshape(size[1], size[0], 3)
        Image.fromarray(gradient.astype(np.uint8)).save(tmp_path / f"{name}.jpg")
    command = [sys.executable, str(SCRIPT), "--model", str(tiny_model_dir)]
    command += [str(tmp_path / "wide.jpg"), str(tmp_path / "tall.jpg"), "--out", str(tmp_path / "out")]
    command += ["--threshold", "0.3", "--device", "cpu"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for name, (width, height) in sizes.items():
        with Image.open(tmp_path / "out" / f"{name}.png") as drawn:
            assert drawn.format == "PNG" and drawn.size == (width, height)
        summary = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert summary["image"].endswith(f"{name}.jpg") and (summary["width"], summary["height"]) == (width, height)
        detections = summary["detections"]
        assert detections, "the tiny model scores around 0.5: some detections pass the 0.3 threshold"
        assert [d["score"] for d in detections] == sorted((d["score"] for d in detections), reverse=True)
        for detection in detections:
            assert set(detection) == {"label", "label_id", "score", "box"}
            assert detection["label"] == TINY_LABELS[detection["label_id"]] and detection["score"] > 0.3
            x1, y1, x2, y2 = detection["box"]
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
