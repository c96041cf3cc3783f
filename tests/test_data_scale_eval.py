"""Fast exact evaluation: both `CocoDetectionMAP` backends give pycocotools' numbers exactly (the 12 stats and the full
precision/recall/scores arrays), and `coco_compute_metrics` loads the ground truth once, on the main process only."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params
from transformers import EvalPrediction

from hf_kd.metrics import COCO_STAT_NAMES, CocoDetectionMAP, DetectionArrays, GroundTruthArrays, coco_compute_metrics
from hf_kd.metrics import compute_metrics as compute_metrics_module
from hf_kd.metrics.numpy_cocoeval import numpy_cocoeval


def _coco(data):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


def _reference(coco_gt, detections, image_ids):
    """pycocotools as documented: loadRes + COCOeval."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def _check_exact(coco_gt, predictions, image_ids=None):
    """Both backends against the reference: 12 stats; the numpy port also array for array."""
    category_ids = sorted(coco_gt.getCatIds())
    label_to_category_id = dict(enumerate(category_ids))
    arrays = DetectionArrays.from_predictions(predictions, label_to_category_id)
    detections = [
        {"image_id": int(i), "category_id": int(c), "bbox": [float(v) for v in b], "score": float(s)}
        for i, c, b, s in zip(arrays.image_ids, arrays.category_ids, arrays.boxes, arrays.scores)
    ]
    image_ids = sorted({p["image_id"] for p in predictions}) if image_ids is None else image_ids
    reference = _reference(coco_gt, detections, image_ids)
    params = Params(iouType="bbox")
    params.imgIds, params.catIds = image_ids, category_ids
    evaluation = numpy_cocoeval(GroundTruthArrays(coco_gt), arrays, np.asarray(image_ids), params)
    for key in ("precision", "recall", "scores"):
        assert np.array_equal(evaluation[key], reference.eval[key]), key
    for backend in ("numpy", "pycocotools"):
        metric = CocoDetectionMAP(ground_truth=coco_gt, backend=backend)
        results = metric.evaluate_predictions(predictions, image_ids=image_ids)
        assert np.array_equal([results[name] for name in COCO_STAT_NAMES], reference.stats), backend
    return reference


def _jittered(data, seed, per_image_false_positives=3, score_levels=None):
    rng = np.random.default_rng(seed)
    category_ids = sorted(c["id"] for c in data["categories"])
    label_of = {c: k for k, c in enumerate(category_ids)}
    predictions = {i["id"]: {"image_id": i["id"], "boxes": [], "scores": [], "labels": []} for i in data["images"]}
    sizes = {i["id"]: (i["width"], i["height"]) for i in data["images"]}

    def score():
        value = rng.random()
        return float(np.round(value * score_levels) / score_levels) if score_levels else float(value)

    for a in data["annotations"]:
        if rng.random() < 0.2:
            continue
        x, y, w, h = a["bbox"]
        d = rng.normal(0, 0.1, 4) * [w, h, w, h]
        label = label_of[a["category_id"]] if rng.random() > 0.1 else int(rng.integers(len(category_ids)))
        entry = predictions[a["image_id"]]
        entry["boxes"].append([x + d[0], y + d[1], x + w + d[2], y + h + d[3]])
        entry["scores"].append(score())
        entry["labels"].append(label)
        if rng.random() < 0.2:  # a duplicate: equal IoU to the same ground truth
            entry["boxes"].append(list(entry["boxes"][-1]))
            entry["scores"].append(score())
            entry["labels"].append(label)
    for image_id, (width, height) in sizes.items():
        for _ in range(int(rng.integers(0, per_image_false_positives + 1))):
            x1, y1 = rng.uniform(0, width - 4), rng.uniform(0, height - 4)
            entry = predictions[image_id]
            entry["boxes"].append([x1, y1, x1 + rng.uniform(1, width / 2), y1 + rng.uniform(1, height / 2)])
            entry["scores"].append(score())
            entry["labels"].append(int(rng.integers(len(category_ids))))
    return list(predictions.values())


@pytest.mark.parametrize(
    ("split", "seed"),
    [
        ("coco128", 0),
        ("bccd_val", 1),
        pytest.param("coco128", 1, marks=pytest.mark.slow),
        pytest.param("bccd_val", 0, marks=pytest.mark.slow),
        pytest.param("bccd_train", 0, marks=pytest.mark.slow),
        pytest.param("bccd_train", 1, marks=pytest.mark.slow),
    ],
)
def test_backends_match_pycocotools_on_real_ground_truth(split, seed, coco128_dir, bccd_dir):
    path = {
        "coco128": coco128_dir / "annotations.json",
        "bccd_val": bccd_dir / "annotations_val.json",
        "bccd_train": bccd_dir / "annotations_train.json",
    }[split]
    data = json.loads(path.read_text())
    reference = _check_exact(_coco(data), _jittered(data, seed, score_levels=20 if seed else None))
    assert 0.05 < reference.stats[0] < 0.95


def _random_ground_truth(rng, num_images=12, num_categories=4, crowd=0.1, size=200):
    images = [{"id": i + 1, "width": size, "height": size, "file_name": f"{i}.jpg"} for i in range(num_images)]
    annotations = []
    for image in images:
        for _ in range(int(rng.integers(0, 30))):
            side = float(np.exp(rng.uniform(np.log(4), np.log(150))))
            w, h = side * rng.uniform(0.5, 1.5), side * rng.uniform(0.5, 1.5)
            x, y = rng.uniform(-5, size - w / 2), rng.uniform(-5, size - h / 2)
            area = float(rng.choice([w * h, 32.0**2, 96.0**2, 32.0**2 - 1e-9, round(w * h)]))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": int(rng.integers(1, num_categories + 1)),
                    "bbox": [round(x, 1), round(y, 1), round(w, 1), round(h, 1)],
                    "area": area,
                    "iscrowd": int(rng.random() < crowd),
                }
            )
    categories = [{"id": c, "name": f"c{c}"} for c in range(1, num_categories + 2)]  # the last has no ground truth
    return {"images": images, "annotations": annotations, "categories": categories}


@pytest.mark.parametrize("seed", [0, 1, 2, *(pytest.param(seed, marks=pytest.mark.slow) for seed in range(3, 12))])
def test_backends_match_pycocotools_on_edge_cases(seed):
    """Crowd regions, areas on the range boundaries, duplicate boxes (IoU ties), score ties, more than 100 detections
    of a class in an image, images without ground truth, a class without ground truth, degenerate boxes."""
    rng = np.random.default_rng(seed)
    data = _random_ground_truth(rng)
    data["images"].append({"id": 99, "width": 200, "height": 200, "file_name": "99.jpg"})  # no ground truth
    predictions = _jittered(data, seed, per_image_false_positives=8, score_levels=5 if seed % 2 else None)
    crowded = predictions[int(rng.integers(len(predictions)))]
    for k in range(130):  # > maxDets of one class in one image
        crowded["boxes"].append([k, k, k + 20 + k % 7, k + 30])
        crowded["scores"].append(float(k % 9) / 10)
        crowded["labels"].append(0)
    predictions[0]["boxes"].append([10.0, 10.0, 10.0, 40.0])  # zero width
    predictions[0]["scores"].append(0.5)
    predictions[0]["labels"].append(1)
    _check_exact(_coco(data), predictions)


def test_ground_truth_with_annotation_id_zero_like_pycocotools():
    """pycocotools treats a detection matched to a ground truth of id 0 as unmatched; so does the port."""
    rng = np.random.default_rng(7)
    data = _random_ground_truth(rng, num_images=4, crowd=0.0)
    data["annotations"][0]["id"] = 0
    predictions = _jittered(data, 7, per_image_false_positives=1)
    _check_exact(_coco(data), predictions)


def test_no_detections_and_images_subset(coco128_dir):
    data = json.loads((coco128_dir / "annotations.json").read_text())
    coco_gt = _coco(data)
    predictions = _jittered(data, 3)
    _check_exact(coco_gt, predictions[:40], image_ids=[p["image_id"] for p in predictions[:50]])
    empty = [{"image_id": p["image_id"], "boxes": [], "scores": [], "labels": []} for p in predictions]
    for backend in ("numpy", "pycocotools"):
        results = CocoDetectionMAP(ground_truth=coco_gt, backend=backend).evaluate_predictions(empty)
        assert [results[name] for name in COCO_STAT_NAMES] == [0.0] * 12


def test_compute_through_evaluate_equals_evaluate_predictions(bccd_dir):
    path = bccd_dir / "annotations_val.json"
    predictions = _jittered(json.loads(path.read_text()), 4)
    metric = CocoDetectionMAP(ground_truth=path, keep_in_memory=True)
    assert metric.backend == "numpy"
    assert metric.compute(predictions=predictions) == metric.evaluate_predictions(predictions)
    with pytest.raises(ValueError, match="backend must be"):
        CocoDetectionMAP(ground_truth=path, backend="fast")


# --- coco_compute_metrics: ground truth once, on the main process ---------------------------------------------------


def _eval_prediction(data, predictions, max_detections=150, batch_size=8):
    """What DistillationTrainer gathers: packed (B, max_det, 6) batches and (B,) image ids; the last batch padded
    with a repeat of the first image (as distributed evaluation pads)."""
    batches, ids = [], []
    entries = predictions + predictions[:1]
    for start in range(0, len(entries), batch_size):
        chunk = entries[start : start + batch_size]
        packed = np.full((len(chunk), max_detections, 6), -1.0, dtype=np.float32)
        for row, p in enumerate(chunk):
            n = min(len(p["scores"]), max_detections)
            packed[row, :n, :4] = np.asarray(p["boxes"], dtype=np.float32).reshape(-1, 4)[:n]
            packed[row, :n, 4] = np.asarray(p["scores"], dtype=np.float32)[:n]
            packed[row, :n, 5] = np.asarray(p["labels"])[:n]
        batches.append(packed)
        ids.append(np.array([p["image_id"] for p in chunk], dtype=np.int64))
    return EvalPrediction(predictions=batches, label_ids=ids)


def _as_float32(predictions):
    return [
        {
            "image_id": p["image_id"],
            "boxes": np.asarray(p["boxes"], dtype=np.float32).reshape(-1, 4).tolist(),
            "scores": np.asarray(p["scores"], dtype=np.float32).tolist(),
            "labels": list(p["labels"]),
        }
        for p in predictions
    ]


class _FakeState:
    def __init__(self, main, processes):
        self.is_main_process, self.num_processes = main, processes


def test_coco_compute_metrics_single_process(bccd_dir, monkeypatch):
    path = bccd_dir / "annotations_val.json"
    predictions = _jittered(json.loads(path.read_text()), 5)
    built = []
    real_init = CocoDetectionMAP.__init__
    monkeypatch.setattr(
        CocoDetectionMAP, "__init__", lambda self, *a, **k: built.append(1) or real_init(self, *a, **k)
    )
    compute_metrics = coco_compute_metrics(path)
    assert built == []  # nothing loaded before the first evaluation
    metrics = compute_metrics(_eval_prediction(json.loads(path.read_text()), predictions))
    metrics_again = compute_metrics(_eval_prediction(json.loads(path.read_text()), predictions))
    assert len(built) == 1 and metrics == metrics_again
    expected = CocoDetectionMAP(ground_truth=path, backend="pycocotools", keep_in_memory=True).compute(
        predictions=_as_float32(predictions)
    )
    assert [metrics[name] for name in COCO_STAT_NAMES] == [expected[name] for name in COCO_STAT_NAMES]
    assert metrics["map_class_RBC"] == expected["map_per_class"]["RBC"]
    with pytest.raises(FileNotFoundError):
        coco_compute_metrics(path.parent / "missing.json")


def test_coco_compute_metrics_other_processes_get_the_main_process_numbers(bccd_dir, monkeypatch):
    path = bccd_dir / "annotations_val.json"
    monkeypatch.setattr(compute_metrics_module, "PartialState", lambda: _FakeState(main=False, processes=2))
    sent = {"map": 0.5}
    monkeypatch.setattr(compute_metrics_module, "broadcast_object_list", lambda objects, from_process: [sent, None])
    monkeypatch.setattr(CocoDetectionMAP, "__init__", lambda *a, **k: pytest.fail("built on a non-main process"))
    assert coco_compute_metrics(path)(EvalPrediction(predictions=[], label_ids=[])) == sent

    monkeypatch.setattr(
        compute_metrics_module, "broadcast_object_list", lambda objects, from_process: [None, "ValueError: x"]
    )
    with pytest.raises(RuntimeError, match="failed on the main process: ValueError: x"):
        coco_compute_metrics(path)(EvalPrediction(predictions=[], label_ids=[]))


def test_coco_compute_metrics_main_process_broadcasts_errors(bccd_dir, monkeypatch):
    path = bccd_dir / "annotations_val.json"
    monkeypatch.setattr(compute_metrics_module, "PartialState", lambda: _FakeState(main=True, processes=2))
    payloads = []
    monkeypatch.setattr(
        compute_metrics_module,
        "broadcast_object_list",
        lambda objects, from_process: payloads.append(objects) or objects,
    )
    bad = EvalPrediction(
        predictions=[np.zeros((1, 1, 6), np.float32)], label_ids=[np.array([123456789])]
    )  # an image id that is not in the ground truth
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_compute_metrics(path)(bad)
    assert payloads[0][0] is None and "not in the ground truth" in payloads[0][1]
