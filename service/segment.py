"""One segmentation request, top to bottom (``POST /v1/models/{name}/segment``, ``POST /v1/segment`` for the
default model), and a model's description (``GET /v1/models/{name}``, ``GET /v1/model``).

:func:`answer` is the whole request:

1. refused at once: 401 without a valid key where segment keys are set, 404 for a model name the server does not
   serve, 503 while draining, loading, or with the queue full (:func:`refusal`);
2. :func:`read_upload` reads the body (raw JPEG, PNG, WebP, BMP, TIFF or octet-stream, or a multipart field
   ``image``; else 415) under the upload limits, not the compute ones (:mod:`service.uploads`): at most
   ``MAX_UPLOADS`` bodies at once (503), within the request's deadline and never idle for ``UPLOAD_IDLE_S``
   (408), up to ``MAX_BODY_BYTES`` (413); no number of slow or stalled clients can hold the compute;
3. the job is bound to the model's version serving at that moment (a reload swaps versions between requests,
   never inside one), and the scheduler admits its :class:`~service.scheduler.Job` (else 503 + Retry-After, or
   413 when the image alone is over the memory budget) and runs its steps: decode and resize (:func:`prepare`, 415/413/400), its share of
   a batched forward pass, post-processing and encoding (``finish``, :func:`pipeline.steps.answer`);
4. the request waits for the answer until its deadline (504) or until its client leaves (499, counted as
   ``disconnected``); either way the job is cancelled, and no later step of it runs.

One deadline, ``request_timeout_s`` from the request's start, covers all of it.
:func:`answer_unless_abandoned` answers a request still open at the drain timeout with a JSON 503 ``draining``.
"""

# No ``from __future__ import annotations`` here: FastAPI reads SegmentQuery's field types from the class at
# run time, and a class (unlike a function) gives it no module namespace to resolve string annotations in.

import asyncio
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Query, Request
from fastapi.responses import Response

from pipeline import steps
from pipeline.processing import ImageTooLarge, UnsupportedImageFormat
from service.errors import HTTPError, error_response
from service.models import Version
from service.scheduler import BatchResult, Expired, Job, Refused
from service.schemas import Task
from service.state import ServiceState
from service.uploads import UploadLimits, image_bytes

log = logging.getLogger("m2f.service")

MAX_UPLOADS = 128  # request bodies read at once; more get 503 too_many_uploads
UPLOAD_IDLE_S = 5.0  # a body that sends nothing for this long gets 408
MAX_BODY_BYTES = 20 * 2**20  # larger bodies get 413
MAX_PIXELS = 40_000_000  # width x height over this gets 413, read from the header before decoding
MAX_INSTANCES = 100  # default and upper limit of the instance task's top-k


@dataclass(frozen=True)
class SegmentQuery:
    """The query parameters of ``POST /v1/segment`` (a FastAPI dependency: ``Annotated[SegmentQuery, Depends()]``)."""

    task: Annotated[Task | None, Query(description="default: the model's (panoptic with things and stuff)")] = None
    threshold: Annotated[
        float | None,
        Query(ge=0, le=1, allow_inf_nan=False, description="score threshold (default: the model's, per task)"),
    ] = None
    overlap_mask_area_threshold: Annotated[
        float | None, Query(ge=0, le=1, allow_inf_nan=False, description="panoptic only")
    ] = None
    max_instances: Annotated[
        int | None, Query(ge=1, le=MAX_INSTANCES, description="instance only: top-k (query, class) pairs")
    ] = None
    png: Annotated[
        bool, Query(description="also return the panoptic or semantic map as a base64 PNG (not for instance)")
    ] = False


# ---------------------------------------------------------------------------------------------- steps
def refusal(state: ServiceState, name: str) -> HTTPError | None:
    """The error a request for model ``name`` gets at once, before its image is read: draining, loading, an
    unknown model, or the queue full."""
    if state.draining:
        return HTTPError(503, "draining", "the server is shutting down", {"Retry-After": "1"})
    if state.load_error is not None:
        return HTTPError(503, "not_ready", f"the model failed to load: {state.load_error}")
    try:
        state.version(name)
    except HTTPError as e:
        return e
    refused = state.scheduler.refusal()
    return None if refused is None else as_http_error(refused)


def as_http_error(refused: Refused) -> HTTPError:
    """The scheduler's refusal as the HTTP error answered (503 with Retry-After, or 413)."""
    headers = {"Retry-After": str(math.ceil(refused.retry_after_s))} if refused.status == 503 else {}
    return HTTPError(refused.status, refused.reason, refused.message, headers)


async def read_upload(request: Request, state: ServiceState, deadline: float) -> bytes:
    """The image bytes, read under the upload limits (at most ``MAX_UPLOADS`` at once, else 503
    ``too_many_uploads``), within the request's deadline."""
    if state.uploads >= MAX_UPLOADS:
        raise HTTPError(
            503, "too_many_uploads", f"{state.uploads} uploads in progress; try again later", {"Retry-After": "1"}
        )
    state.uploads += 1
    try:
        return await image_bytes(request, UploadLimits(MAX_BODY_BYTES, deadline, UPLOAD_IDLE_S))
    finally:
        state.uploads -= 1


def prepare(data: bytes, version: Version) -> steps.Prepared:
    """Bytes -> resized, normalized image; decoding errors as HTTP errors. Runs on a CPU worker."""
    try:
        image = steps.decode(data, MAX_PIXELS)
    except UnsupportedImageFormat as e:
        raise HTTPError(415, "unsupported_media_type", str(e)) from None
    except ImageTooLarge as e:
        raise HTTPError(413, "too_large", str(e)) from None
    except (ValueError, OSError) as e:  # zero-size, truncated, corrupt
        raise HTTPError(400, "bad_image", f"cannot decode the image: {e}") from None
    return steps.prepare(image, version.runner.config, version.runner.input.size)


async def wait_for_answer(request: Request, state: ServiceState, job: Job, deadline: float) -> Any:
    """Admit ``job`` and wait for its answer: 504 at the deadline, 499 if the client leaves; the job is cancelled
    on every way out but its answer."""
    try:
        future = state.scheduler.submit(job)
    except Refused as refused:
        raise as_http_error(refused) from None

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        timeout = max(deadline - time.monotonic(), 0.0)
        done, _ = await asyncio.wait({future, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not future.done():  # timed out, client gone, or this request abandoned
            state.scheduler.cancel(job)
    if future in done:
        try:
            return future.result()  # a failed step raises here
        except Expired as e:
            raise HTTPError(504, "timeout", str(e)) from None
        except Refused as refused:  # the scheduler closed
            raise as_http_error(refused) from None
    if watcher in done:
        raise HTTPError(499, "disconnected", "client closed the connection")
    raise HTTPError(504, "timeout", "the request's deadline passed")


# ---------------------------------------------------------------------------------------------- the request
async def answer(request: Request, state: ServiceState, name: str, query: SegmentQuery, started: float) -> Response:
    """The whole request (read, admit, decode, batch, post-process, encode) for model ``name`` within its deadline;
    its status and timings go to the metrics and the access log. ``started``: ``time.perf_counter()`` at its
    start."""
    settings = state.settings
    deadline = time.monotonic() + settings.request_timeout_s
    served = state.models.get(name)
    known = served is not None or any(source.name == name for source in state.sources)
    model_label = name if known else "unknown"  # no metric series per name a client makes up
    task_name = query.task or (steps.default_task(served.runner.config) if served else "unknown")
    request.state.access = {"model": name, "task": task_name}  # for the access-log line (service.logs)
    status = 500
    try:
        state.keys.check(request, "segment")
        if (refused := refusal(state, name)) is not None:  # before the upload
            raise refused
        data = await read_upload(request, state, deadline)
        version = state.version(name)  # the version serving now: a swap during the upload is taken
        config = version.runner.config
        task_name = query.task or steps.default_task(config)
        timings: dict[str, float] = {}

        def prepare_step() -> steps.Prepared:
            prepared = prepare(data, version)
            timings["decode_s"] = time.perf_counter() - started
            return prepared

        def finish_step(prepared: steps.Prepared, result: BatchResult) -> bytes:
            t0 = time.perf_counter()
            body = steps.answer(
                task_name,
                config,
                prepared,
                result.class_logits,
                result.mask_logits,
                threshold=query.threshold,
                overlap_mask_area_threshold=query.overlap_mask_area_threshold,
                max_instances=query.max_instances or MAX_INSTANCES,
                png=query.png,
            )
            no_png = query.png and task_name == "instance"
            body["warnings"] = ["png: instances overlap, so there is no map to return as a PNG"] if no_png else []
            timings.update(
                queue_s=result.queue_s, inference_s=result.inference_s, postprocess_s=time.perf_counter() - t0
            )
            body["timings"] = {**timings, "total_s": time.perf_counter() - started, "batch_size": result.batch_size}
            return json.dumps(body).encode()

        size = steps.header_size(data)  # (h, w), or None: decoding will say what is wrong
        job = Job(
            version.lane,
            prepare_step,
            finish_step,
            deadline,
            original_px=0 if size is None else size[0] * size[1],
            padded_px=0 if size is None else steps.padded_pixels(size, config, version.runner.input.size),
        )
        if size is not None:
            request.state.access.update(height=size[0], width=size[1])
        content = await wait_for_answer(request, state, job, deadline)
        state.metrics.queue_duration.labels(name).observe(timings["queue_s"])
        state.metrics.postprocess_duration.labels(name, task_name).observe(timings["postprocess_s"])
        request.state.access.update({k: timings[k] for k in ("queue_s", "inference_s", "postprocess_s")})
        status = 200
        return Response(content, media_type="application/json")
    except asyncio.CancelledError:  # abandoned at the drain timeout (see answer_unless_abandoned)
        status = 503
        raise
    except HTTPError as e:
        status = e.status
        state.metrics.rejections.labels(e.reason).inc()
        raise
    except Exception:
        log.exception("segmentation failed")
        status = 500
        return error_response(500, "internal", "inference failed; see the server log")
    finally:
        state.metrics.requests.labels(model_label, task_name, str(status)).inc()
        state.metrics.request_duration.labels(model_label, task_name).observe(time.perf_counter() - started)


async def answer_unless_abandoned(request: Request, state: ServiceState, name: str, query: SegmentQuery) -> Response:
    """:func:`answer`, unless the drain timeout comes first: then every open request is answered 503 draining
    in JSON (one log line each), before uvicorn's own shutdown deadline would cut it off with a plain-text 500."""
    started = time.perf_counter()
    work = asyncio.ensure_future(answer(request, state, name, query, started))
    abandon = asyncio.ensure_future(state.abandoned.wait())
    try:
        done, _ = await asyncio.wait({work, abandon}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        abandon.cancel()
    if work in done:
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work  # its own accounting (metrics) runs as it unwinds
    waited = time.perf_counter() - started
    log.warning("drain timeout: abandoned %s %s after %.1f s", request.method, request.url.path, waited)
    state.metrics.rejections.labels("draining").inc()
    return error_response(503, "draining", "the server shut down before this request was answered")


# ---------------------------------------------------------------------------------------------- GET /v1/models/{name}
def model_info(state: ServiceState, version: Version) -> dict[str, Any]:
    """A served model: name, version, runtime, tasks, labels, input, preprocessing, defaults, batching, runner."""
    runner, cfg, settings = version.runner, version.runner.config, state.settings
    pre = cfg.preprocess
    return {
        **version.describe(),
        "name": version.name,
        "model": cfg.name,
        "labels": [{"id": i, "name": n, "isthing": i in cfg.thing_ids} for i, n in sorted(cfg.id2label.items())],
        "input": {"name": runner.input.name, "shape": list(runner.input.shape), "dtype": str(runner.input.dtype)},
        "preprocess": {
            "shortest_edge": pre.shortest_edge,
            "longest_edge": pre.longest_edge,
            "mean": list(pre.mean),
            "std": list(pre.std),
            "size_divisor": pre.size_divisor,
        },
        "defaults": {
            "panoptic": {
                "threshold": cfg.threshold,
                "mask_threshold": cfg.mask_threshold,
                "overlap_mask_area_threshold": cfg.overlap_mask_area_threshold,
            },
            # threshold null: no score threshold (the official top-k); things_only: stuff classes are left out
            "instance": {
                "threshold": cfg.instance_threshold,
                "things_only": cfg.instance_thing_ids is not None,
                "max_instances": MAX_INSTANCES,
            },
            # at_input_size: class scores at the padded input size, then resized (the official semantic order)
            "semantic": {"at_input_size": cfg.semantic_at_input_size},
        },
        "label_source": cfg.label_source,
        "batching": {
            "max_batch_size": version.batch_size,
            # seconds of each measured pass (one per round) by batch size; empty when max_batch_size was given
            "profile_s": {str(b): ts for b, ts in version.batch_seconds.items()},
            "max_batch_delay_ms": settings.max_batch_delay_ms,
            "cpu_work_between_passes": version.lane.take_turns,
        },
        "admission": {
            "request_timeout_s": settings.request_timeout_s,
            "memory_mb": settings.memory_mb,
            "max_pixels": MAX_PIXELS,
            "max_body_bytes": MAX_BODY_BYTES,
        },
        "runner": runner.describe(),
    }
