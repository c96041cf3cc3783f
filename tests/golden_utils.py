"""Shared helpers of the golden parity tests (../shared/golden: MMDetection 3.3 and the official CrossKD/BCKD code)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from hf_kd.models.detection.postprocess import detect
from hf_kd.models.detection.priors import level_sizes

SCENARIOS = ("main", "one_empty", "all_empty")
NUM_LEVELS = 5
# golden/README.md: features and logits within atol = rtol = 1e-4 (thread count alone moves head outputs by 6e-6).
FEATURE_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
# Losses within rtol 1e-4; the atol only absorbs -0.0 vs 0.0 and float noise on levels without positives.
LOSS_TOLERANCE = {"atol": 1e-7, "rtol": 1e-4}
# Boxes are in pixels (up to ~2000 before clipping): a 1e-5 change of a box output moves a side by up to ~1e-3 px;
# rtol 1e-4 covers the large coordinates.
BOX_TOLERANCE = {"atol": 1e-3, "rtol": 1e-4}


def golden_pixel_mask() -> torch.Tensor:
    """Image 0 fills the 256x320 batch; image 1 is 200x250 (golden img_metas)."""
    pixel_mask = torch.zeros(2, 256, 320, dtype=torch.long)
    pixel_mask[0] = 1
    pixel_mask[1, :200, :250] = 1
    return pixel_mask


def load_golden(directory: Path) -> dict:
    """Every file of a golden folder: tensors by file stem, `losses.json` and `manifest.json` as dicts."""
    data = {path.stem: load_file(path) for path in directory.glob("*.safetensors")}
    data["losses"] = json.loads((directory / "losses.json").read_text())
    data["manifest"] = json.loads((directory / "manifest.json").read_text())
    return data


def ground_truth(targets: dict[str, torch.Tensor], scenario: str) -> list[dict[str, torch.Tensor]]:
    """The labels of a golden gt scenario, as the models take them."""
    return [
        {"boxes": targets[f"gt/{scenario}/img{i}/bboxes"], "class_labels": targets[f"gt/{scenario}/img{i}/labels"]}
        for i in range(2)
    ]


def per_level_maps(flat: torch.Tensor, feature_maps: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Per-prior values `(B, Q, ...)` back to MMDetection's per-level `(B, A * C, H, W)` maps."""
    sizes = level_sizes(feature_maps, flat.shape[1])
    flat = flat.reshape(*flat.shape[:2], -1)
    return [
        chunk.reshape(len(flat), feature.shape[-2], feature.shape[-1], -1).permute(0, 3, 1, 2)
        for chunk, feature in zip(flat.split(sizes, dim=1), feature_maps)
    ]


def per_level_sums(per_prior: torch.Tensor, feature_maps: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Per-level sums of a `(B, Q)` per-prior map."""
    sizes = level_sizes(feature_maps, per_prior.shape[1])
    return torch.stack([chunk.sum() for chunk in per_prior.split(sizes, dim=1)])


def mmdet_detections(outputs, nms_iou_threshold: float | None, max_detections: int | None = 100) -> list[dict]:
    """MMDetection's `predict_by_feat(rescale=False)` with its test settings (score_thr 0.05, nms_pre 1000)."""
    return detect(
        outputs.logits,
        outputs.pred_boxes,
        outputs.image_sizes,
        level_sizes(outputs.feature_maps, outputs.logits.shape[1]),
        outputs.centerness_logits,
        score_threshold=0.05,
        pre_nms_topk=1000,
        nms_iou_threshold=nms_iou_threshold,
        max_detections=max_detections,
    )


def assert_detections_match(actual: list[dict], saved: dict[str, torch.Tensor], key: str, window: int = 0) -> None:
    """Same labels (exactly), scores and boxes (within the tolerances) as the golden `key` detections, per image, row
    by row; with `window`, a golden row may match one of ours up to `window` rows away (candidates whose class
    scores differ by less than the thread-count noise, ~1e-6, come in either order)."""
    for image, detections in enumerate(actual):
        prefix = f"{key}/img{image}"
        expected = {name: saved[f"{prefix}/{name}"] for name in ("labels", "scores", "bboxes")}
        assert len(detections["scores"]) == len(expected["scores"]) > 0, prefix
        order = torch.arange(len(expected["scores"]))
        if window:
            order = match_rows(detections, expected, window, prefix)
        torch.testing.assert_close(detections["labels"][order], expected["labels"], atol=0, rtol=0, msg=prefix)
        torch.testing.assert_close(detections["scores"][order], expected["scores"], **FEATURE_TOLERANCE, msg=prefix)
        torch.testing.assert_close(detections["boxes"][order], expected["bboxes"], **BOX_TOLERANCE, msg=prefix)


def match_rows(detections: dict, expected: dict, window: int, prefix: str) -> torch.Tensor:
    """For each golden row, the index of the unused row of ours within `window` rows with its label and (within the
    tolerances) its box."""
    used, order = set(), []
    for row in range(len(expected["labels"])):
        candidates = [
            index
            for index in range(max(0, row - window), min(len(detections["labels"]), row + window + 1))
            if index not in used
            and detections["labels"][index] == expected["labels"][row]
            and torch.allclose(detections["boxes"][index], expected["bboxes"][row], **BOX_TOLERANCE)
        ]
        assert candidates, f"{prefix}: golden row {row} has no match within {window} rows"
        used.add(candidates[0])
        order.append(candidates[0])
    return torch.tensor(order)
