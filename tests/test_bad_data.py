"""Bad data found up front, each case a clear error naming the file / image id / field, or a logged and counted skip
(issue 13: unreadable and high-bit-depth images, annotation files without annotations, empty splits, splits with
other categories, files listed twice, non-numeric Hub boxes, non-finite predictions, and a prepared folder that
holds a user's files)."""

import io
import json
import logging
import re

import datasets
import numpy as np
import PIL.Image
import pytest
from transformers import EvalPrediction, HfArgumentParser

from hf_kd.cli import train as run_distill  # what examples/run_distill.py and hf-kd-train run
from hf_kd.data import (
    DetectionDataError,
    DetectionTransform,
    format_detection_dataset,
    load_prepared_coco_detection,
    prepare_coco_detection,
    read_coco_detection,
)
from hf_kd.data.image_files import image_problem
from hf_kd.data.prepared import MANIFEST_NAME
from hf_kd.metrics import CocoDetectionMAP, coco_compute_metrics

CATEGORIES = [{"id": 1, "name": "cell"}, {"id": 2, "name": "dot"}]


def _jpeg_bytes(width=40, height=30, color=(120, 30, 200)):
    buffer = io.BytesIO()
    array = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    PIL.Image.fromarray(array).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _png_16bit_bytes(width=40, height=30):
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.full((height, width), 20000, dtype=np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


def _write_split(root, name, num_images, categories=CATEGORIES, annotations=True, first_id=1):
    """`root/{name}.json` with `num_images` 40x30 JPEG images in `root/images/` (one box each)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, boxes = [], []
    for image_id in range(first_id, first_id + num_images):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 40, "height": 30})
        boxes.append({"id": image_id, "image_id": image_id, "category_id": categories[0]["id"], "bbox": [2, 3, 10, 8]})
        (root / "images" / f"{image_id}.jpg").write_bytes(_jpeg_bytes())
    data = {"images": images, "categories": categories}
    if annotations:
        data["annotations"] = boxes
    path = root / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def _break_images(image_dir):
    """Image 2 truncated, image 3 empty, image 4 not an image, image 5 a 16-bit grayscale PNG."""
    (image_dir / "2.jpg").write_bytes(_jpeg_bytes()[:-300])
    (image_dir / "3.jpg").write_bytes(b"")
    (image_dir / "4.jpg").write_bytes(b"GIF89a but not really" * 10)
    (image_dir / "5.jpg").write_bytes(_png_16bit_bytes())


def _data_args(root, *extra):
    parser = HfArgumentParser((run_distill.DataArguments, run_distill.DistillationArguments))
    argv = ["--data_dir", str(root), "--output_dir", str(root / "out"), "--kd_method", "none", *extra]
    return parser.parse_args_into_dataclasses(argv)


def _main_args(root, *extra):
    argv = ["--data_dir", str(root), "--output_dir", str(root / "out"), "--kd_method", "none", "--use_cpu"]
    return [*argv, "--max_steps", "1", "--report_to", "none", *extra]


# --- 1, 2: unreadable and high-bit-depth images, found up front ----------------------------------------------------


def test_unreadable_and_16bit_images_are_named_or_skipped_and_counted(tmp_path, caplog):
    path = _write_split(tmp_path, "annotations", 6)
    _break_images(tmp_path / "images")
    with pytest.raises(DetectionDataError) as error:
        read_coco_detection(path, verify_images=True)
    message = str(error.value)
    assert str(path) in message and "8 invalid images/annotations" in message
    assert "image id 2: cannot decode" in message and "2.jpg" in message and "truncated" in message
    assert "image id 3: cannot decode" in message and "3.jpg: the file is empty (0 bytes)" in message
    assert "image id 4: cannot decode" in message and "4.jpg" in message
    assert "unsupported_image_mode" in message and "image id 5" in message and "5.jpg" in message
    assert "mode 'I;16'" in message

    with caplog.at_level(logging.WARNING):
        source = read_coco_detection(path, verify_images=True, on_invalid="skip")
    assert list(source.image_ids) == [1, 6]
    assert source.report.counts["unreadable_image"] == 3 and source.report.counts["unsupported_image_mode"] == 1
    assert source.report.counts["annotation_of_skipped_image"] == 4
    assert "unreadable_image: 3" in caplog.text and "unsupported_image_mode: 1" in caplog.text


def test_transform_refuses_a_high_bit_depth_image_by_id():
    image = PIL.Image.open(io.BytesIO(_png_16bit_bytes()))
    with pytest.raises(DetectionDataError, match="image id 7: mode 'I;16' has more than 8 bits per pixel"):
        DetectionTransform()({"image": image, "image_id": 7, "objects": []})


def test_complete_images_with_trailing_data_or_other_formats_are_accepted(tmp_path):
    jpeg = _jpeg_bytes()
    assert image_problem(jpeg + b"\x00" * 10 + b"appended video" * 100, 1) is None  # data after the end marker
    bmp, png = io.BytesIO(), io.BytesIO()
    PIL.Image.new("RGB", (40, 30)).save(bmp, "BMP")
    PIL.Image.open(io.BytesIO(jpeg)).save(png, "PNG")
    assert image_problem(bmp.getvalue(), 1, expected_size=(40, 30)) is None  # no end marker: decoded
    kind, message = image_problem(bmp.getvalue()[:-50], 7, "a.bmp")
    assert kind == "unreadable_image" and message.startswith("image id 7: cannot decode a.bmp")
    assert image_problem(png.getvalue(), 8, expected_size=(40, 30)) is None
    kind, message = image_problem(png.getvalue()[: len(png.getvalue()) // 2], 8, "b.png")
    assert kind == "unreadable_image" and message.startswith("image id 8: cannot decode b.png")
    kind, message = image_problem(jpeg, 9, "c.jpg", expected_size=(30, 40))
    assert kind == "image_size_mismatch" and "image id 9 (c.jpg): decoded size 40x30" in message


def test_run_distill_checks_every_split_before_training(tmp_path, capsys):
    _write_split(tmp_path, "instances_train", 3)
    _write_split(tmp_path, "instances_val", 2, first_id=10)
    _write_split(tmp_path, "instances_test", 2, first_id=20)
    for split, image in (("val", "11"), ("test", "21")):  # the test split is evaluated only after training
        (tmp_path / "images" / f"{image}.jpg").write_bytes(_jpeg_bytes()[:-300])
        with pytest.raises(DetectionDataError, match=rf"instances_{split}\.json[\s\S]*image id {image}: cannot"):
            run_distill.run(_main_args(tmp_path, "--eval_split", "val", "--test_split", "test"))
        assert not (tmp_path / "out").exists()  # nothing trained, nothing saved
        if split == "val":
            (tmp_path / "images" / "11.jpg").write_bytes(_jpeg_bytes())
    assert "Checking the images of" in capsys.readouterr().err  # a progress bar

    data_args, training_args = _data_args(
        tmp_path, "--eval_split", "val", "--test_split", "test", "--on_invalid", "skip"
    )
    train, evaluation, _, ground_truth, (test, test_ground_truth) = run_distill.load_data(data_args, training_args)
    assert len(evaluation) == 2 and ground_truth.endswith("instances_val.json")
    assert sorted(test["image_id"]) == [20] and isinstance(test_ground_truth, dict)  # built without the skipped
    assert [image["id"] for image in test_ground_truth["images"]] == [20]

    data_args, training_args = _data_args(tmp_path, "--test_split", "test", "--no_verify_images")
    assert len(run_distill.load_data(data_args, training_args)[4][0]) == 2  # not checked: left to the decode


def test_hub_dataset_images_are_checked(tmp_path, caplog):
    good, truncated = tmp_path / "good.jpg", tmp_path / "truncated.jpg"
    good.write_bytes(_jpeg_bytes())
    truncated.write_bytes(_jpeg_bytes()[:-300])
    deep = tmp_path / "deep.png"
    deep.write_bytes(_png_16bit_bytes())
    rows = {
        "image": [str(good), str(truncated), str(deep)],
        "image_id": [1, 2, 3],
        "objects": [[{"bbox": [1.0, 2.0, 3.0, 4.0], "category": 0}]] * 3,
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "objects": datasets.List(
                {"bbox": datasets.List(datasets.Value("float32")), "category": datasets.ClassLabel(names=["a"])}
            ),
        }
    )
    dataset = datasets.Dataset.from_dict(rows, features=features)
    with pytest.raises(DetectionDataError, match=r"2 unusable images[\s\S]*image id 2: cannot decode .*truncated"):
        format_detection_dataset(dataset, verify_images=True)
    with caplog.at_level(logging.WARNING):
        kept = format_detection_dataset(dataset, verify_images=True, on_invalid="skip")
    assert kept["image_id"] == [1] and "skipped 2 unusable images" in caplog.text
    assert "image id 3" in caplog.text and "deep.png" in caplog.text and "unsupported_image_mode: 1" in caplog.text

    streamed = format_detection_dataset(dataset.to_iterable_dataset(), verify_images=True)
    with pytest.raises(DetectionDataError, match="image id 2: cannot decode .*truncated.jpg"):
        list(streamed)  # checked as it streams
    streamed = format_detection_dataset(dataset.to_iterable_dataset(), verify_images=True, on_invalid="skip")
    assert [example["image_id"] for example in streamed] == [1]


# --- 3, 4: annotation files without annotations, empty splits ------------------------------------------------------


def test_annotation_file_without_annotations_is_an_error_and_an_empty_list_a_warning(tmp_path, caplog):
    path = _write_split(tmp_path, "annotations", 2, annotations=False)
    with pytest.raises(DetectionDataError, match=rf"{path}: no 'annotations' list: without one its 2 images"):
        read_coco_detection(path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "annotations": []}))
    with caplog.at_level(logging.WARNING):
        source = read_coco_detection(path)
    assert len(source) == 2 and source.counts()["empty_images"] == 2
    assert f"{path}: 'annotations' is empty: all 2 images are negatives" in caplog.text


def test_empty_training_split_is_an_error_before_training(tmp_path):
    _write_split(tmp_path, "instances_train", 0)
    with pytest.raises(DetectionDataError, match=r"instances_train\.json has no images: nothing to train"):
        run_distill.run(_main_args(tmp_path, "--eval_split", ""))
    assert not (tmp_path / "out").exists()

    _write_split(tmp_path, "instances_train", 1)
    (tmp_path / "images" / "1.jpg").write_bytes(b"")  # its only image is skipped
    with pytest.raises(DetectionDataError, match=r"has no images \(after skipping the invalid ones"):
        run_distill.run(_main_args(tmp_path, "--eval_split", "", "--on_invalid", "skip"))
    assert not (tmp_path / "out").exists()


# --- 5: splits with other categories --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "val_categories",
    [
        [{"id": 5, "name": "cell"}, {"id": 7, "name": "dot"}],  # same names, other ids
        [{"id": 1, "name": "dot"}, {"id": 2, "name": "cell"}],  # names swapped
        [{"id": 1, "name": "cell"}, {"id": 2, "name": "spot"}],  # another name
    ],
)
def test_splits_with_other_categories_are_an_error_listing_both(tmp_path, val_categories):
    _write_split(tmp_path, "instances_train", 2)
    _write_split(tmp_path, "instances_val", 2, categories=val_categories, first_id=10)
    data_args, training_args = _data_args(tmp_path, "--eval_split", "val")
    with pytest.raises(DetectionDataError, match="categories .* differ") as error:
        run_distill.load_data(data_args, training_args)
    message = str(error.value)
    assert "instances_train.json: {1: 'cell', 2: 'dot'}" in message
    expected = {c["id"]: c["name"] for c in val_categories}
    assert f"instances_val.json: {expected}" in message


# --- 6: a file under two image ids ----------------------------------------------------------------------------------


def test_file_listed_under_two_image_ids_is_a_warning_naming_file_and_ids(tmp_path, caplog):
    path = _write_split(tmp_path, "annotations", 3)
    data = json.loads(path.read_text())
    data["images"][2]["file_name"] = "1.jpg"
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        source = read_coco_detection(path, verify_images=True)
    assert len(source) == 3 and source.report.counts["duplicate_file_name"] == 1
    assert "file 1.jpg is listed under 2 image ids [1, 3]" in caplog.text


# --- 7: Hub objects with non-numeric fields -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "feature", "value", "kind", "fragment"),
    [
        ("bbox", datasets.List(datasets.Value("string")), ["1", "2", "3", "4"], "annotation_bad_bbox", "'bbox' must"),
        ("bbox", datasets.Value("string"), "1 2 3 4", "annotation_bad_bbox", "'bbox' must be 4 finite numbers"),
        ("category", datasets.List(datasets.Value("int64")), [0], "annotation_unknown_category", "category [0]"),
        ("id", datasets.Value("string"), "x", "annotation_missing_field", "'id' must be an integer, got 'x'"),
        ("iscrowd", datasets.Value("string"), "0", "annotation_missing_field", "'iscrowd' must be 0 or 1"),
    ],
)
def test_hub_objects_with_non_numeric_fields_are_named_invalid_annotations(
    field, feature, value, kind, fragment, caplog
):
    object_features = {
        "bbox": datasets.List(datasets.Value("float32")),
        "category": datasets.Value("int64"),
        "id": datasets.Value("int64"),
        "iscrowd": datasets.Value("int64"),
        field: feature,
    }
    bad = {"bbox": [1.0, 2.0, 3.0, 4.0], "category": 0, "id": 2, "iscrowd": 0, field: value}
    rows = {"image": [PIL.Image.new("RGB", (20, 10))], "image_id": [5], "objects": [[bad]]}
    features = datasets.Features(
        {"image": datasets.Image(), "image_id": datasets.Value("int64"), "objects": datasets.List(object_features)}
    )
    dataset = datasets.Dataset.from_dict(rows, features=features)
    for data in (dataset, dataset.to_iterable_dataset()):
        with pytest.raises(DetectionDataError, match=rf"image id 5, object 0: {re.escape(fragment)}"):
            list(format_detection_dataset(data, id2label=["a"]))
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            examples = list(format_detection_dataset(data, id2label=["a"], on_invalid="skip"))
        assert [example["objects"] for example in examples] == [[]]  # the image is kept, the object skipped
        assert f"(1 {kind} so far in this process)" in caplog.text


# --- 12: non-finite predictions ---------------------------------------------------------------------------------------


def _ground_truth():
    images = [{"id": image_id, "file_name": f"{image_id}.jpg", "width": 40, "height": 30} for image_id in (1, 2)]
    boxes = [
        {"id": i, "image_id": i, "category_id": 1, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0} for i in (1, 2)
    ]
    return {"images": images, "annotations": boxes, "categories": CATEGORIES}


@pytest.mark.parametrize("backend", ["numpy", "pycocotools"])
@pytest.mark.parametrize("bad", ["nan_score", "inf_score", "nan_box", "inf_box"])
def test_non_finite_predictions_are_an_error_naming_the_image(backend, bad):
    score, box = {"nan_score": (np.nan, None), "inf_score": (np.inf, None)}.get(bad, (0.9, None))
    box = {"nan_box": [2, 3, np.nan, 11], "inf_box": [2, 3, 12, np.inf]}.get(bad, [2, 3, 12, 11])
    predictions = [
        {"image_id": 1, "boxes": [[2, 3, 12, 11]], "scores": [0.9], "labels": [0]},
        {"image_id": 2, "boxes": [[2, 3, 12, 11], box], "scores": [0.8, score], "labels": [0, 0]},
    ]
    metric = CocoDetectionMAP(ground_truth=_ground_truth(), backend=backend, keep_in_memory=True)
    with pytest.raises(ValueError, match="image id 2: a detection has a non-finite score or box"):
        metric.evaluate_predictions(predictions)
    with pytest.raises(ValueError, match="image id 2: a detection has a non-finite score or box"):
        metric.compute(predictions=predictions)
    references = [
        {"image_id": i, "bbox": [[2, 3, 10, 8]], "category": [0], "area": [80.0], "iscrowd": [0]} for i in (1, 2)
    ]
    metric = CocoDetectionMAP(backend=backend, keep_in_memory=True)
    with pytest.raises(ValueError, match="image id 2: a detection has a non-finite score or box"):
        metric.compute(predictions=predictions, references=references)


def test_trainer_evaluation_counts_and_reports_non_finite_detections(caplog):
    packed = np.full((2, 3, 6), -1.0, dtype=np.float32)
    packed[0, 0] = [2, 3, 12, 11, 0.9, 0]
    packed[1, 0] = [2, 3, 12, 11, 0.8, 0]
    clean = EvalPrediction(predictions=[packed.copy()], label_ids=[np.array([1, 2])])
    packed[1, 1] = [2, 3, np.nan, 11, 0.7, 0]
    packed[1, 2] = [2, 3, 12, 11, np.nan, 0]
    compute_metrics = coco_compute_metrics(_ground_truth())
    with caplog.at_level(logging.WARNING):
        metrics = compute_metrics(EvalPrediction(predictions=[packed], label_ids=[np.array([1, 2])]))
    assert metrics["num_nonfinite_detections"] == 2
    assert "2 detections with a non-finite score or box (image ids [2])" in caplog.text
    expected = compute_metrics(clean)
    assert expected["num_nonfinite_detections"] == 0
    assert {k: v for k, v in metrics.items() if k != "num_nonfinite_detections"} == {
        k: v for k, v in expected.items() if k != "num_nonfinite_detections"
    }


# --- 13: a prepared folder never loses a file hf_kd did not write ----------------------------------------------------


def test_prepared_dir_refuses_a_folder_of_other_files_and_keeps_the_users_files(tmp_path):
    path = _write_split(tmp_path / "coco", "instances_train", 4)
    other = _write_split(tmp_path / "coco", "instances_val", 2, first_id=10)
    users = tmp_path / "mine"
    users.mkdir()
    (users / "results.parquet").write_bytes(b"the user's own data")
    with pytest.raises(FileExistsError, match=rf"{users} is not empty and holds no preparation by hf_kd .*results"):
        prepare_coco_detection(path, users, progress=False)
    assert (users / "results.parquet").read_bytes() == b"the user's own data"
    assert sorted(p.name for p in users.iterdir()) == ["results.parquet"]

    prepared_dir = tmp_path / "prepared"
    first = prepare_coco_detection(path, prepared_dir, num_shards=2, progress=False)
    (prepared_dir / "notes.parquet").write_bytes(b"added later by the user")
    with pytest.raises(FileExistsError, match=rf"holds a preparation of {path} .*not of {other}"):
        prepare_coco_detection(other, prepared_dir, split="val", progress=False)
    again = prepare_coco_detection(path, prepared_dir, num_shards=3, progress=False)  # prepared again: other shards
    assert (prepared_dir / "notes.parquet").read_bytes() == b"added later by the user"
    assert not any(shard.exists() for shard in first.shards) and all(shard.exists() for shard in again.shards)
    assert sorted(p.name for p in prepared_dir.iterdir()) == sorted(
        [MANIFEST_NAME, "notes.parquet", *(shard.name for shard in again.shards)]
    )
    assert sorted(e["image_id"] for e in load_prepared_coco_detection(prepared_dir).remove_columns("image")) == [
        1,
        2,
        3,
        4,
    ]

    (prepared_dir / "train-00000-of-00004.parquet").write_bytes(b"the user's, named like a shard")
    with pytest.raises(FileExistsError, match=r"train-00000-of-00004\.parquet'\] were not written by hf_kd"):
        prepare_coco_detection(path, prepared_dir, num_shards=4, progress=False)
    assert (prepared_dir / "train-00000-of-00004.parquet").read_bytes() == b"the user's, named like a shard"
