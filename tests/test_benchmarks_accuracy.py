"""Smoke test of benchmarks/accuracy.py: the whole pipeline on a few steps, so the script does not rot."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"


def test_accuracy_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", BENCHMARK)
    accuracy = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = accuracy  # its dataclasses look their module up
    spec.loader.exec_module(accuracy)
    results = accuracy.main(["--preset", "smoke", "--output_dir", str(tmp_path)])
    methods = results["synthetic"]
    assert set(methods) == set(accuracy.METHODS)
    for entry in methods.values():
        assert len(entry["runs"]) == 1  # the smoke preset's one seed
        mean, std = entry["summary"]["val"]["map"]
        assert 0 <= mean <= 1 and std >= 0
        assert entry["runs"][0]["curve"], "no evaluation during training"
    table = (tmp_path / "results.md").read_text()
    assert "| crosskd+pkd |" in table and "ΔAP vs none" in table
    assert json.loads((tmp_path / "results.json").read_text())["students"]["synthetic"]["bckd"]["runs"]


def test_accuracy_benchmark_other_families(tmp_path):
    spec = importlib.util.spec_from_file_location("accuracy_benchmark_families", BENCHMARK)
    accuracy = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = accuracy
    spec.loader.exec_module(accuracy)
    argv = ["--preset", "smoke", "--output_dir", str(tmp_path), "--families", "retinanet", "--methods", "crosskd"]
    results = accuracy.main(argv)
    assert set(results) == {"synthetic (retinanet)"}
    assert set(results["synthetic (retinanet)"]) == {"none", "crosskd"}
    config = json.loads((tmp_path / "synthetic_retinanet" / "crosskd_seed0" / "config.json").read_text())
    assert config["model_type"] == "retinanet"
    assert "synthetic (retinanet)" in (tmp_path / "results.md").read_text()

    # the teacher in bf16: new KD runs, the teacher and the baseline reused
    results = accuracy.main([*argv, "--teacher_dtype", "bf16"])
    assert set(results["synthetic (retinanet)"]) == {"none", "crosskd+teacher_bf16"}
    run_dir = tmp_path / "synthetic_retinanet" / "crosskd+teacher_bf16_seed0"
    assert torch.load(run_dir / "training_args.bin", weights_only=False).teacher_dtype == "bf16"
    assert (
        "This call" in (tmp_path / "results.md").read_text()
        and "1 runs trained" in (tmp_path / "results.md").read_text()
    )
