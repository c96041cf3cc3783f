"""Smoke test of benchmarks/data_throughput.py on a few synthetic images."""

import importlib.util
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "data_throughput.py"


def test_data_throughput_benchmark_prints_a_table(capsys):
    spec = importlib.util.spec_from_file_location("data_throughput", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(
        ["--datasets", "synthetic", "--num-images", "6", "--batch-size", "2", "--workers", "2"]
        + ["--shortest-edge", "96", "--longest-edge", "160", "--synthetic-size", "64"]
    )
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| synthetic")]
    assert lines[1].startswith("| dataset | stage | workers | images/s")
    assert len(rows) == 6 and all(float(row.split("|")[4]) > 0 for row in rows)
    assert rows[-1].split("|")[3].strip() == "2"
