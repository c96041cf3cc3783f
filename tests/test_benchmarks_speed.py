"""Smoke test of benchmarks/speed.py on a tiny configuration, so the script does not rot."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
TINY = ["--student", "resnet18", "--teacher", "resnet18", "--width", "64", "--num_labels", "3", "--batch_size", "2"]
TINY += ["--image_size", "128", "--inference_size", "128", "--warmup", "0", "--repeats", "1", "--device", "cpu"]
TINY += ["--threads", "1"]  # fastest on a busy CI machine; the fixture restores the thread count


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("benchmarks_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


def test_speed_benchmark_tiny(speed, tmp_path, capsys):
    report = speed.main([*TINY, "--student_width", "32", "--json", str(tmp_path / "speed.json")])

    names = [result["name"] for result in report["results"]]
    assert names == [
        "student train step",
        "teacher forward (no grad)",
        "distill step crosskd",
        "distill step crosskd+pkd",
        "distill step bckd",
        "student inference + post-processing",
        "teacher inference + post-processing",
        "post-processing alone (student outputs)",
    ]
    assert all(result["median_ms"] > 0 and len(result["times_ms"]) == 1 for result in report["results"])
    assert set(report["ratios"]) == {"crosskd", "crosskd+pkd", "bckd"}
    assert all(ratio["median_ms"] > 0 and ratio["gflop"] > 0.99 for ratio in report["ratios"].values())
    assert json.loads((tmp_path / "speed.json").read_text()) == json.loads(json.dumps(report))
    assert {"device_name", "torch", "transformers", "timm", "threads"} <= set(report["environment"])
    table = capsys.readouterr().out
    assert "| distill step crosskd+pkd |" in table and "ratio (FLOP)" in table


def test_speed_benchmark_options(speed):
    report = speed.main([*TINY, "--methods", "bckd", "--dtype", "bf16", "--channels_last"])
    assert [result["name"] for result in report["results"]][2] == "distill step bckd"
    assert report["config"]["dtype"] == "bf16" and report["config"]["channels_last"]
