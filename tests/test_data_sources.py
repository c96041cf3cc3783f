"""Data sources: local COCO folders (streaming and map-style), parquet export, Hub `objects` layout, bad input."""

import contextlib
import io
import json
import logging

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from datasets.distributed import split_dataset_by_node
from pycocotools.coco import COCO

from hf_kd.data import (
    DetectionDataError,
    export_coco_to_parquet,
    find_coco_annotation_file,
    format_detection_dataset,
    get_id2label,
    load_coco_detection,
    load_detection_dataset,
    read_coco_detection,
)


def _pycocotools(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _write_coco(root, images, annotations, categories=None, sizes=None):
    """A COCO folder `root/annotations.json` + `root/images/`; `sizes` maps file names to the image files to write."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for image in images:
        if sizes is None or image["file_name"] in sizes:
            width, height = (sizes or {}).get(image["file_name"], (image["width"], image["height"]))
            PIL.Image.new("RGB", (width, height), (120, 30, 200)).save(root / "images" / image["file_name"])
    data = {"images": images, "annotations": annotations, "categories": categories or [{"id": 3, "name": "cell"}]}
    path = root / "annotations.json"
    path.write_text(json.dumps(data))
    return path


def _image(image_id, width=40, height=30):
    return {"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height}


def _annotation(annotation_id, image_id, bbox=(2, 3, 10, 8), category_id=3, iscrowd=0):
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": list(bbox),
        "area": 80.0,
        "iscrowd": iscrowd,
    }


# --- coco128 against pycocotools ---------------------------------------------------------------------------------


def test_coco128_stream_matches_pycocotools(coco128_dir):
    coco = _pycocotools(coco128_dir / "annotations.json")
    source = read_coco_detection(coco128_dir / "annotations.json")
    assert sum(source.report.counts.values()) == 0
    category_ids = sorted(coco.getCatIds())
    assert source.categories.category_ids == tuple(category_ids)
    assert source.categories.names == tuple(coco.cats[c]["name"] for c in category_ids)

    dataset = source.to_iterable_dataset(num_shards=8)
    assert isinstance(dataset, datasets.IterableDataset) and dataset.num_shards == 8
    assert get_id2label(dataset) == source.categories.id2label
    examples = {example["image_id"]: example for example in dataset}
    assert sorted(examples) == sorted(coco.getImgIds())  # 128 images, the 2 without boxes included
    assert sum(not e["objects"] for e in examples.values()) == 2
    assert sum(len(e["objects"]) for e in examples.values()) == len(coco.anns) == 929

    for image_id, example in examples.items():
        info = coco.imgs[image_id]
        assert (example["width"], example["height"]) == (info["width"], info["height"])
        assert example["image"].mode == "RGB" and example["image"].size == (info["width"], info["height"])
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(example["objects"]) == len(annotations)
        for obj, annotation in zip(example["objects"], annotations):
            assert obj["id"] == annotation["id"]
            assert obj["bbox"] == annotation["bbox"]  # exact: float64 all the way
            assert source.categories.category_ids[obj["category"]] == annotation["category_id"]
            assert obj["iscrowd"] == annotation["iscrowd"]
            assert obj["area"] == annotation["area"]
    grayscale = PIL.Image.open(coco128_dir / "images" / coco.imgs[86]["file_name"])
    assert grayscale.mode == "L" and examples[86]["image"].mode == "RGB"


def test_coco128_map_style_dataset(coco128_dir):
    dataset = load_coco_detection(coco128_dir, streaming=False)
    assert isinstance(dataset, datasets.Dataset) and len(dataset) == 128
    streamed = {e["image_id"]: e["objects"] for e in load_coco_detection(coco128_dir).remove_columns("image")}
    assert {row["image_id"]: row["objects"] for row in dataset.remove_columns("image")} == streamed
    assert dataset[0]["image"].mode == "RGB"


def test_find_annotation_file(tmp_path, coco128_dir, bccd_dir):
    assert find_coco_annotation_file(coco128_dir) == coco128_dir / "annotations.json"
    assert find_coco_annotation_file(bccd_dir, "val") == bccd_dir / "annotations_val.json"
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    assert find_coco_annotation_file(tmp_path, "val") == tmp_path / "annotations" / "instances_val2017.json"
    with pytest.raises(FileNotFoundError, match="split='train'"):
        find_coco_annotation_file(tmp_path, "train")


def test_bccd_splits(bccd_dir):
    for split, count in (("train", 205), ("val", 87), ("test", 72)):
        source = read_coco_detection(find_coco_annotation_file(bccd_dir, split))
        assert len(source) == count and source.categories.names == ("RBC", "WBC", "Platelets")


# --- streaming: sharding over processes and workers, seeded shuffling --------------------------------------------


def _seen_image_ids(dataset, world_size, num_workers, epoch):
    seen = []
    for rank in range(world_size):
        node = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        node.set_epoch(epoch)  # as the Trainer does on each process's dataset
        loader = torch.utils.data.DataLoader(node, batch_size=None, num_workers=num_workers)
        seen.append([int(example["image_id"]) for example in loader])
    return seen


@pytest.mark.parametrize("num_shards", [8, 7])  # shards split by node, and (7 % 2 != 0) examples split by node
def test_two_processes_two_workers_see_every_example_once(coco128_dir, num_shards):
    source = read_coco_detection(coco128_dir / "annotations.json")
    dataset = source.to_iterable_dataset(num_shards=num_shards).remove_columns("image")
    dataset = dataset.shuffle(seed=42, buffer_size=16)
    all_ids = sorted(int(i) for i in source.image_ids)

    epoch0 = _seen_image_ids(dataset, world_size=2, num_workers=2, epoch=0)
    assert sorted(epoch0[0] + epoch0[1]) == all_ids
    assert all(len(ids) > 0 for ids in epoch0)
    assert _seen_image_ids(dataset, world_size=2, num_workers=2, epoch=0) == epoch0  # seeded

    epoch1 = _seen_image_ids(dataset, world_size=2, num_workers=2, epoch=1)
    assert sorted(epoch1[0] + epoch1[1]) == all_ids
    assert epoch1 != epoch0  # reshuffled


# --- parquet export and the Hub `objects` layout ----------------------------------------------------------------


def test_parquet_export_roundtrip(tmp_path, coco128_dir):
    paths = export_coco_to_parquet(coco128_dir, tmp_path / "parquet", num_shards=4, progress=False)
    assert [p.name for p in paths] == [f"train-0000{k}-of-00004.parquet" for k in range(4)]
    streamed = datasets.load_dataset(
        "parquet", data_files={"train": [str(p) for p in paths]}, split="train", streaming=True
    )
    source = read_coco_detection(coco128_dir / "annotations.json")
    assert streamed.num_shards == 4 and streamed.features == source.features
    examples = list(streamed)
    expected = [source.example(i) for i in range(len(source))]
    assert [e["objects"] for e in examples] == [e["objects"] for e in expected]
    assert [e["image_id"] for e in examples] == [e["image_id"] for e in expected]
    first = np.asarray(examples[0]["image"])
    assert np.array_equal(first, np.asarray(PIL.Image.open(source.image_path(0)).convert("RGB")))
    # the exported layout is the common one: formatting it again changes nothing
    formatted = format_detection_dataset(streamed)
    assert [e["objects"] for e in formatted.remove_columns("image")] == [e["objects"] for e in expected]


def _hub_style_parquet(tmp_path, source, rows=12):
    """A cppe-5-like dataset with other column names: dict-of-lists objects, normalized xyxy boxes, no width/height."""
    records = {"img": [], "img_id": [], "annotations": []}
    for index in range(rows):
        example = source.example(index)
        width, height = example["width"], example["height"]
        boxes = [
            [x / width, y / height, (x + w) / width, (y + h) / height]
            for x, y, w, h in (o["bbox"] for o in example["objects"])
        ]
        records["img"].append(source.image_path(index))
        records["img_id"].append(example["image_id"])
        records["annotations"].append(
            {
                "boxes": boxes,
                "label": [o["category"] for o in example["objects"]],
                "ann_id": [o["id"] for o in example["objects"]],
            }
        )
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "img_id": datasets.Value("int64"),
            "annotations": datasets.Sequence(
                {
                    "boxes": datasets.List(datasets.Value("float64"), length=4),
                    "label": datasets.ClassLabel(names=list(source.categories.names)),
                    "ann_id": datasets.Value("int64"),
                }
            ),
        }
    )
    path = tmp_path / "hub" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    datasets.Dataset.from_dict(records, features=features).to_parquet(str(path))
    return path


def test_hub_objects_layout_with_column_mapping(tmp_path, bccd_dir):
    source = read_coco_detection(bccd_dir / "annotations_val.json")
    path = _hub_style_parquet(tmp_path, source)
    options = {
        "data_files": {"train": str(path)},
        "column_mapping": {"image": "img", "image_id": "img_id", "objects": "annotations", "bbox": "boxes"}
        | {"category": "label", "id": "ann_id"},
        "box_format": "xyxy",
        "normalized_boxes": True,
    }
    dataset = load_detection_dataset("parquet", **options)
    assert isinstance(dataset, datasets.IterableDataset)
    map_style = load_detection_dataset("parquet", streaming=False, **options)
    assert isinstance(map_style, datasets.Dataset) and map_style[0]["image"].mode == "RGB"
    assert map_style.remove_columns("image").to_list() == list(dataset.remove_columns("image"))
    assert get_id2label(dataset) == {0: "RBC", 1: "WBC", 2: "Platelets"}
    for index, example in enumerate(dataset):
        expected = source.example(index)
        assert example["image"].mode == "RGB" and example["image"].size == (expected["width"], expected["height"])
        assert (example["image_id"], example["width"], example["height"]) == (
            expected["image_id"],
            expected["width"],
            expected["height"],
        )
        assert len(example["objects"]) == len(expected["objects"])
        for obj, ref in zip(example["objects"], expected["objects"]):
            assert obj["bbox"] == pytest.approx(ref["bbox"], abs=1e-9)
            assert obj["area"] == pytest.approx(ref["bbox"][2] * ref["bbox"][3])  # box area when absent
            assert (obj["category"], obj["iscrowd"], obj["id"]) == (ref["category"], 0, ref["id"])


def test_hub_layout_non_contiguous_ids_and_bad_objects(caplog):
    rows = {
        "image": [PIL.Image.new("RGB", (20, 10))],
        "image_id": [5],
        "objects": [[{"bbox": [1.0, 2.0, 3.0, 4.0], "category": 90}, {"bbox": [0.0, 0.0, 2.0, 2.0], "category": 7}]],
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "objects": datasets.List(
                {"bbox": datasets.List(datasets.Value("float32")), "category": datasets.Value("int64")}
            ),
        }
    )
    dataset = datasets.Dataset.from_dict(rows, features=features).to_iterable_dataset()
    example = next(iter(format_detection_dataset(dataset, id2label={1: "a", 90: "z"}, on_invalid="skip")))
    assert example["objects"] == [{"id": -1, "bbox": [1.0, 2.0, 3.0, 4.0], "category": 1, "area": 12.0, "iscrowd": 0}]
    assert (example["width"], example["height"]) == (20, 10)  # read from the image
    assert "category 7 is not a known class" in caplog.text
    with pytest.raises(DetectionDataError, match="image id 5, object 1: category 7"):
        next(iter(format_detection_dataset(dataset, id2label={1: "a", 90: "z"})))
    with pytest.raises(DetectionDataError, match="pass id2label"):
        format_detection_dataset(dataset)
    with pytest.raises(DetectionDataError, match="column 'img'"):
        format_detection_dataset(dataset, column_mapping={"image": "img"}, id2label=["a"])


# --- image decoding: modes and EXIF orientation --------------------------------------------------------------------


def test_palette_rgba_and_exif_orientation_become_upright_rgb(tmp_path):
    root = tmp_path / "coco"
    images = [_image(1, 16, 12), _image(2, 16, 12), {**_image(3, 20, 40), "file_name": "3.jpg"}]
    _write_coco(root, images, [_annotation(1, 3, bbox=(1, 1, 5, 30))], sizes={})
    PIL.Image.new("P", (16, 12), 3).save(root / "images" / "1.png")
    PIL.Image.new("RGBA", (16, 12), (1, 2, 3, 0)).save(root / "images" / "2.png")
    stored = PIL.Image.new("RGB", (40, 20), (200, 10, 10))  # stored landscape, displayed portrait (orientation 6)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    stored.save(root / "images" / "3.jpg", exif=exif.tobytes())

    source = read_coco_detection(root / "annotations.json", verify_images=True)
    assert sum(source.report.counts.values()) == 0
    examples = {e["image_id"]: e for e in source.to_iterable_dataset()}
    assert all(e["image"].mode == "RGB" for e in examples.values())
    assert examples[3]["image"].size == (20, 40)


# --- bad input: clear errors, or logged and counted skips ---------------------------------------------------------


def test_malformed_json(tmp_path):
    path = tmp_path / "instances_train.json"
    path.write_text('{"images": [')
    with pytest.raises(DetectionDataError, match=f"{path}: malformed JSON"):
        read_coco_detection(path)


def _raises_and_skips(path, kind, *fragments, caplog):
    with pytest.raises(DetectionDataError) as error:
        read_coco_detection(path)
    for fragment in (str(path), kind, *fragments):
        assert fragment in str(error.value)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        source = read_coco_detection(path, on_invalid="skip")
    assert source.report.counts[kind] >= 1
    assert kind in caplog.text and fragments[0] in caplog.text
    return source


def test_annotation_pointing_to_missing_image(tmp_path, caplog):
    path = _write_coco(tmp_path, [_image(1)], [_annotation(1, 1), _annotation(2, 999)])
    source = _raises_and_skips(path, "annotation_unknown_image", "annotation id 2", "image_id 999", caplog=caplog)
    assert len(source.annotation_ids) == 1


def test_missing_image_file(tmp_path, caplog):
    path = _write_coco(
        tmp_path, [_image(1), _image(2)], [_annotation(1, 1), _annotation(2, 2)], sizes={"1.png": (40, 30)}
    )
    source = _raises_and_skips(path, "missing_image_file", "image id 2", "2.png", caplog=caplog)
    assert list(source.image_ids) == [1]
    assert source.report.counts["annotation_of_skipped_image"] == 1  # its annotation is counted too


def test_unreadable_image_file(tmp_path, caplog):
    path = _write_coco(tmp_path, [_image(1), _image(2)], [_annotation(1, 2)])
    (tmp_path / "images" / "2.png").write_bytes(b"not an image")
    with pytest.raises(Exception, match="2.png"):  # decoded lazily: PIL names the file
        list(read_coco_detection(path).to_iterable_dataset())
    with pytest.raises(DetectionDataError, match=r"unreadable_image[\s\S]*image id 2: cannot decode .*2\.png"):
        read_coco_detection(path, verify_images=True)
    source = read_coco_detection(path, verify_images=True, on_invalid="skip")
    assert list(source.image_ids) == [1] and source.report.counts["unreadable_image"] == 1
    assert "unreadable_image" in caplog.text


def test_image_size_mismatch(tmp_path):
    path = _write_coco(tmp_path, [_image(1, 40, 30)], [], sizes={"1.png": (30, 40)})
    with pytest.raises(DetectionDataError, match="image id 1 .*decoded size 30x40"):
        read_coco_detection(path, verify_images=True)


def test_negative_width_height(tmp_path, caplog):
    path = _write_coco(tmp_path, [_image(1), _image(2, 40, -5)], [_annotation(1, 1)], sizes={"1.png": (40, 30)})
    source = _raises_and_skips(path, "image_bad_size", "image id 2", "height=-5", caplog=caplog)
    assert list(source.image_ids) == [1]


def test_unknown_category_id(tmp_path, caplog):
    path = _write_coco(tmp_path, [_image(1)], [_annotation(1, 1), _annotation(2, 1, category_id=42)])
    source = _raises_and_skips(path, "annotation_unknown_category", "annotation id 2", "category_id 42", caplog=caplog)
    assert list(source.annotation_ids) == [1]


def test_duplicate_image_ids(tmp_path, caplog):
    images = [_image(1), {**_image(1), "file_name": "other.png"}, _image(2)]
    path = _write_coco(tmp_path, images, [_annotation(1, 2)])
    source = _raises_and_skips(path, "duplicate_image_id", "image id 1", "other.png", caplog=caplog)
    assert list(source.image_ids) == [2]


def test_duplicate_annotation_ids_and_malformed_boxes(tmp_path, caplog):
    annotations = [_annotation(1, 1), _annotation(1, 1), _annotation(2, 1, bbox=(1, 2, 3))]
    path = _write_coco(tmp_path, [_image(1)], annotations)
    with pytest.raises(DetectionDataError, match=r"duplicate_annotation_id[\s\S]*annotation_bad_bbox"):
        read_coco_detection(path)
    source = _raises_and_skips(path, "annotation_bad_bbox", "annotation id 2", "[1, 2, 3]", caplog=caplog)
    assert source.report.counts["duplicate_annotation_id"] == 2 and len(source.annotation_ids) == 0


def test_boxes_outside_the_image_are_kept_and_reported(tmp_path, caplog):
    annotations = [_annotation(1, 1, bbox=(30, 20, 20, 20)), _annotation(2, 1, bbox=(50, 40, 5, 5))]
    annotations.append(_annotation(3, 1, bbox=(5, 5, 0, 4)))
    path = _write_coco(tmp_path, [_image(1)], annotations)
    with caplog.at_level(logging.WARNING):
        source = read_coco_detection(path)
    assert source.report.counts["box_outside_image"] == 2 and source.report.counts["degenerate_box"] == 1
    assert "annotation id 1 (image id 1): bbox [30, 20, 20, 20] leaves the 40x30 image" in caplog.text
    assert len(source.annotation_ids) == 3  # ground truth stays as pycocotools reads it; transforms clip and count
