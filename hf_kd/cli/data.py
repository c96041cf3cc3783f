"""The datasets of a run: the training split (streamed, prepared or in memory) and the evaluation and test splits with
their COCO ground truth, every split validated before training."""

from __future__ import annotations

import json
import logging

import datasets
from accelerate import PartialState

from ..data import (
    DetectionCategories,
    DetectionDataError,
    check_same_categories,
    find_coco_annotation_file,
    get_id2label,
    load_detection_dataset,
    load_prepared_coco_detection,
    prepare_coco_detection,
    read_coco_detection,
)
from ..distill import DistillationArguments
from ..metrics import build_coco_ground_truth
from .arguments import DataArguments

logger = logging.getLogger(__name__)

# The names of an evaluation split that `--eval_split` defaults to, in this order.
EVAL_SPLIT_NAMES = ("validation", "val")


def hub_load_kwargs(data_args: DataArguments, hub: dict | None = None) -> dict:
    """How a Hub dataset is read: its configuration and version, its columns and boxes, and the Hub access `hub`
    (`token`, `cache_dir`)."""
    return {
        "name": data_args.dataset_config_name,
        "revision": data_args.dataset_revision,
        "column_mapping": json.loads(data_args.column_mapping) if data_args.column_mapping else None,
        "box_format": data_args.box_format,
        "normalized_boxes": data_args.normalized_boxes,
        **(hub or {}),
    }


def validation_kwargs(data_args: DataArguments) -> dict:
    """How every split is validated: invalid entries raised or skipped, image files checked, a progress bar."""
    return {
        "on_invalid": "skip" if data_args.on_invalid == "skip" else "raise",
        "verify_images": data_args.verify_images,
        "progress": PartialState().is_local_main_process,
    }


def has_split(data_args: DataArguments, split: str, hub: dict | None = None) -> bool:
    """Whether the dataset (a COCO folder or a Hub dataset) has `split`."""
    if data_args.data_dir is not None:
        try:
            find_coco_annotation_file(data_args.data_dir, split)
        except FileNotFoundError:
            return False
        return True
    names = datasets.get_dataset_split_names(
        data_args.dataset_name, data_args.dataset_config_name, revision=data_args.dataset_revision, **(hub or {})
    )
    return split in names


def resolve_eval_split(data_args: DataArguments, hub: dict | None = None) -> str | None:
    """The evaluation split: `--eval_split` (empty: none), else the dataset's `validation` or `val` split; none with
    `--train_val_split`, which splits the training set instead."""
    if data_args.train_val_split is not None:
        if data_args.eval_split:
            raise ValueError("Give --eval_split or --train_val_split, not both.")
        return None
    if data_args.eval_split is not None:
        return data_args.eval_split or None
    found = next((split for split in EVAL_SPLIT_NAMES if has_split(data_args, split, hub)), None)
    if found is None:
        logger.warning(
            "%s has no evaluation split (%s): training without evaluation. Pass --eval_split NAME, or "
            "--train_val_split FRACTION to evaluate on part of the training split.",
            data_args.data_dir or data_args.dataset_name,
            " or ".join(EVAL_SPLIT_NAMES),
        )
    return found


def check_not_empty(
    dataset: datasets.Dataset | datasets.IterableDataset, where: str, data_args: DataArguments
) -> None:
    """Raises unless the dataset has an image (a streamed one is read up to its first example)."""
    if isinstance(dataset, datasets.Dataset):
        empty = len(dataset) == 0
    else:
        empty = next(iter(dataset.remove_columns("image").take(1)), None) is None
    if empty:
        skipped = " (after skipping the invalid ones, --on_invalid skip)" if data_args.on_invalid == "skip" else ""
        raise DetectionDataError(f"{where} has no images{skipped}: nothing to train on or evaluate.")


def log_split(
    role: str,
    where: str,
    dataset: datasets.Dataset | datasets.IterableDataset,
    counts: tuple[dict[str, int], dict[str, int]] | None = None,
) -> None:
    """Logs a one-line summary of a split: images, boxes, classes and, from the `(kept, written)` counts of a COCO
    folder, what was skipped."""
    num_classes = len(get_id2label(dataset))
    if counts is not None:
        counts, written = counts
        skipped = (
            f"; skipped {written['images'] - counts['images']:,} images, "
            f"{written['annotations'] - counts['annotations']:,} boxes"
        )
        sizes = f"{counts['images']:,} images, {counts['annotations']:,} boxes"
    elif isinstance(dataset, datasets.Dataset):
        skipped, sizes = "", f"{len(dataset):,} images, {sum(map(len, dataset['objects'])):,} boxes"
    else:
        skipped, sizes = "", "streamed"
    logger.info("%s split %s: %s, %d classes%s", role, where, sizes, num_classes, skipped)


def limit(dataset: datasets.Dataset | datasets.IterableDataset, count: int | None):
    """The first `count` images of `dataset` (all without a count)."""
    if count is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))


def load_evaluation_split(
    data_args: DataArguments,
    split: str,
    train_categories: dict[str, DetectionCategories] | None = None,
    hub: dict | None = None,
):
    """A map-style evaluation dataset and its COCO ground truth (the annotation file itself for a COCO folder without
    skipped entries), validated; with `train_categories` (the training split's, by its name), an error unless the
    split's categories are the same."""
    counts = None
    if data_args.data_dir is not None:
        source = read_coco_detection(
            find_coco_annotation_file(data_args.data_dir, split), **validation_kwargs(data_args)
        )
        dataset, categories, where = source.to_dataset(), source.categories, str(source.annotation_file)
        ground_truth = None if source.report.num_invalid else where
        counts = (source.counts(), source.json_counts)
    else:
        dataset = load_detection_dataset(
            data_args.dataset_name,
            split,
            streaming=False,
            **hub_load_kwargs(data_args, hub),
            **validation_kwargs(data_args),
        )
        categories = DetectionCategories.from_id2label(get_id2label(dataset))
        where, ground_truth = f"{data_args.dataset_name} split {split!r}", None
    if train_categories is not None:
        check_same_categories({**train_categories, where: categories})
    check_not_empty(dataset, where, data_args)
    log_split("Evaluation", where, dataset, counts)
    if data_args.max_eval_samples is not None:
        dataset, ground_truth = limit(dataset, data_args.max_eval_samples), None
    if ground_truth is None:
        ground_truth = build_coco_ground_truth(dataset.remove_columns("image"), get_id2label(dataset))
    return dataset, ground_truth


def load_training_split(data_args: DataArguments, training_args: DistillationArguments, hub: dict | None = None):
    """The training dataset (streamed, prepared into parquet shards, or map-style), its categories, its name, and
    the `(kept, written)` counts of a COCO folder. `--train_val_split` needs it map-style to split it."""
    validation = validation_kwargs(data_args)
    streaming = data_args.streaming and data_args.train_val_split is None
    if data_args.prepared_dir is not None:
        if data_args.data_dir is None:
            raise ValueError("--prepared_dir prepares a local COCO folder: give --data_dir.")
        if data_args.train_val_split is not None:
            raise ValueError("--train_val_split splits a map-style training set: not with --prepared_dir.")
        annotation_file = find_coco_annotation_file(data_args.data_dir, data_args.train_split)
        with training_args.main_process_first(desc="preparing the training set"):  # the others reuse its shards
            prepared = prepare_coco_detection(
                annotation_file,
                data_args.prepared_dir,
                num_shards=data_args.num_shards,
                split=data_args.train_split,
                **validation,
            )
        counts = (prepared.counts, prepared.json_counts)
        return load_prepared_coco_detection(prepared), prepared.categories, str(annotation_file), counts
    if data_args.data_dir is not None:
        source = read_coco_detection(
            find_coco_annotation_file(data_args.data_dir, data_args.train_split), **validation
        )
        if streaming and data_args.max_train_samples is None:
            dataset = source.to_iterable_dataset(data_args.num_shards)
        else:
            dataset = source.to_dataset()  # the first --max_train_samples images, sampled as any map-style dataset
        return dataset, source.categories, str(source.annotation_file), (source.counts(), source.json_counts)
    dataset = load_detection_dataset(
        data_args.dataset_name,
        data_args.train_split,
        streaming=streaming,
        **hub_load_kwargs(data_args, hub),
        **validation,
    )
    categories = DetectionCategories.from_id2label(get_id2label(dataset))
    return dataset, categories, f"{data_args.dataset_name} split {data_args.train_split!r}", None


def load_data(data_args: DataArguments, training_args: DistillationArguments, hub: dict | None = None):
    """Training and evaluation datasets, `id2label`, the evaluation ground truth (COCO json path or dict) and the
    test split's `(dataset, ground truth)` (or None); `hub` holds the Hub access arguments (`token`, `cache_dir`).

    Every split is validated before training (images checked with `--verify_images`, invalid entries raised or
    skipped as `--on_invalid` says); an empty split, or splits with other categories, are errors. Each split's size is
    logged.
    """
    if (data_args.data_dir is None) == (data_args.dataset_name is None):
        raise ValueError("Give exactly one of --data_dir (local COCO folder) and --dataset_name (Hub dataset).")
    eval_split = resolve_eval_split(data_args, hub)
    train_dataset, categories, where, counts = load_training_split(data_args, training_args, hub)
    check_not_empty(train_dataset, where, data_args)
    log_split("Training", where, train_dataset, counts)
    eval_dataset = ground_truth = test_split = None
    if data_args.train_val_split is not None:
        parts = train_dataset.train_test_split(test_size=data_args.train_val_split, seed=training_args.seed)
        train_dataset, eval_dataset = parts["train"], limit(parts["test"], data_args.max_eval_samples)
        logger.info(
            "--train_val_split %s: training on %d images, evaluating on %d",
            data_args.train_val_split,
            len(train_dataset),
            len(eval_dataset),
        )
        ground_truth = build_coco_ground_truth(eval_dataset.remove_columns("image"), get_id2label(eval_dataset))
    elif eval_split:
        eval_dataset, ground_truth = load_evaluation_split(data_args, eval_split, {where: categories}, hub)
    if data_args.test_split:
        test_split = load_evaluation_split(data_args, data_args.test_split, {where: categories}, hub)
    train_dataset = limit(train_dataset, data_args.max_train_samples)
    if isinstance(train_dataset, datasets.IterableDataset):
        train_dataset = train_dataset.shuffle(seed=training_args.seed, buffer_size=1000)
    return train_dataset, eval_dataset, get_id2label(train_dataset), ground_truth, test_split
