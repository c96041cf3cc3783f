"""Detection transforms and the collator: output contract, parity with the image processor, determinism, clipping."""

import gc
import logging
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from hf_kd.data import DetectionCollator, DetectionDataError, DetectionTransform, read_coco_detection
from hf_kd.data import collator as collator_module
from hf_kd.data.synthetic import generate_synthetic_coco
from hf_kd.models.detection.image_processing_dense import GFLImageProcessor, get_resize_output_size


@pytest.fixture(scope="module")
def processor():
    return GFLImageProcessor(size={"shortest_edge": 320, "longest_edge": 512})


@pytest.fixture(scope="module")
def synthetic_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    paths = generate_synthetic_coco(root, num_images=24, seed=3, image_size=96, val_fraction=0.25)
    return read_coco_detection(paths["train"])


def _examples(source, count=None):
    return list(source.to_iterable_dataset())[:count]


def _example(width=64, height=48, objects=(), image_id=7):
    image = PIL.Image.fromarray(np.random.default_rng(image_id).integers(0, 256, (height, width, 3), dtype=np.uint8))
    return {"image": image, "image_id": image_id, "width": width, "height": height, "objects": list(objects)}


def _object(bbox, category=1, iscrowd=0):
    return {"id": 1, "bbox": list(bbox), "category": category, "area": bbox[2] * bbox[3], "iscrowd": iscrowd}


def test_eval_collator_contract_and_processor_parity(coco128_dir, processor):
    source = read_coco_detection(coco128_dir / "annotations.json")
    examples = _examples(source, 6)
    batch = DetectionCollator(processor)(examples)
    assert set(batch) == {"pixel_values", "pixel_mask", "labels"}
    pixel_values, pixel_mask = batch["pixel_values"], batch["pixel_mask"]
    assert pixel_values.dtype == torch.float32 and pixel_mask.dtype == torch.bool
    assert pixel_values.shape[0] == 6 and pixel_values.shape[-2] % 32 == 0 and pixel_values.shape[-1] % 32 == 0

    annotations = [
        {"image_id": e["image_id"], "annotations": [{**o, "category_id": o["category"]} for o in e["objects"]]}
        for e in examples
    ]
    for index, (example, labels) in enumerate(zip(examples, batch["labels"])):
        assert set(labels) == {"boxes", "class_labels", "image_id", "orig_size", "size"}
        height, width = get_resize_output_size(example["height"], example["width"], 320, 512)
        assert labels["size"].tolist() == [height, width]
        assert labels["orig_size"].tolist() == [example["height"], example["width"]]
        assert labels["image_id"].dtype == torch.int64 and labels["image_id"].ndim == 0
        assert labels["boxes"].dtype == torch.float32 and labels["class_labels"].dtype == torch.int64
        assert int(pixel_mask[index].sum()) == height * width and pixel_mask[index, :height, :width].all()
        alone = processor(images=[example["image"]], annotations=[annotations[index]], return_tensors="pt")
        assert torch.equal(pixel_values[index, :, :height, :width], alone["pixel_values"][0, :, :height, :width])
        assert torch.allclose(labels["boxes"], alone["labels"][0]["boxes"], atol=1e-4)
        assert torch.equal(labels["class_labels"], alone["labels"][0]["class_labels"])
        expected = torch.tensor([o["bbox"] for o in example["objects"]], dtype=torch.float64).reshape(-1, 4)
        expected[:, 2:] += expected[:, :2]
        expected *= torch.tensor([width / example["width"], height / example["height"]] * 2, dtype=torch.float64)
        assert torch.allclose(labels["boxes"].double(), expected, atol=1e-4)


def test_empty_image_and_crowd_regions(processor):
    crowd = _example(objects=[_object((1, 1, 10, 10), iscrowd=1), _object((5, 5, 20, 10), category=2)])
    empty = _example(image_id=8)
    transform = DetectionTransform(shortest_edge=48, longest_edge=100)
    batch = DetectionCollator(processor, transform)([crowd, empty])
    assert batch["labels"][0]["boxes"].tolist() == [[5.0, 5.0, 25.0, 15.0]]
    assert batch["labels"][0]["class_labels"].tolist() == [2]
    assert batch["labels"][1]["boxes"].shape == (0, 4) and batch["labels"][1]["class_labels"].shape == (0,)
    assert transform.stats["crowd_regions"] == 1 and transform.stats["boxes"] == 1


def test_clipping_counts_and_logs_removed_boxes(caplog):
    objects = [_object((50, 40, 30, 20)), _object((70, 60, 5, 5)), _object((10, 10, 0, 5)), _object((1, 2, 3, 4))]
    transform = DetectionTransform(shortest_edge=48, longest_edge=64)
    with caplog.at_level(logging.WARNING):
        labels = transform(_example(objects=objects))["labels"]
    assert labels["boxes"].tolist() == [[50.0, 40.0, 64.0, 48.0], [1.0, 2.0, 4.0, 6.0]]
    assert transform.stats["clipped_boxes"] == 1 and transform.stats["removed_boxes"] == 2
    assert "image id 7: removed 2 box(es)" in caplog.text


def test_size_mismatch_is_an_error():
    example = _example()
    example["width"] = 50
    with pytest.raises(DetectionDataError, match="image id 7: decoded image is 64x48 but the annotations say 50x48"):
        DetectionTransform()(example)


def test_flip_and_multiscale():
    example = _example(width=80, height=40, objects=[_object((10, 5, 20, 10))])
    plain = DetectionTransform(shortest_edge=40, longest_edge=200)(example)
    flipped = DetectionTransform(shortest_edge=40, longest_edge=200, flip_prob=1.0)(example)
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert flipped["labels"]["boxes"].tolist() == [[50.0, 5.0, 70.0, 15.0]]

    multiscale = DetectionTransform(shortest_edge=(20, 60), longest_edge=100, seed=1)
    sizes = set()
    for epoch in range(12):
        multiscale.set_epoch(epoch)
        size = multiscale(example)["labels"]["size"].tolist()
        assert 20 <= size[0] <= 60 and size[1] <= 100 and size[1] == 2 * size[0]  # aspect ratio kept, longest capped
        sizes.add(size[0])
    assert len(sizes) > 3


def test_photometric_jitter_changes_pixels_not_boxes():
    example = _example(objects=[_object((5, 5, 20, 10))])
    plain = DetectionTransform(shortest_edge=48)(example)
    jitter = DetectionTransform(shortest_edge=48, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    jittered = jitter(example)
    assert jittered["image"].dtype == torch.uint8 and not torch.equal(jittered["image"], plain["image"])
    assert torch.equal(jittered["labels"]["boxes"], plain["labels"]["boxes"])
    assert torch.equal(jitter(example)["image"], jittered["image"])


def _train_transform(seed=0):
    return DetectionTransform(
        shortest_edge=(64, 128), longest_edge=160, flip_prob=0.5, brightness=0.2, hue=0.05, seed=seed
    )


def _outputs_by_image(loader):
    outputs = {}
    for batch in loader:
        for index, labels in enumerate(batch["labels"]):
            height, width = labels["size"].tolist()
            outputs[int(labels["image_id"])] = (labels["boxes"], batch["pixel_values"][index, :, :height, :width])
    return outputs


def test_training_batches_are_deterministic_across_workers_and_change_with_epoch(synthetic_source, processor):
    dataset = synthetic_source.to_iterable_dataset(num_shards=4)

    def run(num_workers, epoch, seed=0):
        collator = DetectionCollator(processor, _train_transform(seed))
        collator.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=num_workers, collate_fn=collator)
        return _outputs_by_image(loader)

    single, workers = run(0, epoch=0), run(2, epoch=0)
    assert sorted(single) == sorted(workers) == sorted(int(i) for i in synthetic_source.image_ids)
    for image_id, (boxes, pixels) in single.items():
        assert torch.equal(boxes, workers[image_id][0]) and torch.equal(pixels, workers[image_id][1])

    next_epoch, other_seed = run(0, epoch=1), run(0, epoch=0, seed=1)
    for other in (next_epoch, other_seed):
        assert any(
            single[i][1].shape != other[i][1].shape or not torch.equal(single[i][1], other[i][1]) for i in single
        )


class _WorkerMemoryProbe(DetectionCollator):
    def __call__(self, examples):
        batch = super().__call__(examples)
        return {**batch, "configured": collator_module._worker_memory_configured, "frozen": gc.get_freeze_count()}


def test_workers_configure_their_memory_when_asked_and_the_main_process_is_left_alone(synthetic_source, processor):
    dataset = synthetic_source.to_iterable_dataset(num_shards=2)
    frozen_before = gc.get_freeze_count()

    def probe(num_workers, **kwargs):
        collator = _WorkerMemoryProbe(processor, **kwargs)
        loader = torch.utils.data.DataLoader(dataset, 4, num_workers=num_workers, collate_fn=collator)
        return [(batch["configured"], batch["frozen"]) for batch in loader]

    # by default a collator call leaves every process as it is, workers included (a worker's count of frozen objects
    # only drops, as frozen objects it inherited are freed, should this process have frozen some)
    assert all(not configured and frozen <= frozen_before for configured, frozen in probe(num_workers=2))
    # asked for, the objects inherited from this process are frozen: a worker's full collections never copy their pages
    in_workers = probe(num_workers=2, configure_workers=True)
    assert in_workers and all(configured and frozen > 10_000 for configured, frozen in in_workers)
    # in the main process nothing is frozen (the count may only drop, as frozen objects an earlier test left are freed)
    assert all(not configured and frozen <= frozen_before for configured, frozen in probe(0, configure_workers=True))
    assert not collator_module._worker_memory_configured and gc.get_freeze_count() <= frozen_before


_TRAINING_PROCESS_PROBE = """
import gc, pyarrow, torch
from hf_kd.data import configure_training_process_memory

class AllocatorName(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield pyarrow.default_memory_pool().backend_name

configure_training_process_memory()
assert gc.get_freeze_count() > 10_000, gc.get_freeze_count()
loader = torch.utils.data.DataLoader(AllocatorName(), batch_size=None, num_workers=1, multiprocessing_context="fork")
print(list(loader))
"""  # a fresh process: the settings are process-wide


def test_training_process_configuration_reaches_forked_workers():
    result = subprocess.run([sys.executable, "-c", _TRAINING_PROCESS_PROBE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['system']"
    assert "leaked" not in result.stderr  # nanobind's report when frozen objects outlive the interpreter
