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
    report = speed.main([*TINY, "--student_width", "32", "--settings", "fp32", "--json", str(tmp_path / "speed.json")])

    (run,) = report["runs"]
    assert (run["family"], run["setting"]) == ("gfl", "fp32")
    names = [result["name"] for result in run["results"]]
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
    assert all(result["median_ms"] > 0 and len(result["times_ms"]) == 1 for result in run["results"])
    assert set(run["ratios"]) == {"crosskd", "crosskd+pkd", "bckd"}
    assert all(ratio["median_ms"] > 0 and ratio["gflop"] > 0.99 for ratio in run["ratios"].values())
    assert json.loads((tmp_path / "speed.json").read_text()) == json.loads(json.dumps(report))
    assert {"device_name", "torch", "transformers", "timm", "threads"} <= set(report["environment"])
    table = capsys.readouterr().out
    assert "| distill step crosskd+pkd |" in table and "ratio (FLOP)" in table
    assert "| gfl | fp32 | crosskd+pkd |" in table


def test_speed_benchmark_settings(speed, capsys):
    report = speed.main([*TINY, "--methods", "bckd", "--settings", "bf16+channels_last", "fp32+teacher_bf16"])
    assert [run["setting"] for run in report["runs"]] == ["bf16+channels_last", "fp32+teacher_bf16"]
    assert all([result["name"] for result in run["results"]][2] == "distill step bckd" for run in report["runs"])
    table = capsys.readouterr().out
    assert "| gfl | bf16+channels_last | bckd |" in table and "| gfl | fp32+teacher_bf16 | bckd |" in table
