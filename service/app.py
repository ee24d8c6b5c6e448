"""The HTTP service: thin FastAPI routes over the batcher and the pipeline.

``create_app(settings)`` builds the app; the model loads and warms up in the background after start-up
(``/healthz`` answers at once, ``/readyz`` once the model is ready). A segmentation request:

1. reads the body (``image/*`` or ``application/octet-stream`` raw, or a multipart field ``image``) under
   the upload limits, not the compute ones: at most ``max_uploads`` bodies at once (503), each within
   ``upload_timeout_s`` and never idle for ``upload_idle_timeout_s`` (408), up to ``max_body_bytes`` (413),
   so that no number of slow or stalled clients can hold the compute slots;
2. only then reserves a slot (at most ``max_queue`` requests admitted and unanswered; else 503 +
   Retry-After), and decodes and resizes the image in a worker thread (415 / 413 / 400);
3. waits for its batch, at most until its deadline (504); a client that disconnects is dropped;
4. post-processes and RLE-encodes its image in a worker thread (:func:`service.pipeline.answer`).

On SIGTERM (see :func:`serve`) the service stops admitting (503 ``draining``, ``/readyz`` 503) and finishes
what it accepted before exiting; at ``drain_timeout_s`` whatever is still open gets a JSON 503 ``draining``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.formparsers import MultiPartException, MultiPartParser

from mask2former.processing import ImageTooLarge, UnsupportedImageFormat
from service import pipeline
from service.batching import Batcher, BatchPolicy, BatchResult, Item
from service.metrics import Metrics
from service.runtime import Runner, open_runner
from service.schemas import ErrorResponse, ModelInfo, SegmentResponse, Task
from service.settings import Settings

log = logging.getLogger("m2f.service")


class HTTPError(Exception):
    """An error answered as ``{"error": {"status", "reason", "message"}}``."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers or {}


class ServiceState:
    """Everything the routes share: settings, runner, batcher, metrics, admission and drain state."""

    def __init__(self, settings: Settings, runner: Runner | None = None):
        self.settings = settings
        self.metrics = Metrics(settings.max_batch_size)
        self.runner: Runner | None = runner
        self.batcher: Batcher | None = None
        self.ready = False
        self.draining = False
        self.load_error: BaseException | None = None
        self.admitted = 0
        self.uploads = 0  # bodies being read
        self.abandoned = asyncio.Event()  # set at the drain timeout: open requests are answered 503
        self.infer_pool = ThreadPoolExecutor(1, thread_name_prefix="m2f-infer")
        self.cpu_pool = ThreadPoolExecutor(settings.postprocess_workers, thread_name_prefix="m2f-cpu")
        self.recent_batch_s = 1.0  # moving average of batch time, for Retry-After

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Open the runner (unless given) and warm it up; blocking, run in a thread."""
        s = self.settings
        if self.runner is None:
            t0 = time.perf_counter()
            self.runner = open_runner(s.model, s.runtime, s.device, s.threads, s.cache_dir)
            log.info("loaded %s (%s) in %.1fs", self.runner.config.name, self.runner.name, time.perf_counter() - t0)
        t0 = time.perf_counter()
        self.runner.warmup()
        log.info("warm-up took %.2fs", time.perf_counter() - t0)

    def start_batcher(self) -> None:
        runner, s = self.runner, self.settings
        fixed_batch = runner.input.batch
        policy = BatchPolicy(
            max_batch_size=fixed_batch or s.max_batch_size,
            max_delay_s=s.max_batch_delay_ms / 1000,
            bucket_px=s.bucket_px,
            size_divisor=runner.config.preprocess.size_divisor,
            fixed_size=runner.input.size,
        )
        self.batcher = Batcher(
            policy, runner.run, self.infer_pool, fixed_batch, on_batch=self._on_batch, on_depth=self._on_depth
        )
        self.batcher.start()
        self.metrics.model_info.labels(runner.config.name, runner.name).set(1)
        self.ready = True
        self.metrics.ready.set(1)

    def _on_batch(self, n: int, seconds: float) -> None:
        self.metrics.batch_size.observe(n)
        self.metrics.inference_duration.observe(seconds)
        self.recent_batch_s = 0.8 * self.recent_batch_s + 0.2 * seconds

    def _on_depth(self, n: int) -> None:
        self.metrics.queue_depth.set(n)

    def begin_drain(self) -> None:
        if not self.draining:
            log.info("draining: %d request(s) admitted", self.admitted)
        self.draining = True
        self.metrics.ready.set(0)

    def abandon_after(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """At ``seconds`` from now, answer every open request 503 ``draining`` (thread-safe)."""
        loop.call_soon_threadsafe(loop.call_later, seconds, self.abandoned.set)

    async def close(self) -> None:
        self.begin_drain()
        if self.batcher is not None:
            await self.batcher.stop()
        self.infer_pool.shutdown(wait=True, cancel_futures=True)
        self.cpu_pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ admission
    def retry_after(self) -> str:
        """Seconds until a slot is likely free: the queue's worth of batches at the recent batch time."""
        batches = self.admitted / max(self.batcher.policy.max_batch_size if self.batcher else 1, 1)
        return str(min(max(math.ceil(batches * self.recent_batch_s), 1), 60))

    def refusal(self) -> HTTPError | None:
        """The 503 a request would get now (draining, model not ready, queue full), or None."""
        if self.draining:
            return HTTPError(503, "draining", "the server is shutting down", {"Retry-After": "1"})
        if not self.ready:
            if self.load_error is not None:
                return HTTPError(503, "not_ready", f"the model failed to load: {self.load_error}")
            return HTTPError(503, "not_ready", "the model is still loading", {"Retry-After": "5"})
        if self.admitted >= self.settings.max_queue:
            return HTTPError(
                503,
                "queue_full",
                f"{self.admitted} requests are queued; try again later",
                {"Retry-After": self.retry_after()},
            )
        return None

    def check_admission(self) -> None:
        """Refuse at once (before the upload) what :meth:`admit` would refuse now."""
        if (refused := self.refusal()) is not None:
            raise refused

    def admit(self) -> None:
        """Take a compute slot, or raise the 503 of :meth:`refusal`."""
        self.check_admission()
        self.admitted += 1
        self.metrics.inflight.set(self.admitted)

    def release(self) -> None:
        self.admitted -= 1
        self.metrics.inflight.set(self.admitted)


# ---------------------------------------------------------------------------------------------- body
@dataclass(frozen=True)
class UploadLimits:
    """How a body is read: at most ``max_bytes`` (413), finished by ``deadline`` (``time.monotonic()``) and
    never idle for ``idle_s`` (408)."""

    max_bytes: int
    deadline: float
    idle_s: float


async def read_body(request: Request, limits: UploadLimits) -> bytes:
    """The request body under ``limits``, refusing more than ``max_bytes`` (413) before reading it all when
    the Content-Length says so, and a client too slow to send it (408)."""
    limit = limits.max_bytes
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise HTTPError(400, "bad_request", f"invalid Content-Length {length!r}")
        if int(length) > limit:
            raise HTTPError(413, "too_large", f"body of {int(length)} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        left = limits.deadline - time.monotonic()
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, min(left, limits.idle_s)))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            why = "not sent in time" if left <= limits.idle_s else f"idle for {limits.idle_s:g} s"
            raise HTTPError(408, "upload_timeout", f"request body {why} ({size} bytes received)") from None
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, "too_large", f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request: Request, limits: UploadLimits) -> bytes:
    """The encoded image: the raw body (``image/*``, ``application/octet-stream``) or multipart field ``image``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (ctype.startswith("image/") or ctype in ("application/octet-stream", "multipart/form-data")):
        raise HTTPError(
            415,
            "unsupported_media_type",
            f"Content-Type {ctype or '(none)'} not accepted: send the image as the body (image/*) or as the "
            "multipart/form-data field 'image'",
        )
    limit = limits.max_bytes
    body = await read_body(request, limits)
    if ctype != "multipart/form-data":
        if not body:
            raise HTTPError(400, "bad_image", "empty body")
        return body

    async def once():
        yield body

    try:
        form = await MultiPartParser(request.headers, once(), max_files=1, max_fields=16, max_part_size=limit).parse()
    except MultiPartException as e:
        raise HTTPError(400, "bad_request", f"malformed multipart body: {e.message}") from None
    field = form.get("image")
    if field is None or isinstance(field, str):
        raise HTTPError(400, "bad_request", "multipart body has no file field 'image'")
    data = await field.read()
    await form.close()
    if not data:
        raise HTTPError(400, "bad_image", "empty image field")
    return data


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
    raise HTTPError(504, "timeout", f"no result within {state.settings.request_timeout_s:g}s")


# ---------------------------------------------------------------------------------------------- app
def error_response(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "reason": reason, "message": message}}, status, headers)


def create_app(settings: Settings | None = None, runner: Runner | None = None) -> FastAPI:
    """The FastAPI app. With ``runner`` given, that runner is served (and not loaded from ``settings``)."""
    settings = settings or Settings()
    state = ServiceState(settings, runner)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def load() -> None:
            try:
                await asyncio.get_running_loop().run_in_executor(state.infer_pool, state.load)
                state.start_batcher()
                log.info("ready: %s", json.dumps(state.runner.describe()))
            except Exception as e:  # noqa: BLE001 - reported on /readyz and ends `m2f serve`
                state.load_error = e
                log.error("model failed to load: %s", e)  # one line; the traceback at debug level
                log.debug("model load traceback", exc_info=True)
                app.state.on_load_error()

        loader = asyncio.ensure_future(load())
        yield
        loader.cancel()
        await state.close()

    app = FastAPI(
        title="Mask2Former segmentation service",
        version="0.1.0",
        description="Semantic, instance and panoptic segmentation with Mask2Former; masks as COCO RLE.",
        lifespan=lifespan,
    )
    app.state.service = state
    app.state.on_load_error = lambda: None  # `serve` makes this stop the server

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return error_response(exc.status, exc.reason, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        state.metrics.rejections.labels("bad_request").inc()
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_response(422, "bad_request", "; ".join(parts))

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: model loaded and warmed up, not draining")
    async def readyz() -> JSONResponse:
        ok = state.ready and not state.draining
        body: dict[str, Any] = {"ready": ok, "draining": state.draining}
        if state.load_error is not None:
            body["error"] = str(state.load_error)
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", response_model=ModelInfo, responses={503: {"model": ErrorResponse}})
    async def model_info() -> dict[str, Any]:
        if state.runner is None or not state.ready:
            raise HTTPError(503, "not_ready", "the model is still loading")
        runner, cfg = state.runner, state.runner.config
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
                "max_batch_delay_ms": settings.max_batch_delay_ms,
                "bucket_px": settings.bucket_px,
                "max_queue": settings.max_queue,
            },
            "runner": runner.describe(),
        }

    body_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"image": {"type": "string", "format": "binary"}},
                        "required": ["image"],
                    }
                },
            },
        }
    }
    errors = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 500, 503, 504)}

    @app.post("/v1/segment", response_model=SegmentResponse, responses=errors, openapi_extra=body_doc)
    async def segment(
        request: Request,
        task: Annotated[Task | None, Query(description="default: the model's (panoptic with things and stuff)")] = None,
        threshold: Annotated[
            float | None, Query(ge=0, le=1, description="score threshold (default: the model's; instance: 0)")
        ] = None,
        overlap_mask_area_threshold: Annotated[float | None, Query(ge=0, le=1, description="panoptic only")] = None,
        max_instances: Annotated[
            int | None, Query(ge=1, description="instance only: top-k (query, class) pairs")
        ] = None,
        png: Annotated[bool, Query(description="also return the panoptic or semantic map as a base64 PNG")] = False,
    ) -> Response:
        started = time.perf_counter()

        async def handle() -> Response:
            deadline = time.monotonic() + settings.request_timeout_s
            task_name = task or (pipeline.default_task(state.runner.config) if state.runner else "unknown")
            status, admitted = 500, False
            try:
                state.check_admission()  # a full queue or a draining server answers at once, before the upload
                data = await read_upload(request, state, deadline)
                state.admit()
                admitted = True
                loop = asyncio.get_running_loop()
                prepared = await loop.run_in_executor(state.cpu_pool, decode_and_prepare, data, state)
                decoded = time.perf_counter()
                result = await wait_for_result(request, state, Item(prepared.pixels, prepared.resized_size), deadline)
                state.metrics.queue_duration.observe(result.queue_s)
                post_start = time.perf_counter()
                body = await loop.run_in_executor(
                    state.cpu_pool,
                    functools.partial(
                        pipeline.answer,
                        task_name,
                        state.runner.config,
                        prepared,
                        result.class_logits,
                        result.mask_logits,
                        threshold=threshold,
                        overlap_mask_area_threshold=overlap_mask_area_threshold,
                        max_instances=min(max_instances or settings.max_instances, settings.max_instances),
                        png=png,
                    ),
                )
                post_s = time.perf_counter() - post_start
                state.metrics.postprocess_duration.labels(task_name).observe(post_s)
                body["timings"] = {
                    "decode_s": decoded - started,
                    "queue_s": result.queue_s,
                    "inference_s": result.inference_s,
                    "postprocess_s": post_s,
                    "total_s": time.perf_counter() - started,
                    "batch_size": result.batch_size,
                }
                content = await loop.run_in_executor(state.cpu_pool, lambda: json.dumps(body).encode())
                status = 200
                return Response(content, media_type="application/json")
            except asyncio.CancelledError:  # abandoned at the drain timeout (see below)
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
                if admitted:
                    state.release()
                state.metrics.requests.labels(task_name, str(status)).inc()
                state.metrics.request_duration.labels(task_name).observe(time.perf_counter() - started)

        # At the drain timeout every open request is answered 503 draining in JSON (one log line each),
        # before uvicorn's own shutdown deadline would cut it off with a plain-text 500.
        work = asyncio.ensure_future(handle())
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

    return app


DRAIN_GRACE_S = 3  # seconds uvicorn waits past drain_timeout_s for the 503s to be written


def serve(settings: Settings) -> int:
    """Run the service with uvicorn until SIGTERM/SIGINT, draining on the way out (uvicorn then re-raises
    the signal, so the process ends as terminated by it). Returns 1 when the model failed to load; raises
    OSError (one line) at once when the address cannot be bound."""
    import uvicorn

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    app = create_app(settings)
    state: ServiceState = app.state.service

    class DrainingServer(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets: Any = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            state.begin_drain()  # before uvicorn stops listening: /readyz and new requests see it
            if self.loop is not None and not self.should_exit:
                state.abandon_after(self.loop, settings.drain_timeout_s)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        # Later than our own drain timeout, which answers what is still open in JSON first.
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s) + DRAIN_GRACE_S,
    )
    listener = listen_socket(settings.host, settings.port)  # a port in use fails here, before the model loads
    server = DrainingServer(config)
    app.state.on_load_error = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[listener])
    return 1 if state.load_error is not None else 0


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (uvicorn listens on it); OSError in one line when it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
