"""A naive segmentation server, written the way the ``transformers`` docs show: the baseline of
``bench/service_vs_naive.py``.

    M2F_NAIVE_MODEL=path/to/hf-checkpoint uvicorn naive_server:create_app --factory --app-dir bench

``Mask2FormerImageProcessor`` and ``Mask2FormerForUniversalSegmentation`` loaded with ``from_pretrained``
from an HF checkpoint folder (its ``preprocessor_config.json`` sets the resize), one plain ``def``
endpoint (FastAPI runs it in its thread pool), a lock so that one image at a time goes through
pre-processing, the model and HF's post-processing (``post_process_panoptic_segmentation`` /
``post_process_instance_segmentation`` with ``target_sizes`` the original size), then each segment's
mask as COCO RLE (``pycocotools.mask.encode(np.asfortranarray(mask))``) in the JSON, outside the lock.

``POST /v1/segment`` takes the multipart field ``image`` and the query parameters ``task`` (``panoptic``,
``instance``), ``threshold`` and ``overlap_mask_area_threshold`` of the service, so that one client talks
to both. Panoptic fuses the stuff classes (``label_ids_to_fuse``): the classes not in the checkpoint's
``thing_ids`` when its ``config.json`` has that list, none otherwise. No batching, no admission control,
no limits: that is the point of the comparison. ``transformers`` is a development dependency.
"""

from __future__ import annotations

import io
import os
import threading
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from PIL import Image
from pycocotools import mask as mask_util

MODEL_ENV = "M2F_NAIVE_MODEL"


def rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool mask -> COCO RLE with ``counts`` as a str."""
    encoded = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def hf_postprocess(
    processor: Any,
    outputs: Any,
    target_size: tuple[int, int],
    task: str,
    threshold: float,
    overlap_mask_area_threshold: float,
    stuff_ids: set[int],
) -> tuple[torch.Tensor | None, list[dict[str, Any]]]:
    """HF post-processing of one image's outputs: (panoptic id map (H, W) or instance masks (N, H, W) or
    None, segments_info). ``outputs`` needs ``class_queries_logits`` and ``masks_queries_logits``."""
    if task == "panoptic":
        result = processor.post_process_panoptic_segmentation(
            outputs,
            threshold=threshold,
            overlap_mask_area_threshold=overlap_mask_area_threshold,
            label_ids_to_fuse=stuff_ids,
            target_sizes=[target_size],
        )[0]
    elif task == "instance":
        result = processor.post_process_instance_segmentation(
            outputs,
            threshold=threshold,
            overlap_mask_area_threshold=overlap_mask_area_threshold,
            target_sizes=[target_size],
            return_binary_maps=True,
        )[0]
    else:
        raise ValueError(f"task {task!r}: this server does panoptic and instance only")
    return result["segmentation"], result["segments_info"]


def segments_json(
    task: str, segmentation: torch.Tensor | None, segments_info: list[dict[str, Any]], id2label: dict[int, str]
) -> list[dict[str, Any]]:
    """One JSON record per segment with its mask as COCO RLE. Panoptic: the mask is ``segmentation == id``;
    a fused stuff class appears once (HF lists it once per query it merged). Instance: the i-th binary map."""
    records, seen = [], set()
    for i, info in enumerate(segments_info):
        if info["id"] in seen:
            continue
        seen.add(info["id"])
        mask = segmentation == info["id"] if task == "panoptic" else segmentation[i] > 0  # (H, W)
        label = int(info["label_id"])
        records.append(
            {
                "id": int(info["id"]),
                "label_id": label,
                "label": id2label.get(label, str(label)),
                "score": float(info["score"]),
                "segmentation": rle(mask.numpy()),
            }
        )
    return records


def create_app(model_path: str | None = None) -> FastAPI:
    """The app for the checkpoint folder ``model_path`` (default: the ``M2F_NAIVE_MODEL`` variable)."""
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model_path = model_path or os.environ[MODEL_ENV]
    processor = Mask2FormerImageProcessor.from_pretrained(model_path)
    model = Mask2FormerForUniversalSegmentation.from_pretrained(model_path).eval()
    thing_ids = getattr(model.config, "thing_ids", None)
    stuff_ids = set(model.config.id2label) - set(thing_ids) if thing_ids is not None else set()
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    lock = threading.Lock()
    app = FastAPI(title="naive Mask2Former server (transformers)")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "image_processor": type(processor).__name__}

    @app.post("/v1/segment")
    def segment(
        image: Annotated[UploadFile, File()],
        task: Annotated[str, Query()] = "panoptic",
        threshold: Annotated[float, Query()] = 0.8,
        overlap_mask_area_threshold: Annotated[float, Query()] = 0.8,
    ) -> dict[str, Any]:
        if task not in ("panoptic", "instance"):
            raise HTTPException(422, f"task {task!r}: panoptic or instance")
        try:
            img = Image.open(io.BytesIO(image.file.read())).convert("RGB")
        except OSError as e:
            raise HTTPException(400, f"cannot decode the image: {e}") from None
        size = (img.height, img.width)
        with lock:
            inputs = processor(images=img, return_tensors="pt")
            with torch.no_grad():
                outputs = model(**inputs)
            segmentation, info = hf_postprocess(
                processor, outputs, size, task, threshold, overlap_mask_area_threshold, stuff_ids
            )
        return {
            "width": img.width,
            "height": img.height,
            "task": task,
            "segments": segments_json(task, segmentation, info, id2label),
        }

    return app
