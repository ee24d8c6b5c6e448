"""A naive segmentation server, written the way the ``transformers`` docs show: the baseline of
``bench/service_vs_naive.py``.

    M2F_NAIVE_MODEL=path/to/hf-checkpoint uvicorn naive_server:create_app --factory --app-dir bench

``Mask2FormerImageProcessor`` and ``Mask2FormerForUniversalSegmentation`` loaded with ``from_pretrained``
from an HF checkpoint folder (its ``preprocessor_config.json`` sets the resize), one plain ``def``
endpoint (FastAPI runs it in its thread pool), a lock so that one image at a time goes through
pre-processing, the model and HF's post-processing (``post_process_panoptic_segmentation`` /
``post_process_instance_segmentation`` with ``target_sizes`` the original size), then each segment's
mask as COCO RLE (``pycocotools.mask.encode(np.asfortranarray(mask))``) in the JSON, outside the lock. The HF
post-processing and the RLE JSON are ``bench.common``'s (:func:`~bench.common.hf_postprocess`,
:func:`~bench.common.segments_json`), which ``bench/postprocess_share.py`` times too.

``POST /v1/segment`` takes the multipart field ``image`` and the query parameters ``task`` (``panoptic``,
``instance``), ``threshold`` and ``overlap_mask_area_threshold`` of the service, so that one client talks
to both. Panoptic fuses the stuff classes (``label_ids_to_fuse``): the classes not in the checkpoint's
``thing_ids`` when its ``config.json`` has that list, none otherwise. No batching, no admission control,
no limits: that is the point of the comparison. ``transformers`` is a development dependency.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from PIL import Image

if __package__ in (None, ""):  # loaded as naive_server (uvicorn --app-dir bench): make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import hf_postprocess, segments_json  # noqa: E402

MODEL_ENV = "M2F_NAIVE_MODEL"


def create_app(model_path: str | None = None) -> FastAPI:
    """The app for the checkpoint folder ``model_path`` (default: the ``M2F_NAIVE_MODEL`` variable)."""
    from transformers import (  # lazy: transformers (a development dependency); the app's factory loads it
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
    )
    from transformers.utils import logging as hf_logging  # lazy: transformers

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
