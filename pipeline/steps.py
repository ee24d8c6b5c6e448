"""The image -> JSON pipeline around a runtime, without torch: decode, prepare, post-process, encode.

Used by the HTTP service (each step in a worker thread), ``m2f predict`` and ``m2f eval``, so all three
produce the same results from the same logits.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from pipeline import encoding
from pipeline import postprocess as post
from pipeline.config import Mask2FormerConfig
from pipeline.postprocess import TASKS
from pipeline.processing import load_image, preprocess, resize_shape

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "TIFF"})

Size = tuple[int, int]


class Prepared(NamedTuple):
    pixels: np.ndarray  # (3, h, w) float32 normalized, zero-padded to the size divisor
    resized_size: Size  # (h, w) of the image inside ``pixels``
    original_size: Size  # (H, W) of the decoded image


def default_task(config: Mask2FormerConfig) -> str:
    """Panoptic for a model with things and stuff, instance when all labels are things, else semantic."""
    things = len(config.thing_ids & set(config.id2label))
    if things == 0:
        return "semantic"
    return "instance" if things == config.num_labels else "panoptic"


def decode(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Encoded JPEG/PNG/WebP/BMP/TIFF bytes -> RGB image (see :func:`pipeline.processing.load_image`).

    Raises:
        pipeline.processing.UnsupportedImageFormat: not an image, or a format we do not accept.
        pipeline.processing.ImageTooLarge: more than ``max_pixels`` pixels (read from the header).
        ValueError / OSError: zero-size, truncated or corrupt data.
    """
    return load_image(data, formats=ALLOWED_FORMATS, max_pixels=max_pixels)


def header_size(data: bytes) -> Size | None:
    """(height, width) of encoded image bytes, read from the header without decoding; None when unreadable
    (:func:`decode` then says why)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width
    except Exception:  # noqa: BLE001 - any failure here is decode's to report
        return None


def padded_pixels(size: Size, config: Mask2FormerConfig, fixed_size: Size | None = None) -> int:
    """Pixels of the model input an image of ``size`` (h, w) takes: resized the checkpoint's way, padded to the
    size divisor (a fixed-shape graph: its shape)."""
    if fixed_size is not None:
        return fixed_size[0] * fixed_size[1]
    pre = config.preprocess
    h, w = resize_shape(*size, pre.shortest_edge, pre.longest_edge)
    d = max(pre.size_divisor, 1)
    return (-(-h // d) * d) * (-(-w // d) * d)


def prepare(image: Image.Image, config: Mask2FormerConfig, fixed_size: Size | None = None) -> Prepared:
    """Resize and normalize one image the checkpoint's way; with a fixed graph size, scale down to fit it."""
    pre = config.preprocess
    w, h = image.size
    if fixed_size is not None:
        rh, rw = resize_shape(h, w, pre.shortest_edge, pre.longest_edge)
        scale = min(fixed_size[0] / rh, fixed_size[1] / rw, 1.0)
        if scale < 1.0:  # resize straight to the fitting size, then leave preprocessing's resize a no-op
            fh, fw = max(int(rh * scale), 1), max(int(rw * scale), 1)
            image = image.resize((fw, fh), Image.Resampling.BILINEAR)
            pre = replace(pre, shortest_edge=min(fh, fw), longest_edge=0)
    batch = preprocess([image], pre)
    return Prepared(batch.pixel_values[0], batch.resized_sizes[0], (h, w))


def postprocess(
    task: str,
    config: Mask2FormerConfig,
    class_logits: np.ndarray,
    mask_logits: np.ndarray,
    resized_sizes: Sequence[Size],
    original_sizes: Sequence[Size],
    threshold: float | None = None,
    overlap_mask_area_threshold: float | None = None,
    max_instances: int = 100,
) -> list[Any]:
    """Batch logits -> one result per image: a label map (semantic), an InstanceRLEs or a PanopticResult.

    ``threshold`` and ``overlap_mask_area_threshold`` default to the checkpoint's (``config.postprocess_kwargs``).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    kwargs = config.postprocess_kwargs(task)  # the checkpoint's defaults (the official ones where it has them)
    if threshold is not None and task in ("panoptic", "instance"):
        kwargs["threshold"] = threshold
    if overlap_mask_area_threshold is not None and task == "panoptic":
        kwargs["overlap_mask_area_threshold"] = overlap_mask_area_threshold
    if task == "instance":
        kwargs["max_instances"] = max_instances
    fn = {
        "panoptic": post.panoptic_segmentation,
        "instance": post.instance_rles,
        "semantic": post.semantic_segmentation,
    }[task]
    return fn(class_logits, mask_logits, resized_sizes, original_sizes, **kwargs)


def answer(
    task: str,
    config: Mask2FormerConfig,
    prepared: Prepared,
    class_logits: np.ndarray,
    mask_logits: np.ndarray,
    threshold: float | None = None,
    overlap_mask_area_threshold: float | None = None,
    max_instances: int = 100,
    png: bool = False,
) -> dict[str, Any]:
    """One image's logits (Q, K+1) and (Q, h, w) -> the JSON answer (without timings).

    Parameters a task does not use are ignored (see :func:`postprocess`).
    """
    result = postprocess(
        task,
        config,
        class_logits[None],
        mask_logits[None],
        [prepared.resized_size],
        [prepared.original_size],
        threshold=threshold,
        overlap_mask_area_threshold=overlap_mask_area_threshold,
        max_instances=max_instances,
    )[0]
    height, width = prepared.original_size
    return {
        "width": width,
        "height": height,
        "task": task,
        "model": config.name,
        "segments": segments(task, config, result),
        "png": png_base64(task, result) if png else None,
    }


def segments(task: str, config: Mask2FormerConfig, result: Any) -> list[dict[str, Any]]:
    """JSON records (COCO RLE at the original size) of one image's result."""
    if task == "panoptic":
        return encoding.panoptic_records(result.segmentation, result.segments, config.id2label, config.thing_ids)
    if task == "instance":
        return encoding.instance_records(result.rles, result.labels, result.scores, config.id2label, config.thing_ids)
    return encoding.semantic_records(result, config.id2label, config.thing_ids)


def png_base64(task: str, result: Any) -> str | None:
    """The result as a base64 PNG: panoptic ids in COCO colours (id = R + 256 G + 256^2 B), or the semantic
    class ids (8-bit, 16-bit past 255 classes). None for instances (they overlap)."""
    if task == "panoptic":
        img = Image.fromarray(encoding.panoptic_png(result.segmentation), mode="RGB")
    elif task == "semantic":
        ids = np.asarray(result)
        img = (
            Image.fromarray(ids.astype(np.uint8))
            if ids.max(initial=0) < 256
            else Image.fromarray(ids.astype(np.uint16))
        )
    else:
        return None
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")
