"""Smoke test of benchmarks/accuracy.py: the whole pipeline on a few steps, so the script does not rot."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_accuracy_benchmark_smoke(accuracy, tmp_path):
    results = accuracy.main(["--preset", "smoke", "--output_dir", str(tmp_path)])
    budgets = results["synthetic"]
    assert set(budgets) == {"short", "converged"}
    for budget, steps in (("short", 2), ("converged", 4)):
        assert set(budgets[budget]) == set(accuracy.METHODS)
        for entry in budgets[budget].values():
            assert len(entry["runs"]) == 1  # the smoke preset's one seed
            mean, std = entry["summary"]["val"]["map"]
            assert 0 <= mean <= 1 and std >= 0
            assert entry["runs"][0]["curve"][-1][0] == steps  # evaluated during training, the last at the end
    table = (tmp_path / "results.md").read_text()
    assert "### At convergence: 4 student steps" in table and "### At a fixed small budget: 2 student steps" in table
    assert (
        "| crosskd+pkd |" in table
        and "val ΔAP vs none" in table
        and "over its last quarter" in table
        and "Teacher minus converged student alone" in table
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["students"]["synthetic"]["converged"]["bckd"]["runs"]
    assert set(saved["analyses"]["synthetic"]["steps_to_baseline"]) == set(accuracy.METHODS)
    assert saved["teachers"]["synthetic"]["curve"][-1][0] == 2

    # every finished run is reused: nothing is trained again
    accuracy.main(["--preset", "smoke", "--output_dir", str(tmp_path)])
    assert "0 runs trained" in (tmp_path / "results.md").read_text()


def test_a_finished_run_of_other_arguments_is_an_error_and_left_alone(accuracy, tmp_path):
    record = tmp_path / "synthetic" / "teacher_2steps" / accuracy.RECORD
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"arguments": ["--max_steps", "999"]}))
    with pytest.raises(FileExistsError, match="teacher_2steps holds a finished run started with other arguments"):
        accuracy.main(["--preset", "smoke", "--output_dir", str(tmp_path)])
    assert json.loads(record.read_text()) == {"arguments": ["--max_steps", "999"]}


def test_plateau_and_steps_to_reach(accuracy):
    curve = [(50, 0.2), (100, 0.3), (150, 0.395), (200, 0.40)]
    assert accuracy.last_quarter_gain(curve) == pytest.approx(0.005)  # step 200 against step 150
    assert "plateaued" in accuracy.plateau_words(0.005) and "NOT" in accuracy.plateau_words(0.02)
    runs = [{"curve": curve}, {"curve": [(step, ap + 0.02) for step, ap in curve]}]
    mean = accuracy.mean_curve(runs)
    assert mean[1] == (100, pytest.approx(0.31), pytest.approx(0.0141421, rel=1e-4))
    assert accuracy.first_step_reaching(mean, 0.31) == 100
    assert accuracy.first_step_reaching(mean, 0.5) is None


def test_accuracy_benchmark_other_families(accuracy, tmp_path):
    argv = ["--preset", "smoke", "--output_dir", str(tmp_path), "--families", "retinanet", "--methods", "crosskd"]
    results = accuracy.main(argv)
    assert set(results) == {"synthetic (retinanet)"}
    assert set(results["synthetic (retinanet)"]["converged"]) == {"none", "crosskd"}
    config = json.loads((tmp_path / "synthetic_retinanet" / "crosskd_4steps_seed0" / "config.json").read_text())
    assert config["model_type"] == "retinanet"
    assert "synthetic (retinanet)" in (tmp_path / "results.md").read_text()

    # the teacher in bf16: new KD runs, the teacher and the baselines reused
    results = accuracy.main([*argv, "--teacher_dtype", "bf16"])
    assert set(results["synthetic (retinanet)"]["short"]) == {"none", "crosskd+teacher_bf16"}
    run_dir = tmp_path / "synthetic_retinanet" / "crosskd+teacher_bf16_2steps_seed0"
    assert torch.load(run_dir / "training_args.bin", weights_only=False).teacher_dtype == "bf16"
    assert "2 runs trained" in (tmp_path / "results.md").read_text()
