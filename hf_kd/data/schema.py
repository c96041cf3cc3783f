"""The common example layout of detection data, which every source yields:

- `image`: PIL image, RGB, EXIF orientation applied (decoded lazily by the `datasets.Image` feature);
- `image_id`, `width`, `height`: ints (`width`/`height` of the original image);
- `objects`: list of dicts with `bbox` ([x, y, w, h] in pixels, COCO convention), `category` (contiguous label
  0..C-1), `area`, `iscrowd` and `id` (annotation id).

Its `datasets.Features`, the classes (`DetectionCategories`), and the error raised on invalid data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from .validation import is_integer


class DetectionDataError(ValueError):
    """Detection data (an annotation file, an image or an example) is invalid; the message names where."""


@dataclass(frozen=True)
class DetectionCategories:
    """The classes of a detection dataset: contiguous label `i` is `names[i]`, dataset category id `category_ids[i]`."""

    names: tuple[str, ...]
    category_ids: tuple[int, ...]

    @classmethod
    def from_coco(cls, categories: Sequence[Mapping[str, Any]], source: str = "categories") -> DetectionCategories:
        """Builds the label mapping from COCO `categories` entries, ordered by category id."""
        seen_ids: dict[int, str] = {}
        for index, category in enumerate(categories):
            category_id, name = (
                (category.get("id"), category.get("name")) if isinstance(category, Mapping) else (None, None)
            )
            if not is_integer(category_id) or not isinstance(name, str):
                raise DetectionDataError(
                    f"{source}: categories[{index}] needs an integer 'id' and a string 'name', got {category!r}"
                )
            if category_id in seen_ids:
                raise DetectionDataError(
                    f"{source}: category id {category_id} is used twice ({seen_ids[category_id]!r} and {name!r})"
                )
            seen_ids[category_id] = name
        names = [seen_ids[i] for i in sorted(seen_ids)]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise DetectionDataError(f"{source}: category names must be unique, duplicated: {duplicated}")
        return cls(names=tuple(names), category_ids=tuple(sorted(seen_ids)))

    @classmethod
    def from_id2label(cls, id2label: Mapping[int, str]) -> DetectionCategories:
        """The classes of a dataset in the common layout (e.g. from a Hub dataset), its labels as category ids."""
        labels = sorted(id2label)
        return cls(names=tuple(id2label[label] for label in labels), category_ids=tuple(labels))

    @property
    def by_category_id(self) -> dict[int, str]:
        return dict(zip(self.category_ids, self.names))

    @property
    def num_labels(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: label for label, name in enumerate(self.names)}

    @property
    def label_to_category_id(self) -> dict[int, int]:
        return dict(enumerate(self.category_ids))


def check_same_categories(categories: Mapping[str, DetectionCategories]) -> None:
    """Raises a [`DetectionDataError`] listing every split's categories (`{id: name}`) unless all splits (named by
    the keys) have the same category ids with the same names: a model trained on one split and evaluated on another
    would otherwise be scored against other classes."""
    splits = list(categories.items())
    if any(other != splits[0][1] for _, other in splits[1:]):
        listed = "\n".join(f"  {split}: {split_categories.by_category_id}" for split, split_categories in splits)
        raise DetectionDataError(f"the splits' categories (id: name) differ:\n{listed}")


def detection_features(names: Sequence[str]) -> datasets.Features:
    """The `datasets.Features` of the common example layout, for the given class names."""
    return datasets.Features(
        {
            "image": datasets.Image(mode="RGB"),
            "image_id": datasets.Value("int64"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": datasets.List(
                {
                    "id": datasets.Value("int64"),
                    "bbox": datasets.List(datasets.Value("float64"), length=4),
                    "category": datasets.ClassLabel(names=list(names)),
                    "area": datasets.Value("float64"),
                    "iscrowd": datasets.Value("int64"),
                }
            ),
        }
    )


def get_id2label(features: datasets.Features | datasets.Dataset | datasets.IterableDataset) -> dict[int, str]:
    """`id2label` read from the `ClassLabel` of `objects.category` (datasets in the common example layout)."""
    if not isinstance(features, datasets.Features):
        features = features.features
    objects = features["objects"] if features is not None and "objects" in features else None
    category = None
    if isinstance(objects, datasets.List) and isinstance(objects.feature, dict):
        category = objects.feature.get("category")
    elif isinstance(objects, dict) and isinstance(objects.get("category"), datasets.List):
        category = objects["category"].feature
    if not isinstance(category, datasets.ClassLabel):
        raise DetectionDataError(f"features have no ClassLabel at objects.category: {features}")
    return dict(enumerate(category.names))
