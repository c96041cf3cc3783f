"""ONNX export (`hf_kd.export`): for every detector family, onnxruntime on a real photo followed by the numpy
post-processing gives PyTorch's detections; the command line writes a file that takes any batch and image size; the
numpy post-processing alone gives the PyTorch post-processing's detections. The export tests skip without the
`export` extra (onnx, onnxruntime, onnxscript)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_utils import TINY_LABELS
from PIL import Image

from hf_kd.export import DetectionPostProcessor, export_onnx, main
from hf_kd.export.exporter import post_processing_settings
from hf_kd.export.numpy_postprocess import detect
from hf_kd.models.detection import FAMILIES, DenseDetectionOutput
from hf_kd.models.detection.postprocess import detect as torch_detect

# The image processor's resize target for the photos: a 640x480 (width x height) photo becomes 213x160, padded to
# 224x160.
PROCESSOR_SIZE = {"shortest_edge": 160, "longest_edge": 256}
PHOTOS = ("000000000009.jpg", "000000000036.jpg", "000000000049.jpg")  # landscape, portrait, portrait
BOX_ATOL = 1e-3  # pixels
SCORE_ATOL = 1e-4
# RetinaNet's head has no norm: with the default init (std 0.01) its logits are ~1e-5 and its scores, all ~0.5, tie in
# float32; std 0.05 gives its logits the spread of the other families' (std ~0.1).
CONFIG_KWARGS = {"retinanet": {"initializer_range": 0.05}}


def tiny_detector(family: str, seed: int = 0, width: int = 32):
    """A small random detector of `family` in eval mode whose scores are spread around 0.5 (classifier bias 0), so
    that post-processing has detections to compare; two convs per head tower (not 4) keep its exports quick."""
    config_class, model_class, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(
        backbone="resnet18",
        id2label=TINY_LABELS,
        fpn_channels=width,
        head_channels=width,
        stacked_convs=2,
        **CONFIG_KWARGS.get(family, {}),
    )
    model = model_class(config)
    with torch.no_grad():
        model.head.classifier.bias.zero_()
    return model.eval()


@pytest.fixture(scope="module")
def onnxruntime():
    """onnxruntime, with the exporter's packages; the test skips (with the reason) without the `export` extra."""
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name, reason=f'{name} is not installed (pip install "hf_kd[export]")')
    return pytest.importorskip("onnxruntime", reason='onnxruntime is not installed (pip install "hf_kd[export]")')


def photos(coco128_dir, names: tuple[str, ...]) -> list[Image.Image]:
    return [Image.open(coco128_dir / "images" / name).convert("RGB") for name in names]


def run_onnx(session, inputs) -> dict[str, np.ndarray]:
    """The ONNX file's outputs by name for the image processor's `inputs`."""
    values = session.run(None, {name: inputs[name].numpy() for name in ("pixel_values", "pixel_mask")})
    return dict(zip([output.name for output in session.get_outputs()], values))


def assert_same_detections(results, reference_results, best_first: bool = True) -> None:
    """Per image, as many detections (at least one), each with a counterpart of the same label, box within
    `BOX_ATOL` px and score within `SCORE_ATOL` (scores closer than that may come in either order), best first unless
    `best_first` is False."""
    assert len(results) == len(reference_results)
    for image, (result, reference) in enumerate(zip(results, reference_results)):
        reference = {name: value.numpy() for name, value in reference.items()}
        assert len(reference["labels"]) > 0, f"image {image}: no detections to compare"
        assert len(result["labels"]) == len(reference["labels"]), f"image {image}"
        assert not best_first or (np.diff(result["scores"]) <= 0).all(), f"image {image}: not best first"
        unmatched = list(range(len(result["labels"])))
        for index, (label, box, score) in enumerate(zip(reference["labels"], reference["boxes"], reference["scores"])):
            match = next(
                (
                    other
                    for other in unmatched
                    if result["labels"][other] == label
                    and np.abs(result["boxes"][other] - box).max() <= BOX_ATOL
                    and abs(result["scores"][other] - score) <= SCORE_ATOL
                ),
                None,
            )
            assert match is not None, f"image {image}: no counterpart of detection {index} ({label}, {box}, {score})"
            unmatched.remove(match)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_onnx_gives_pytorch_detections(family, onnxruntime, coco128_dir, tmp_path):
    """A fixed-size export of each family on a real photo: the same detections as PyTorch, the model unchanged."""
    model = tiny_detector(family).train()
    modes = {name: module.training for name, module in model.named_modules()}
    state = {name: value.clone() for name, value in model.state_dict().items()}
    processor = FAMILIES[family][2](size=PROCESSOR_SIZE)
    images = photos(coco128_dir, PHOTOS[:1])
    inputs = processor(images, return_tensors="pt")
    image_size = tuple(inputs["pixel_values"].shape[-2:])

    path = export_onnx(model, tmp_path / f"{family}.onnx", image_size, batch_size=1, image_processor=processor)

    assert {name: module.training for name, module in model.named_modules()} == modes
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [value.shape for value in session.get_inputs()] == [[1, 3, *image_size], [1, *image_size]]
    post_processor = DetectionPostProcessor.from_metadata(session.get_modelmeta().custom_metadata_map)
    assert post_processor.nms_iou_threshold == processor.nms_iou_threshold
    assert post_processor.id2label == TINY_LABELS
    target_sizes = [image.size[::-1] for image in images]
    onnx_results = post_processor.post_process_object_detection(
        run_onnx(session, inputs), threshold=0.05, target_sizes=target_sizes
    )
    with torch.no_grad():
        outputs = model.eval()(**inputs)
    torch_results = processor.post_process_object_detection(outputs, threshold=0.05, target_sizes=target_sizes)
    assert_same_detections(onnx_results, torch_results)


def test_command_line_export_takes_any_size(onnxruntime, coco128_dir, tmp_path, capsys):
    """`python -m hf_kd.export MODEL_DIR OUT.onnx` (RetinaNet: several anchors per location) writes a file with a
    dynamic batch, height and width: a batch of two photos and a photo of another size give PyTorch's detections."""
    model = tiny_detector("retinanet")
    processor = FAMILIES["retinanet"][2](size=PROCESSOR_SIZE)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")

    assert main([str(tmp_path / "model"), str(tmp_path / "retinanet.onnx")]) == 0

    printed = capsys.readouterr().out
    assert printed.startswith(f"Wrote {tmp_path / 'retinanet.onnx'}"), printed
    session = onnxruntime.InferenceSession(str(tmp_path / "retinanet.onnx"), providers=["CPUExecutionProvider"])
    assert [value.shape for value in session.get_inputs()] == [
        ["batch", 3, "32*height_blocks", "32*width_blocks"],
        ["batch", "32*height_blocks", "32*width_blocks"],
    ]
    post_processor = DetectionPostProcessor.from_metadata(session.get_modelmeta().custom_metadata_map)
    for names in (PHOTOS[:2], PHOTOS[2:]):
        images = photos(coco128_dir, names)
        inputs = processor(images, return_tensors="pt")
        target_sizes = [image.size[::-1] for image in images]
        onnx_results = post_processor.post_process_object_detection(
            run_onnx(session, inputs), threshold=0.05, target_sizes=target_sizes
        )
        with torch.no_grad():
            torch_results = processor.post_process_object_detection(
                model(**inputs), threshold=0.05, target_sizes=target_sizes
            )
        assert_same_detections(onnx_results, torch_results)


def random_outputs(with_centerness: bool, seed: int = 0) -> DenseDetectionOutput:
    """Raw outputs of a batch of two images (120x160 and 96x128 inside a 128x160 padding) on five levels: scores
    around the thresholds, boxes of all sizes, some beyond the image or empty after clipping."""
    generator = torch.Generator().manual_seed(seed)
    level_sizes = [320, 80, 20, 6, 2]
    num_priors = sum(level_sizes)
    centers = torch.rand(2, num_priors, 2, generator=generator) * torch.tensor([180.0, 140.0]) - 10
    sizes = torch.rand(2, num_priors, 2, generator=generator) * 60
    return DenseDetectionOutput(
        logits=torch.randn(2, num_priors, 3, generator=generator) - 2,
        pred_boxes=torch.cat([centers - sizes / 2, centers + sizes / 2], dim=-1),
        centerness_logits=torch.randn(2, num_priors, generator=generator) if with_centerness else None,
        image_sizes=torch.tensor([[120, 160], [96, 128]]),
        feature_maps=tuple(torch.empty(2, 1, 1, size) for size in level_sizes),  # one prior per location
    )


def as_numpy(outputs: DenseDetectionOutput) -> dict[str, np.ndarray]:
    """The outputs as the ONNX file gives them."""
    level_sizes = [feature.shape[-1] for feature in outputs.feature_maps]
    names = ("logits", "pred_boxes", "centerness_logits", "image_sizes")
    return {name: outputs[name].numpy() for name in names if name in outputs} | {"level_sizes": np.array(level_sizes)}


@pytest.mark.parametrize("with_centerness", [False, True], ids=["scores", "centerness"])
@pytest.mark.parametrize(
    "settings",
    [
        {"threshold": 0.05},
        {"threshold": 0.3, "nms_iou_threshold": 0.5, "target_sizes": [(480, 640), (300, 400)]},
        {"threshold": 0.0, "candidate_threshold": 0.05, "max_detections": 20},
        {"threshold": 0.05, "pre_nms_topk": 7},
    ],
    ids=["default", "rescaled", "evaluation", "topk"],
)
def test_numpy_post_processing_matches_pytorch(settings, with_centerness):
    """The numpy post-processing gives the image processor's detections (no onnx needed)."""
    outputs = random_outputs(with_centerness)
    processor = FAMILIES["gfl"][2]()
    post_processor = DetectionPostProcessor(**post_processing_settings(processor))
    assert_same_detections(
        post_processor.post_process_object_detection(as_numpy(outputs), **settings),
        processor.post_process_object_detection(outputs, **settings),
    )


def test_numpy_detect_without_nms_matches_pytorch():
    """Without NMS (MMDetection's `with_nms=False`): the same candidates in the same order (level by level, each by
    class score)."""
    outputs = random_outputs(with_centerness=True)
    arrays = as_numpy(outputs)
    names = ("logits", "pred_boxes", "image_sizes")
    sizes = arrays["level_sizes"].tolist()
    results = detect(*(arrays[name] for name in names), sizes, arrays["centerness_logits"], nms_iou_threshold=None)
    reference_results = torch_detect(
        *(outputs[name] for name in names), sizes, outputs.centerness_logits, nms_iou_threshold=None
    )
    for result, reference in zip(results, reference_results):
        assert len(reference["labels"]) > 0
        np.testing.assert_array_equal(result["labels"], reference["labels"].numpy())
        np.testing.assert_allclose(result["boxes"], reference["boxes"].numpy(), rtol=0, atol=BOX_ATOL)
        np.testing.assert_allclose(result["scores"], reference["scores"].numpy(), rtol=0, atol=SCORE_ATOL)
