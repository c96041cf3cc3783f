"""hf-kd-predict (`hf_kd.cli.predict`, `examples/predict.py`): PNG and JSON per image, EXIF orientation, folders,
unreadable files, same-stem inputs and readable labels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_utils import TINY_LABELS
from PIL import Image, ImageOps

from hf_kd import GFLConfig, GFLForObjectDetection, GFLImageProcessor

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "predict.py"
EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def predict():
    from hf_kd.cli import predict

    return predict


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


def write_image(path: Path, size: tuple[int, int], seed: int = 0, **save_kwargs) -> Path:
    """A (width, height) gradient with noise, so that detections depend on where its pixels are."""
    width, height = size
    gradient = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    noise = np.random.default_rng(seed).integers(-40, 40, (height, width, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8)).save(path, **save_kwargs)
    return path


def run(predict, model_dir: Path, *arguments) -> int:
    return predict.main(["--model", str(model_dir), "--device", "cpu", *map(str, arguments)])


def summary(path: Path) -> dict:
    return json.loads(path.read_text())


def test_predict_writes_png_and_json(tiny_model_dir, tmp_path):
    sizes = {"wide": (200, 150), "tall": (120, 180)}
    for name, size in sizes.items():
        write_image(tmp_path / f"{name}.jpg", size)
    command = [sys.executable, str(SCRIPT), "--model", str(tiny_model_dir), "--out", str(tmp_path / "out")]
    command += [str(tmp_path / "wide.jpg"), str(tmp_path / "tall.jpg"), "--threshold", "0.3", "--device", "cpu"]
    command += ["--batch_size", "2"]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for name, (width, height) in sizes.items():
        with Image.open(tmp_path / "out" / f"{name}.jpg.png") as drawn:
            assert drawn.format == "PNG" and drawn.size == (width, height)
        found = summary(tmp_path / "out" / f"{name}.jpg.json")
        assert found["image"] == str(tmp_path / f"{name}.jpg") and (found["width"], found["height"]) == (width, height)
        detections = found["detections"]
        assert detections, "the tiny model scores around 0.5: some detections pass the 0.3 threshold"
        assert [d["score"] for d in detections] == sorted((d["score"] for d in detections), reverse=True)
        for detection in detections:
            assert set(detection) == {"label", "label_id", "score", "box"}
            assert detection["label"] == TINY_LABELS[detection["label_id"]] and detection["score"] > 0.3
            x1, y1, x2, y2 = detection["box"]
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height


def test_exif_rotated_photo_gets_boxes_of_the_upright_image(predict, tiny_model_dir, tmp_path):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored 200x120 (landscape), displayed rotated 90 degrees clockwise: 120x200
    rotated = write_image(tmp_path / "rotated.jpg", (200, 120), exif=exif.tobytes())
    with Image.open(rotated) as stored:
        assert stored.size == (200, 120)
        ImageOps.exif_transpose(stored).save(tmp_path / "upright.png")  # the same pixels, upright, no EXIF

    assert run(predict, tiny_model_dir, rotated, tmp_path / "upright.png", "--out", tmp_path / "out") == 0
    found, expected = summary(tmp_path / "out" / "rotated.jpg.json"), summary(tmp_path / "out" / "upright.png.json")
    assert (found["width"], found["height"]) == (expected["width"], expected["height"]) == (120, 200)
    assert found["detections"] and len(found["detections"]) == len(expected["detections"])
    for detection, reference in zip(found["detections"], expected["detections"]):
        assert detection["label_id"] == reference["label_id"]
        torch.testing.assert_close(detection["score"], reference["score"], atol=1e-4, rtol=0)
        torch.testing.assert_close(detection["box"], reference["box"], atol=0.05, rtol=0)
    with Image.open(tmp_path / "out" / "rotated.jpg.png") as drawn:
        assert drawn.size == (120, 200)


def test_folder_gives_its_image_files_in_name_order(predict, tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "photos"
    for index, name in enumerate(["b.png", "a.jpg", "C.JPEG", "sub/d.jpg"]):
        write_image(folder / name, (96 + 16 * index, 80), seed=index)
    (folder / "notes.txt").write_text("not an image, and not named like one: ignored")

    assert run(predict, tiny_model_dir, folder, "--out", tmp_path / "out", "--batch_size", "2") == 0
    processed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if " detections -> " in line]
    assert processed == [str(folder / name) for name in ["C.JPEG", "a.jpg", "b.png"]]  # sorted, not recursive
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert written == sorted(f"{name}.{kind}" for name in ["C.JPEG", "a.jpg", "b.png"] for kind in ["png", "json"])
    assert summary(tmp_path / "out" / "a.jpg.json")["width"] == 112


def test_unreadable_inputs_are_reported_and_skipped(predict, tiny_model_dir, tmp_path, capsys):
    first, second = write_image(tmp_path / "first.jpg", (96, 80)), write_image(tmp_path / "second.png", (80, 96))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "truncated.jpg").write_bytes(first.read_bytes()[:200])
    (tmp_path / "empty").mkdir()
    bad = [tmp_path / "notes.txt", tmp_path / "truncated.jpg", tmp_path / "missing.jpg", tmp_path / "empty"]

    status = run(predict, tiny_model_dir, first, *bad[:2], second, *bad[2:], "--out", tmp_path / "out")
    assert status == 1
    errors = capsys.readouterr().err
    for path in bad:
        assert f"skipped {path}:" in errors
    assert "4 input(s) skipped" in errors
    written = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert written == ["first.jpg.json", "first.jpg.png", "second.png.json", "second.png.png"]


def test_same_stem_inputs_get_their_own_outputs(predict, tiny_model_dir, tmp_path):
    inputs = {"a/x.jpg": (96, 80), "b/x.jpg": (112, 80), "x.png": (128, 80)}
    for index, (name, size) in enumerate(inputs.items()):
        write_image(tmp_path / name, size, seed=index)

    assert run(predict, tiny_model_dir, *(tmp_path / name for name in inputs), "--out", tmp_path / "out") == 0
    for name, (width, height) in inputs.items():
        found = summary(tmp_path / "out" / f"{name}.json")
        assert found["image"] == str(tmp_path / name) and (found["width"], found["height"]) == (width, height)
        with Image.open(tmp_path / "out" / f"{name}.png") as drawn:
            assert drawn.size == (width, height)


def test_labels_scale_with_the_image_and_do_not_cover_each_other(predict):
    tag_heights = []
    for width, height in [(640, 480), (2560, 1920)]:
        box = [0.25 * width, 0.5 * height, 0.75 * width, 0.9 * height]
        records = [
            {"label": label, "label_id": label_id, "score": score, "box": box}
            for label, label_id, score in [("cat", 0, 0.9), ("bird", 2, 0.8), ("dog", 3, 0.7)]
        ]  # one box, three labels of three colors
        drawn = np.array(predict.draw_detections(Image.new("RGB", (width, height), (128, 128, 128)), records))

        tags = []
        for record in records:
            visible = (drawn == predict.PALETTE[record["label_id"]]).all(-1)
            if record is records[0]:
                visible[round(box[1]) :] = False  # the best box's outline is drawn on top, in its tag's color
            rows, columns = visible.nonzero()
            tag = (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)
            assert visible.sum() > 0.5 * (tag[2] - tag[0]) * (tag[3] - tag[1]), f"{record['label']}: tag covered"
            tags.append(tag)
        for index, tag in enumerate(tags):  # disjoint
            for other in tags[index + 1 :]:
                assert tag[2] <= other[0] or other[2] <= tag[0] or tag[3] <= other[1] or other[3] <= tag[1]
        heights = {tag[3] - tag[1] for tag in tags}
        assert len(heights) == 1
        tag_heights.append(heights.pop())
        assert 0.03 * height < tag_heights[-1] < 0.06 * height  # readable, not dominating
    assert 3.5 < tag_heights[1] / tag_heights[0] < 4.5
