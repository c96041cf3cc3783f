"""ONNX export of the dense detectors (GFL, RetinaNet, FCOS, ATSS), with their post-processing in numpy.

    pip install "hf_kd[export]"
    python -m hf_kd.export MODEL_DIR OUT.onnx [--height H --width W] [--batch_size N] [--opset N]

or `export_onnx(model, "student.onnx", image_processor=processor)` in Python. `MODEL_DIR` is a `save_pretrained`
folder of the detector and its image processor.

**The graph** is the detector's forward pass (backbone, FPN, head, priors, box decoding), from the image processor's
outputs to raw per-prior outputs; the post-processing is not in it. That is a data-dependent loop (candidates per
level, greedy NMS with MMCV's coordinate offsets and torchvision's order) whose exact decisions ONNX's
`NonMaxSuppression` does not promise, so it is done on the outputs by [`DetectionPostProcessor`], in numpy.

- Inputs: `pixel_values` `(batch, 3, height, width)` float32 and `pixel_mask` `(batch, height, width)` bool (True on
  real pixels): `image_processor(images, return_tensors="np")`.
- Input sizes: by default any batch size, and any height and width that are multiples of the image processor's
  `size_divisor` larger than the coarsest stride, 128 (160, 192, ... for 32: the sizes the processor pads to).
  `image_size=(H, W)` (`--height H --width W`) fixes the size: pad every image to exactly that (zeros in
  `pixel_values`, False in `pixel_mask`). `batch_size` fixes the batch size. A fixed size exports faster.
- Outputs: `logits` `(batch, Q, num_labels)` (sigmoid = class score), `pred_boxes` `(batch, Q, 4)` (x1, y1, x2, y2 in
  pixels of the input, not clipped), `centerness_logits` `(batch, Q)` (FCOS and ATSS only), `image_sizes`
  `(batch, 2)` int64 (height, width of each image inside the padding) and `level_sizes` `(5,)` int64 (priors per
  pyramid level; `Q` is their sum).
- Metadata (onnxruntime's `session.get_modelmeta().custom_metadata_map`): `hf_kd.post_processing` (JSON of the
  image processor's `candidate_threshold`, `pre_nms_topk`, `nms_iou_threshold`, `max_detections`),
  `hf_kd.id2label` (JSON) and `hf_kd.model_type`.

**The post-processing step** is [`DetectionPostProcessor.post_process_object_detection`], the image processor's
method of that name in numpy (same arguments, same detections: MMDetection's score threshold and per-level top-k,
clipping, centre-ness, class-aware NMS, detection cap, threshold, rescaling). Its file,
`hf_kd/export/numpy_postprocess.py`, needs numpy only: copy it for a deployment without torch.

    import onnxruntime
    from hf_kd.export import DetectionPostProcessor

    session = onnxruntime.InferenceSession("student.onnx")
    post_processor = DetectionPostProcessor.from_metadata(session.get_modelmeta().custom_metadata_map)
    inputs = image_processor(images, return_tensors="np")
    values = session.run(None, {"pixel_values": inputs["pixel_values"], "pixel_mask": inputs["pixel_mask"]})
    outputs = dict(zip([output.name for output in session.get_outputs()], values))
    detections = post_processor.post_process_object_detection(
        outputs, threshold=0.3, target_sizes=[image.size[::-1] for image in images]
    )

Exporting traces the model with `torch.export`: with dynamic sizes this takes tens of seconds on a CPU. The model is
left unchanged (weights and train/eval modes).
"""

from .exporter import RawDetectionOutputs, export_onnx, main
from .numpy_postprocess import DetectionPostProcessor

__all__ = ["DetectionPostProcessor", "RawDetectionOutputs", "export_onnx", "main"]
