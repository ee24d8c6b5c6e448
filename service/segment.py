"""One segmentation request, step by step (``POST /v1/segment``), and the model description (``GET /v1/model``).

1. :func:`read_upload` reads the body (raw JPEG, PNG, WebP, BMP, TIFF or octet-stream, or a multipart field
   ``image``; else 415) under the upload limits, not the compute ones: at most ``max_uploads`` bodies at once
   (503), each within ``upload_timeout_s`` and never idle for ``upload_idle_timeout_s`` (408), up to
   ``max_body_bytes`` (413), so that no number of slow or stalled clients can hold the compute slots;
2. only then the request takes a compute slot (:meth:`~service.state.ServiceState.admit`; else 503 +
   Retry-After at once) and :func:`decode_and_prepare` decodes and resizes the image in a worker thread
   (415 / 413 / 400);
3. :func:`wait_for_result` waits for its batch, at most until its deadline (504); a client that disconnects
   is dropped;
4. :func:`answer` post-processes and RLE-encodes its image in a worker thread (:func:`service.pipeline.answer`).

One deadline, ``request_timeout_s`` from the request's start, covers all of it: a step is not started once
it has passed (an expired image never reaches a batch, an expired result is not post-processed), and the
client gets 504 at the deadline even when a step is still running. :func:`answer_unless_abandoned` answers a
request still open at the drain timeout with a JSON 503 ``draining``.
"""

# No ``from __future__ import annotations`` here: FastAPI reads SegmentQuery's field types from the class at
# run time, and a class (unlike a function) gives it no module namespace to resolve string annotations in.

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Query, Request
from fastapi.responses import Response

from mask2former.processing import ImageTooLarge, UnsupportedImageFormat
from service import pipeline
from service.batching import BatchResult, Item
from service.errors import HTTPError, error_response
from service.schemas import Task
from service.state import ServiceState
from service.uploads import UploadLimits, image_bytes

log = logging.getLogger("m2f.service")


@dataclass(frozen=True)
class SegmentQuery:
    """The query parameters of ``POST /v1/segment`` (a FastAPI dependency: ``Annotated[SegmentQuery, Depends()]``)."""

    task: Annotated[Task | None, Query(description="default: the model's (panoptic with things and stuff)")] = None
    threshold: Annotated[
        float | None, Query(ge=0, le=1, description="score threshold (default: the model's; instance: 0)")
    ] = None
    overlap_mask_area_threshold: Annotated[float | None, Query(ge=0, le=1, description="panoptic only")] = None
    max_instances: Annotated[int | None, Query(ge=1, description="instance only: top-k (query, class) pairs")] = None
    png: Annotated[bool, Query(description="also return the panoptic or semantic map as a base64 PNG")] = False


# ---------------------------------------------------------------------------------------------- steps
async def read_upload(request: Request, state: ServiceState, deadline: float) -> bytes:
    """The image bytes, read under the upload limits (at most ``max_uploads`` at once, else 503
    ``too_many_uploads``), within the request's deadline."""
    settings = state.settings
    if state.uploads >= settings.max_uploads:
        raise HTTPError(
            503,
            "too_many_uploads",
            f"{state.uploads} uploads in progress; try again later",
            {"Retry-After": "1"},
        )
    state.uploads += 1
    try:
        limits = UploadLimits(
            settings.max_body_bytes,
            min(deadline, time.monotonic() + settings.upload_timeout_s),
            settings.upload_idle_timeout_s,
        )
        return await image_bytes(request, limits)
    finally:
        state.uploads -= 1


def decode_and_prepare(data: bytes, state: ServiceState) -> pipeline.Prepared:
    """Bytes -> resized, normalized image; decoding errors as HTTP errors. Runs in a worker thread."""
    try:
        image = pipeline.decode(data, state.settings.max_pixels)
    except UnsupportedImageFormat as e:
        raise HTTPError(415, "unsupported_media_type", str(e)) from None
    except ImageTooLarge as e:
        raise HTTPError(413, "too_large", str(e)) from None
    except (ValueError, OSError) as e:  # zero-size, truncated, corrupt
        raise HTTPError(400, "bad_image", f"cannot decode the image: {e}") from None
    return pipeline.prepare(image, state.runner.config, state.runner.input.size)


async def wait_for_result(request: Request, state: ServiceState, item: Item, deadline: float) -> BatchResult:
    """The image's batch result, or 504 at the deadline, or ``HTTPError(499)`` if the client has left."""
    batcher = state.batcher
    future = batcher.submit(item)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        timeout = max(deadline - time.monotonic(), 0.0)
        done, _ = await asyncio.wait({future, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not future.done():  # timed out, client gone, or this request abandoned: out of the queue
            batcher.cancel(item)
            future.cancel()
    if future in done:
        return future.result()  # a failed batch raises here
    if watcher in done:
        raise HTTPError(499, "disconnected", "client closed the connection")
    raise HTTPError(504, "timeout", "the request's deadline passed while waiting for inference")


# ---------------------------------------------------------------------------------------------- the request
async def answer(request: Request, state: ServiceState, query: SegmentQuery, started: float) -> Response:
    """The whole request (read, admit, decode, batch, post-process, encode) within its deadline; its status
    and timings go to the metrics and the access log. ``started``: ``time.perf_counter()`` at its start."""
    settings = state.settings
    deadline = time.monotonic() + settings.request_timeout_s
    task_name = query.task or (pipeline.default_task(state.runner.config) if state.runner else "unknown")
    request.state.access = {"task": task_name}  # for the access-log line (service.logs)
    status, admitted, item = 500, False, None
    try:
        state.check_admission(deadline)  # a full queue or a draining server answers at once, before the upload
        data = await read_upload(request, state, deadline)
        admission = state.admit(deadline)
        admitted, spent = True, []  # spent: (seconds, CPU seconds) of each CPU-pool step of this request
        prepared = await state.before(deadline, "decoding", spent, decode_and_prepare, data, state)
        decoded = time.perf_counter()
        request.state.access.update(height=prepared.original_size[0], width=prepared.original_size[1])
        item = Item(prepared.pixels, prepared.resized_size)
        result = await wait_for_result(request, state, item, deadline)
        state.metrics.queue_duration.observe(result.queue_s)

        def post_process_and_encode() -> tuple[bytes, float]:
            """One CPU step (one turn): the answer, its timings, its JSON -> (body, post-processing seconds)."""
            t0 = time.perf_counter()
            body = pipeline.answer(
                task_name,
                state.runner.config,
                prepared,
                result.class_logits,
                result.mask_logits,
                threshold=query.threshold,
                overlap_mask_area_threshold=query.overlap_mask_area_threshold,
                max_instances=min(query.max_instances or settings.max_instances, settings.max_instances),
                png=query.png,
            )
            post_s = time.perf_counter() - t0
            body["timings"] = {
                "decode_s": decoded - started,
                "queue_s": result.queue_s,
                "inference_s": result.inference_s,
                "postprocess_s": post_s,
                "total_s": time.perf_counter() - started,
                "batch_size": result.batch_size,
            }
            return json.dumps(body).encode(), post_s

        # not started past the deadline, and 504 at it; in the place in line its batch took for it
        content, post_s = await state.before(
            deadline, "post-processing", spent, post_process_and_encode, ticket=item.ticket
        )
        state.metrics.postprocess_duration.labels(task_name).observe(post_s)
        request.state.access.update(queue_s=result.queue_s, inference_s=result.inference_s)
        request.state.access.update(postprocess_s=post_s)
        state.on_answered(spent, admission)
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
        if item is not None and item.ticket is not None:
            state.gate.forget(item.ticket)  # a place in line its batch took for it, unused if it failed first
        if admitted:
            state.release()
        state.metrics.requests.labels(task_name, str(status)).inc()
        state.metrics.request_duration.labels(task_name).observe(time.perf_counter() - started)


async def answer_unless_abandoned(request: Request, state: ServiceState, query: SegmentQuery) -> Response:
    """:func:`answer`, unless the drain timeout comes first: then every open request is answered 503 draining
    in JSON (one log line each), before uvicorn's own shutdown deadline would cut it off with a plain-text 500."""
    started = time.perf_counter()
    work = asyncio.ensure_future(answer(request, state, query, started))
    abandon = asyncio.ensure_future(state.abandoned.wait())
    try:
        done, _ = await asyncio.wait({work, abandon}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        abandon.cancel()
    if work in done:
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await work  # its own accounting (slot, metrics) runs as it unwinds
    waited = time.perf_counter() - started
    log.warning("drain timeout: abandoned %s %s after %.1f s", request.method, request.url.path, waited)
    state.metrics.rejections.labels("draining").inc()
    return error_response(503, "draining", "the server shut down before this request was answered")


# ---------------------------------------------------------------------------------------------- GET /v1/model
def model_info(state: ServiceState) -> dict[str, Any]:
    """The served model: name, runtime, tasks, labels, input, preprocessing, defaults, batching, runner."""
    if state.runner is None or not state.ready:
        raise HTTPError(503, "not_ready", "the model is still loading")
    runner, cfg, settings = state.runner, state.runner.config, state.settings
    pre = cfg.preprocess
    return {
        "name": cfg.name,
        "runtime": runner.name,
        "tasks": list(pipeline.TASKS),
        "default_task": pipeline.default_task(cfg),
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
            "threshold": cfg.threshold,
            "mask_threshold": cfg.mask_threshold,
            "overlap_mask_area_threshold": cfg.overlap_mask_area_threshold,
            "max_instances": settings.max_instances,
        },
        "batching": {
            "max_batch_size": state.batcher.policy.max_batch_size,
            # seconds of each measured pass (one per round) by batch size
            "profile_s": {str(b): ts for b, ts in state.batch_seconds.items()},
            # the profile's batch size (> 1) checked against served passes: the size in use now, and why
            "check": None if state.batch_check is None else state.batch_check.describe(),
            "max_batch_delay_ms": settings.max_batch_delay_ms,
            "bucket_px": settings.bucket_px,
            "max_queue": settings.max_queue,
        },
        "runner": runner.describe(),
    }
