"""The synthetic COCO-format dataset generator."""

import contextlib
import io
import json

import numpy as np
import PIL.Image
from pycocotools.coco import COCO

from hf_kd.data import load_coco_detection, read_coco_detection
from hf_kd.data.synthetic import CLASS_NAMES, generate_synthetic_coco, main


def _files(root):
    return {path.relative_to(root): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path):
    first = generate_synthetic_coco(tmp_path / "a", num_images=10, seed=5, image_size=96)
    generate_synthetic_coco(tmp_path / "b", num_images=10, seed=5, image_size=96)
    generate_synthetic_coco(tmp_path / "c", num_images=10, seed=6, image_size=96)
    assert sorted(first) == ["train", "val"]
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")
    assert len(_files(tmp_path / "a")) == 12  # 10 images + 2 json


def test_a_real_coco_folder_with_varied_hard_scenes(tmp_path):
    paths = generate_synthetic_coco(tmp_path, num_images=60, seed=0, val_fraction=0.25)
    with contextlib.redirect_stdout(io.StringIO()):
        train, val = COCO(str(paths["train"])), COCO(str(paths["val"]))
    assert len(train.imgs) == 45 and len(val.imgs) == 15 and not set(train.imgs) & set(val.imgs)
    assert [train.cats[c]["name"] for c in sorted(train.cats)] == list(CLASS_NAMES)

    source = read_coco_detection(paths["train"], verify_images=True)  # files present, decodable, sizes right
    assert sum(source.report.counts.values()) == 0  # and every box inside its image, with area
    annotations = list(train.anns.values()) + list(val.anns.values())
    areas = np.array([a["area"] for a in annotations])
    assert {a["category_id"] for a in annotations} == set(range(1, 7))
    assert (
        (areas < 32**2).sum() > 50 and ((areas >= 32**2) & (areas < 96**2)).sum() > 20 and (areas >= 96**2).sum() > 0
    )
    assert any(a["iscrowd"] for a in annotations)  # heavily occluded or truncated objects are ignore regions
    box_areas = np.array([a["bbox"][2] * a["bbox"][3] for a in annotations])
    assert (areas < 0.6 * box_areas).sum() > 20  # occluded and non-rectangular objects
    sizes = {(image["width"], image["height"]) for image in train.imgs.values()}
    assert len(sizes) > 10  # aspect ratios vary
    objects_per_image = [len(train.getAnnIds(imgIds=[i])) for i in train.imgs]
    assert max(objects_per_image) >= 8
    image = PIL.Image.open(tmp_path / "images" / train.imgs[1]["file_name"])
    assert image.format == "JPEG" and image.mode == "RGB"

    dataset = load_coco_detection(tmp_path, split="val")
    assert len(list(dataset.remove_columns("image"))) == 15


def test_command_line(tmp_path, capsys):
    main(["--out", str(tmp_path), "--num-images", "5", "--seed", "1", "--image-size", "64", "--val-fraction", "0.4"])
    output = capsys.readouterr().out
    assert "train: 3 images" in output and "val: 2 images" in output
    assert len(json.loads((tmp_path / "instances_val.json").read_text())["images"]) == 2
