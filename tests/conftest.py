"""Shared fixtures: paths to the team's shared reference data, skipped with a reason where absent."""

import os
from pathlib import Path

import pytest

SHARED_DIR = Path(os.environ.get("HF_KD_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
GOLDEN_DIR = SHARED_DIR / "golden"
DATA_DIR = SHARED_DIR / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN_DIR / "manifest.json").is_file():
        pytest.skip(f"golden reference data not found at {GOLDEN_DIR} (set HF_KD_SHARED_DIR)")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def coco128_dir() -> Path:
    path = DATA_DIR / "coco128"
    if not (path / "annotations.json").is_file():
        pytest.skip(f"coco128 not found at {path} (set HF_KD_SHARED_DIR)")
    return path


@pytest.fixture(scope="session")
def bccd_dir() -> Path:
    path = DATA_DIR / "bccd"
    if not (path / "annotations_train.json").is_file():
        pytest.skip(f"BCCD not found at {path} (set HF_KD_SHARED_DIR)")
    return path
