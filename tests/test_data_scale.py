"""COCO-size data path on a reduced-size generated file: the generator, preparation to parquet shards (counts verified,
resumable), and the streaming training source over them (same examples as `read_coco_detection`'s stream)."""

import contextlib
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pycocotools.mask
import pytest
import torch
from datasets.distributed import split_dataset_by_node
from pycocotools.coco import COCO

from hf_kd import GFLImageProcessor
from hf_kd.data import DetectionCollator, DetectionDataError, get_id2label, read_coco_detection
from hf_kd.data import parquet as parquet_module
from hf_kd.data import prepared as prepared_module
from hf_kd.data.prepared import (
    INDEX_NAME,
    MANIFEST_NAME,
    PreparedCocoDetection,
    load_prepared_coco_detection,
    prepare_coco_detection,
)

SCALE = 0.002  # 237 images, 1,720 annotations, 18 crowd regions, 2 empty images


def _load_generator():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "make_coco_scale.py"
    spec = importlib.util.spec_from_file_location("make_coco_scale", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_coco_scale = _load_generator()


@pytest.fixture(scope="module")
def small_coco(tmp_path_factory) -> Path:
    """A reduced-size train2017-like folder (json + hard-linked images)."""
    root = tmp_path_factory.mktemp("coco_scale")
    return make_coco_scale.make_coco_scale(root, "train2017", scale=SCALE)


def _pycocotools_counts(path: Path) -> dict[str, int]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    return {
        "images": len(coco.imgs),
        "annotations": len(coco.anns),
        "crowd": sum(1 for a in coco.anns.values() if a["iscrowd"]),
        "empty_images": sum(1 for image_id in coco.imgs if not coco.imgToAnns[image_id]),
    }


def _objects_layout(dataset):
    return list(dataset.remove_columns("image"))


# --- the generator -----------------------------------------------------------------------------------------------


def test_generator_is_deterministic_with_coco_statistics(small_coco, tmp_path):
    again = make_coco_scale.make_coco_scale(tmp_path, "train2017", scale=SCALE, images=False)
    assert again.read_bytes() == small_coco.read_bytes()

    counts = _pycocotools_counts(small_coco)
    assert counts == make_coco_scale.split_counts("train2017", SCALE)
    assert counts == {"images": 237, "annotations": 1720, "crowd": 18, "empty_images": 2}
    data = json.loads(small_coco.read_text())
    category_ids = [c["id"] for c in data["categories"]]
    assert len(category_ids) == 80 and set(category_ids) < set(range(1, 91))
    for annotation in data["annotations"][:300]:
        segmentation = annotation["segmentation"]
        if annotation["iscrowd"]:  # uncompressed RLE, consistent with bbox and area
            image = next(i for i in data["images"] if i["id"] == annotation["image_id"])
            rle = pycocotools.mask.frPyObjects(segmentation, image["height"], image["width"])
            assert pycocotools.mask.area(rle) == annotation["area"]
            assert pycocotools.mask.toBbox(rle).tolist() == annotation["bbox"]
        else:
            assert isinstance(segmentation, list) and len(segmentation[0]) >= 12
    image = data["images"][0]
    path = small_coco.parents[1] / "train2017" / image["file_name"]
    with PIL.Image.open(path) as opened:
        assert opened.size == (image["width"], image["height"])


# --- preparation ---------------------------------------------------------------------------------------------------


def test_prepared_counts_equal_the_json(small_coco, tmp_path):
    prepared = prepare_coco_detection(small_coco, tmp_path / "prepared", num_shards=4, progress=False)
    expected = _pycocotools_counts(small_coco)
    assert prepared.counts == expected and prepared.json_counts == expected
    assert len(prepared.shards) == 4 and all(path.is_file() for path in prepared.shards)
    assert not (tmp_path / "prepared" / INDEX_NAME).exists()
    # counted again from the parquet files themselves, independently of the preparation's own check
    table = datasets.load_dataset(
        "parquet", data_files=[str(path) for path in prepared.shards], split="train"
    ).remove_columns("image")
    objects = table["objects"]
    assert len(table) == expected["images"]
    assert sum(len(o) for o in objects) == expected["annotations"]
    assert sum(obj["iscrowd"] for o in objects for obj in o) == expected["crowd"]
    assert sum(not o for o in objects) == expected["empty_images"]
    assert PreparedCocoDetection.from_dir(tmp_path / "prepared").counts == expected


def test_prepared_stream_is_read_coco_detection_stream(small_coco, tmp_path):
    source = read_coco_detection(small_coco)
    prepared = prepare_coco_detection(small_coco, tmp_path / "prepared", num_shards=6, progress=False)
    streamed = load_prepared_coco_detection(prepared)
    reference = source.to_iterable_dataset(num_shards=6)
    assert isinstance(streamed, datasets.IterableDataset) and streamed.num_shards == 6
    assert streamed.features == reference.features and get_id2label(streamed) == source.categories.id2label
    assert _objects_layout(streamed) == _objects_layout(reference)  # same examples, same order
    undecoded = datasets.Image(decode=False)
    paths = [e["image"]["path"] for e in streamed.cast_column("image", undecoded)]
    assert paths == [e["image"]["path"] for e in reference.cast_column("image", undecoded)]
    first = next(iter(streamed))
    assert first["image"].mode == "RGB" and first["image"].size == (first["width"], first["height"])

    # the collator works on it unchanged
    collator = DetectionCollator(GFLImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}))
    batch = collator(list(streamed.take(3)))
    assert batch["pixel_values"].shape[0] == 3 and len(batch["labels"]) == 3


@pytest.mark.slow
def test_prepared_stream_over_two_processes_and_two_workers(small_coco, tmp_path):
    """Shuffled and split over 2 processes x 2 dataloader workers: every image exactly once, as with the json source."""
    source = read_coco_detection(small_coco)
    prepared = prepare_coco_detection(small_coco, tmp_path / "prepared", num_shards=8, progress=False)
    dataset = load_prepared_coco_detection(prepared).remove_columns("image").shuffle(seed=3, buffer_size=16)
    seen = []
    for rank in range(2):
        node = split_dataset_by_node(dataset, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(node, batch_size=None, num_workers=2)
        seen.append([int(example["image_id"]) for example in loader])
    assert all(seen) and sorted(seen[0] + seen[1]) == sorted(int(i) for i in source.image_ids)


def test_preparation_resumes_after_interruption(small_coco, tmp_path, monkeypatch):
    output = tmp_path / "prepared"
    real_shard_table = parquet_module.shard_table
    calls = []

    def interrupted_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[1])
        return real_shard_table(*args, **kwargs)

    monkeypatch.setattr(parquet_module, "shard_table", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare_coco_detection(small_coco, output, num_shards=5, progress=False)
    assert (output / INDEX_NAME).is_file() and not (output / MANIFEST_NAME).exists()
    assert len(list(output.glob("*.parquet"))) == 2

    # Resumed: no json parse (the saved index is used), only the missing shards written; a damaged shard is redone.
    shards = sorted(output.glob("*.parquet"))
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    calls.clear()
    monkeypatch.setattr(parquet_module, "shard_table", lambda *a, **k: calls.append(a[1]) or real_shard_table(*a, **k))
    monkeypatch.setattr(prepared_module, "read_coco_detection", lambda *a, **k: pytest.fail("parsed the json again"))
    prepared = prepare_coco_detection(small_coco, output, num_shards=5, progress=False)
    assert len(calls) == 4  # shard 2 (damaged) and shards 3-5; shard 1 kept
    assert prepared.counts == _pycocotools_counts(small_coco)
    assert not (output / INDEX_NAME).exists()

    calls.clear()  # done: nothing to do
    assert prepare_coco_detection(small_coco, output, num_shards=5, progress=False).counts == prepared.counts
    assert calls == []
    monkeypatch.undo()
    assert _objects_layout(load_prepared_coco_detection(output)) == _objects_layout(
        read_coco_detection(small_coco).to_iterable_dataset(num_shards=5)
    )


def test_preparation_detects_lost_annotations(small_coco, tmp_path, monkeypatch):
    real_shard_table = parquet_module.shard_table

    def drop_last_row(*args, **kwargs):
        table = real_shard_table(*args, **kwargs)
        return table.slice(0, table.num_rows - 1)

    monkeypatch.setattr(parquet_module, "shard_table", drop_last_row)
    with pytest.raises(DetectionDataError, match="preparation lost data"):
        prepare_coco_detection(small_coco, tmp_path / "prepared", num_shards=2, progress=False)
    assert not (tmp_path / "prepared" / MANIFEST_NAME).exists()


def test_invalid_entries_are_skipped_and_reconciled(small_coco, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(small_coco.parents[1] / "train2017", root / "images", symlinks=True)
    data = json.loads(small_coco.read_text())
    (root / "images" / data["images"][0]["file_name"]).unlink()  # missing file: image and its annotations skipped
    data["annotations"][5]["category_id"] = 12  # not a COCO category id
    path = root / "annotations.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DetectionDataError, match="annotation_unknown_category"):
        prepare_coco_detection(path, tmp_path / "raise", progress=False)
    prepared = prepare_coco_detection(path, tmp_path / "skip", on_invalid="skip", progress=False)
    json_counts = _pycocotools_counts(path)
    assert prepared.json_counts == json_counts
    assert prepared.counts["images"] == json_counts["images"] - 1
    manifest = json.loads((tmp_path / "skip" / MANIFEST_NAME).read_text())
    skipped_annotations = manifest["skipped"]["annotation_of_skipped_image"] + 1
    assert prepared.counts["annotations"] == json_counts["annotations"] - skipped_annotations


def test_moved_images(small_coco, tmp_path):
    prepared = prepare_coco_detection(small_coco, tmp_path / "prepared", num_shards=2, progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(small_coco.parents[1] / "train2017", moved)
    dataset = load_prepared_coco_detection(tmp_path / "prepared", image_dir=moved)
    example = next(iter(dataset))
    assert example["image"].size == (example["width"], example["height"])
    paths = [e["image"]["path"] for e in dataset.cast_column("image", datasets.Image(decode=False)).take(3)]
    assert all(path.startswith(str(moved)) for path in paths)
    assert _objects_layout(dataset) == _objects_layout(load_prepared_coco_detection(prepared))


def test_not_prepared(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_coco_detection"):
        load_prepared_coco_detection(tmp_path)


def test_source_counts_match_pycocotools(coco128_dir):
    source = read_coco_detection(coco128_dir / "annotations.json")
    assert source.counts() == source.json_counts == _pycocotools_counts(coco128_dir / "annotations.json")
    assert np.count_nonzero(np.diff(source.annotation_offsets) == 0) == 2


@pytest.mark.slow
def test_benchmark_runs_at_reduced_size(tmp_path):
    """Smoke run of benchmarks/data_scale.py (every section) at 0.2% of COCO's size, 1 process x 1 worker."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "data_scale.py"
    command = [sys.executable, str(script), "--root", str(tmp_path), "--scale", "0.002", "--processes", "1"]
    command += ["--workers", "1", "--batches", "2", "--num-shards", "4", "--json", str(tmp_path / "report.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["prepare"]["counts"] == report["prepare"]["json_counts"]
    assert report["evaluation"]["numpy"]["identical"] and report["evaluation"]["pycocotools"]["identical"]
    assert report["loader_prepared"][0]["first_batch_s"] > 0 and report["loader_json"][0]["images_per_s"] > 0
    assert "## Evaluation at val2017 size" in result.stdout
