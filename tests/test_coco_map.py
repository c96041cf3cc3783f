"""CocoDetectionMAP gives exactly pycocotools' COCOeval numbers."""

import contextlib
import io
import json
import logging

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hf_kd.data import read_coco_detection
from hf_kd.metrics import (
    COCO_STAT_NAMES,
    CocoDetectionMAP,
    build_coco_ground_truth,
    coco_reference,
    to_coco_detections,
)


def _jittered_predictions(data, seed, miss=0.2, wrong_label=0.1, false_positives=2):
    """Per-image predictions (xyxy, contiguous labels) from jittered ground truth, misses and false positives."""
    rng = np.random.default_rng(seed)
    category_ids = sorted(c["id"] for c in data["categories"])
    label_of = {c: i for i, c in enumerate(category_ids)}
    predictions = {
        image["id"]: {"image_id": image["id"], "boxes": [], "scores": [], "labels": []} for image in data["images"]
    }
    sizes = {image["id"]: (image["width"], image["height"]) for image in data["images"]}

    def add(image_id, box, label):
        predictions[image_id]["boxes"].append([float(v) for v in box])
        predictions[image_id]["scores"].append(float(rng.random()))
        predictions[image_id]["labels"].append(int(label))

    for annotation in data["annotations"]:
        if rng.random() < miss:
            continue
        x, y, w, h = annotation["bbox"]
        dx1, dy1, dx2, dy2 = rng.normal(0, 0.08, 4) * [w, h, w, h]
        label = label_of[annotation["category_id"]]
        if rng.random() < wrong_label:
            label = int(rng.integers(len(category_ids)))
        add(annotation["image_id"], (x + dx1, y + dy1, x + w + dx2, y + h + dy2), label)
    for image_id, (width, height) in sizes.items():
        for _ in range(int(rng.integers(0, false_positives + 1))):
            x1, y1 = rng.uniform(0, width - 10), rng.uniform(0, height - 10)
            add(
                image_id,
                (x1, y1, x1 + rng.uniform(4, width / 2), y1 + rng.uniform(4, height / 2)),
                rng.integers(len(category_ids)),
            )
    return list(predictions.values())


def _pycocotools_stats(ground_truth, predictions, category_ids):
    """COCOeval.stats for the same predictions, converted to COCO results the obvious way."""
    detections = [
        {"image_id": p["image_id"], "category_id": category_ids[label], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
        for p in predictions
        for (x1, y1, x2, y2), s, label in zip(p["boxes"], p["scores"], p["labels"])
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = ground_truth if isinstance(ground_truth, COCO) else COCO(str(ground_truth))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def _stats(results):
    return np.array([results[name] for name in COCO_STAT_NAMES])


@pytest.mark.parametrize("dataset", ["coco128", "bccd"])
def test_ground_truth_json_matches_cocoeval_exactly(dataset, coco128_dir, bccd_dir):
    path = coco128_dir / "annotations.json" if dataset == "coco128" else bccd_dir / "annotations_val.json"
    data = json.loads(path.read_text())
    predictions = _jittered_predictions(data, seed=0)
    category_ids = sorted(c["id"] for c in data["categories"])
    expected = _pycocotools_stats(path, predictions, category_ids)

    metric = CocoDetectionMAP(ground_truth=path, keep_in_memory=True)
    for start in range(0, len(predictions), 16):  # fed batch by batch, as during evaluation
        metric.add_batch(predictions=predictions[start : start + 16])
    results = metric.compute()
    assert np.array_equal(_stats(results), expected.stats)
    assert 0.1 < results["map"] < 0.9
    precision = expected.eval["precision"][:, :, :, 0, -1]
    for k, category_id in enumerate(category_ids):
        values = precision[:, :, k][precision[:, :, k] > -1]
        name = next(c["name"] for c in data["categories"] if c["id"] == category_id)
        assert results["map_per_class"][name] == (float(np.mean(values)) if values.size else -1.0)


def test_references_from_streamed_examples_match_cocoeval_exactly(coco128_dir):
    path = coco128_dir / "annotations.json"
    data = json.loads(path.read_text())
    predictions = _jittered_predictions(data, seed=1)
    expected = _pycocotools_stats(path, predictions, sorted(c["id"] for c in data["categories"]))

    source = read_coco_detection(path)
    references = {r["image_id"]: r for r in map(coco_reference, source.to_iterable_dataset().remove_columns("image"))}
    metric = CocoDetectionMAP(id2label=source.categories.id2label, keep_in_memory=True)
    metric.add_batch(predictions=predictions, references=[references[p["image_id"]] for p in predictions])
    assert np.array_equal(_stats(metric.compute()), expected.stats)

    ground_truth = build_coco_ground_truth(source.to_dataset().remove_columns("image"), source.categories.id2label)
    from_examples = CocoDetectionMAP(ground_truth=ground_truth, keep_in_memory=True).compute(predictions=predictions)
    assert np.array_equal(_stats(from_examples), expected.stats)


def test_tensor_inputs(bccd_dir):
    path = bccd_dir / "annotations_val.json"
    predictions = _jittered_predictions(json.loads(path.read_text()), seed=2)
    as_lists = CocoDetectionMAP(ground_truth=path, keep_in_memory=True).compute(predictions=predictions)
    as_tensors = [
        {
            "image_id": torch.tensor(p["image_id"]),
            "boxes": torch.tensor(p["boxes"], dtype=torch.float64).reshape(-1, 4),
            "scores": torch.tensor(p["scores"], dtype=torch.float64),
            "labels": torch.tensor(p["labels"]),
        }
        for p in predictions
    ]
    assert CocoDetectionMAP(ground_truth=path, keep_in_memory=True).compute(predictions=as_tensors) == as_lists


def _small_ground_truth(crowd=False):
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2, 3)]
    boxes = [(1, 1, [10, 10, 30, 30]), (1, 2, [50, 50, 40, 20]), (2, 1, [5, 60, 8, 8]), (3, 2, [20, 20, 60, 60])]
    annotations = [
        {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for k, (i, c, b) in enumerate(boxes)
    ]
    if crowd:
        annotations.append(
            {"id": 9, "image_id": 2, "category_id": 1, "bbox": [40, 0, 60, 50], "area": 3000.0, "iscrowd": 1}
        )
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "never"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def _compare_with_cocoeval(ground_truth, predictions):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = ground_truth
        coco_gt.createIndex()
    expected = _pycocotools_stats(coco_gt, predictions, [1, 2, 5])
    results = CocoDetectionMAP(ground_truth=ground_truth, keep_in_memory=True).compute(predictions=predictions)
    assert np.array_equal(_stats(results), expected.stats)
    return results


def test_class_without_ground_truth_is_excluded_like_cocoeval():
    predictions = [
        {"image_id": 1, "boxes": [[10, 10, 40, 40], [60, 5, 90, 40]], "scores": [0.9, 0.8], "labels": [0, 2]},
        {"image_id": 2, "boxes": [[5, 60, 13, 68]], "scores": [0.7], "labels": [0]},
        {"image_id": 3, "boxes": [[22, 18, 80, 82], [0, 0, 10, 10]], "scores": [0.6, 0.95], "labels": [1, 2]},
    ]
    results = _compare_with_cocoeval(_small_ground_truth(), predictions)
    assert results["map_per_class"]["never"] == -1.0 and results["map_per_class"]["a"] > 0


def test_crowd_regions_are_ignored_like_cocoeval():
    predictions = [
        {"image_id": 1, "boxes": [[10, 10, 40, 40]], "scores": [0.9], "labels": [0]},
        {
            "image_id": 2,
            "boxes": [[45, 5, 70, 30], [50, 10, 90, 45], [5, 60, 13, 68]],
            "scores": [0.95, 0.9, 0.5],
            "labels": [0, 0, 0],
        },
        {"image_id": 3, "boxes": [[20, 20, 80, 80]], "scores": [0.8], "labels": [1]},
    ]
    with_crowd = _compare_with_cocoeval(_small_ground_truth(crowd=True), predictions)
    without_crowd = _compare_with_cocoeval(_small_ground_truth(crowd=False), predictions)
    assert with_crowd["map"] > without_crowd["map"]  # detections on the crowd region are not false positives


def test_no_predictions_at_all(coco128_dir):
    path = coco128_dir / "annotations.json"
    image_ids = json.loads(path.read_text())["images"]
    empty = [{"image_id": image["id"], "boxes": [], "scores": [], "labels": []} for image in image_ids]
    results = CocoDetectionMAP(ground_truth=path, keep_in_memory=True).compute(predictions=empty)
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval on an empty result set (loadRes([]) would fail)
        coco_gt, no_detections = COCO(str(path)), COCO()
        no_detections.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"]}
        no_detections.createIndex()
        coco_eval = COCOeval(coco_gt, no_detections, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    assert np.array_equal(_stats(results), coco_eval.stats) and _stats(results).tolist() == [0.0] * 12
    assert all(value in (0.0, -1.0) for value in results["map_per_class"].values())

    references = [{"image_id": 1, "bbox": [[1.0, 1.0, 5.0, 5.0]], "category": [0], "area": [25.0], "iscrowd": [0]}]
    metric = CocoDetectionMAP(id2label={0: "a"}, keep_in_memory=True)
    assert (
        metric.compute(predictions=[{"image_id": 1, "boxes": [], "scores": [], "labels": []}], references=references)[
            "map"
        ]
        == 0.0
    )


def test_bad_predictions_and_repeated_images(coco128_dir, caplog):
    path = coco128_dir / "annotations.json"
    metric = CocoDetectionMAP(ground_truth=path, keep_in_memory=True)
    with pytest.raises(ValueError, match=r"image ids not in the ground truth: \[123456\]"):
        metric.compute(predictions=[{"image_id": 123456, "boxes": [], "scores": [], "labels": []}])
    with pytest.raises(ValueError, match="image id 9: predicted label 80 is not a known class"):
        metric.compute(predictions=[{"image_id": 9, "boxes": [[0, 0, 5, 5]], "scores": [0.5], "labels": [80]}])

    once = [{"image_id": 9, "boxes": [[1, 187, 612, 473]], "scores": [0.5], "labels": [45]}]
    with caplog.at_level(logging.WARNING):
        twice = metric.compute(predictions=once + [{"image_id": 9, "boxes": [], "scores": [], "labels": []}])
    assert twice == metric.compute(predictions=once)
    assert "1 entries repeat an image id" in caplog.text


def test_detections_reported_with_original_category_ids(coco128_dir):
    categories = read_coco_detection(coco128_dir / "annotations.json").categories
    prediction = {
        "image_id": torch.tensor(9),
        "boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]], dtype=torch.float64),
        "scores": torch.tensor([0.5], dtype=torch.float64),
        "labels": torch.tensor([79]),
    }
    assert to_coco_detections([prediction], categories.label_to_category_id) == [
        {"image_id": 9, "category_id": 90, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}
    ]
