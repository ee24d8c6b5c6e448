"""Pydantic schemas of the HTTP API (they make the OpenAPI document at ``/docs``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Task = Literal["panoptic", "instance", "semantic"]


class RLE(BaseModel):
    """COCO run-length encoding, column-major; ``pycocotools.mask.decode`` gives the (H, W) mask."""

    size: list[int] = Field(description="[height, width] of the original image")
    counts: str = Field(description="compressed RLE string")


class SegmentOut(BaseModel):
    id: int = Field(description="panoptic: the id in the PNG; instance: 1..N by score; semantic: the class id")
    category_id: int
    label: str
    isthing: bool
    score: float | None = Field(description="class probability x mask quality; null for semantic segments")
    area: int = Field(description="pixels at the original image size")
    bbox: list[int] = Field(description="[x, y, width, height] of the mask")
    segmentation: RLE


class Timings(BaseModel):
    decode_s: float = Field(description="reading, decoding and resizing the image")
    queue_s: float = Field(description="waiting for a batch")
    inference_s: float = Field(description="the forward pass of the batch this image was in")
    postprocess_s: float = Field(description="post-processing and RLE encoding")
    total_s: float = Field(description="request received -> response ready")
    batch_size: int = Field(description="images in the forward pass")


class SegmentResponse(BaseModel):
    width: int
    height: int
    task: Task
    model: str
    segments: list[SegmentOut]
    png: str | None = Field(
        None,
        description="with png=true: base64 PNG of the panoptic ids (COCO colours: id = R + 256 G + 256^2 B) or "
        "of the semantic class ids (8-bit grey; 16-bit past 255 classes)",
    )
    timings: Timings
    warnings: list[str] = Field([], description="what the server could not do as asked (png=true for instances)")


class ErrorBody(BaseModel):
    status: int
    reason: str = Field(description="machine-readable cause, as in the m2f_rejections_total metric")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Label(BaseModel):
    id: int
    name: str
    isthing: bool


class ModelSummary(BaseModel):
    name: str = Field(description="the name requests use: POST /v1/models/{name}/segment")
    version: int = Field(description="1, 2, ... : each load or reload of the name makes a new version")
    state: Literal["ready", "draining"] = Field(description="draining: replaced or unloaded, finishing its requests")
    model: str = Field(description="the checkpoint's own name")
    path: str | None = Field(description="what it was loaded from (null: the bundled demo checkpoint)")
    runtime: str
    tasks: list[Task]
    default_task: Task
    labels: int | list[Label] = Field(description="its classes (the listing gives their number)")
    resident_mb: float = Field(description="memory the model holds, estimated as its weights' size (in memory_mb)")
    max_batch_size: int
    loaded_at: str = Field(description="UTC, ISO 8601")


class ModelList(BaseModel):
    default: str = Field(description="the model POST /v1/segment and GET /v1/model answer for")
    models: list[ModelSummary] = Field(description="the versions taking requests, then those draining")
    memory: dict = Field(description="memory_mb, what the models hold and what the requests in progress hold (MiB)")


class ModelInfo(ModelSummary):
    labels: list[Label]
    input: dict = Field(description="graph input: name, shape (strings for dynamic axes), dtype")
    preprocess: dict = Field(description="resize (shortest/longest edge), mean/std (0..255 scale), size divisor")
    defaults: dict = Field(description="post-processing defaults by task")
    batching: dict = Field(description="batch size (and the start-up profile), delay, CPU work between passes")
    admission: dict = Field(description="the request deadline, memory budget and input limits")
    runner: dict = Field(description="what the runtime reports about itself")


class LoadRequest(BaseModel):
    path: str = Field(description="on the server: an HF checkpoint folder, a detectron2 file or an .onnx file")
    runtime: Literal["onnxruntime", "openvino", "openvino-bf16"] | None = Field(
        None, description="for an .onnx file: the runner (default: the one this CPU's class gets, ONNX Runtime so far)"
    )


class Health(BaseModel):
    status: Literal["ok"] = Field(description="always ok: the process answers")


class Readiness(BaseModel):
    ready: bool = Field(description="the model is loaded and warmed up and the server is not draining")
    draining: bool = Field(description="the server got SIGTERM and admits no new requests")
    error: str | None = Field(None, description="why the model failed to load (only then present)")
