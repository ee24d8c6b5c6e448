"""The HTTP service: thin FastAPI routes over the batcher and the pipeline.

``create_app(settings)`` builds the app; the model loads and warms up in the background after start-up
(``/healthz`` answers at once, ``/readyz`` once the model is ready). A segmentation request:

1. reads the body (raw JPEG, PNG, WebP, BMP, TIFF or octet-stream, or a multipart field ``image``; else 415) under
   the upload limits, not the compute ones: at most ``max_uploads`` bodies at once (503), each within
   ``upload_timeout_s`` and never idle for ``upload_idle_timeout_s`` (408), up to ``max_body_bytes`` (413),
   so that no number of slow or stalled clients can hold the compute slots;
2. only then reserves a slot: at most ``max_queue`` requests admitted and unanswered, and only while the
   measured cost of those (forward pass per image + post-processing per request) leaves this one time to
   finish within ``request_timeout_s``; else 503 + Retry-After at once. It then decodes and resizes the
   image in a worker thread (415 / 413 / 400);
3. waits for its batch, at most until its deadline (504); a client that disconnects is dropped;
4. post-processes and RLE-encodes its image in a worker thread (:func:`service.pipeline.answer`).

One deadline, ``request_timeout_s`` from the request's start, covers all of it: a step is not started once
it has passed (an expired image never reaches a batch, an expired result is not post-processed), and the
client gets 504 at the deadline even when a step is still running.

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from mask2former.processing import ImageTooLarge, UnsupportedImageFormat
from service import pipeline
from service.admission import Capacity
from service.batching import Batcher, BatchPolicy, BatchResult, Item, choose_batch_size, profile_batches
from service.docs import add_offline_docs
from service.errors import HTTPError, error_response
from service.logs import ContextThreadPoolExecutor, RequestIdMiddleware, configure_logging
from service.metrics import Metrics
from service.openapi import METRICS_RESPONSES, MODEL_RESPONSES, READINESS_RESPONSES, SEGMENT_BODY, SEGMENT_RESPONSES
from service.runtime import Runner, default_side, open_runner
from service.schemas import Health, ModelInfo, Readiness, SegmentResponse, Task
from service.settings import Settings
from service.uploads import UploadLimits, image_bytes

log = logging.getLogger("m2f.service")

# Admission: a request is let in only while the measured cost of those admitted, plus its own, fits in
# this share of the request timeout (the rest is margin for decoding, uploads and noise).
ADMIT_FRACTION = 0.5

WEB_DIR = Path(__file__).parent / "static"  # the web page at / (index.html and its scripts and styles)
WEB_CSP = (  # the page loads nothing from elsewhere; blob: is its raw-JSON download link
    "default-src 'self'; img-src 'self' blob: data:; connect-src 'self' blob:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)


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
        # Request work (decode, post-processing): a pool that keeps the request id on the worker's log lines.
        self.cpu_pool = ContextThreadPoolExecutor(settings.postprocess_workers, thread_name_prefix="m2f-cpu")
        self.capacity = Capacity()  # measured cost per request, for admission
        self.batch_size = settings.max_batch_size  # the batcher's, from the profile (see `load`)
        self.batch_seconds: dict[int, float] = {}  # the profile: seconds per forward pass by batch size

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
        warmup_s = time.perf_counter() - t0
        log.info("warm-up took %.2fs", warmup_s)
        self.capacity.seed(warmup_s)
        self.batch_size = self.runner.input.batch or s.max_batch_size
        if s.batch_profile and self.runner.input.batch is None and s.max_batch_size > 1:
            side = default_side(self.runner.config)
            size = self.runner.input.size or (side, side)
            t0 = time.perf_counter()
            self.batch_seconds = profile_batches(self.runner.run, size, s.max_batch_size)
            # Latency limit: one pass may take at most a quarter of the request timeout.
            self.batch_size = choose_batch_size(self.batch_seconds, max_batch_s=s.request_timeout_s / 4)
            self.capacity.seed(self.batch_seconds[1])
            per_image = ", ".join(f"{b}: {t / b:.3f}s" for b, t in self.batch_seconds.items())
            log.info(
                "batch profile at %dx%d, seconds per image by batch size: %s -> batch size %d (%.1fs)",
                *size,
                per_image,
                self.batch_size,
                time.perf_counter() - t0,
            )

    def start_batcher(self) -> None:
        runner, s = self.runner, self.settings
        fixed_batch = runner.input.batch
        policy = BatchPolicy(
            max_batch_size=self.batch_size,
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
        self.capacity.on_batch(n, seconds)

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
        """Seconds until the requests admitted now are likely answered (1..60)."""
        return str(min(max(math.ceil(self.capacity.predicted_s(self.admitted)), 1), 60))

    def refusal(self, remaining_s: float) -> HTTPError | None:
        """The 503 a request with ``remaining_s`` to its deadline would get now (draining, model not ready,
        queue full, or more admitted than can be answered in time), or None."""
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
        predicted = self.capacity.predicted_s(self.admitted)
        if self.admitted > 0 and predicted > ADMIT_FRACTION * remaining_s:
            return HTTPError(
                503,
                "queue_full",
                f"{self.admitted} requests are queued; another would be answered in about {predicted:.1f} s, "
                f"past its deadline",
                {"Retry-After": self.retry_after()},
            )
        return None

    def check_admission(self, deadline: float) -> None:
        """Refuse at once what :meth:`admit` would refuse now (before the upload)."""
        if (refused := self.refusal(deadline - time.monotonic())) is not None:
            raise refused

    def admit(self, deadline: float) -> tuple[float, float]:
        """Take a compute slot for a request due at ``deadline`` (``time.monotonic()``), or raise its 503.
        Returns when it was admitted and the answer time predicted for it (for ``Capacity.on_answered``)."""
        self.check_admission(deadline)
        self.capacity.on_admitted(self.admitted)
        self.admitted += 1
        self.metrics.inflight.set(self.admitted)
        return time.monotonic(), self.capacity.predicted_s(self.admitted - 1)

    def release(self) -> None:
        self.admitted -= 1
        self.metrics.inflight.set(self.admitted)

    async def before(self, deadline: float, step: str, spent: list[float], fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the CPU pool if the request's deadline (``time.monotonic()``) has not passed, and
        its result if it comes before the deadline; else 504. A step cut off at the deadline finishes in its
        worker thread (Python threads cannot be stopped), but no later step of that request starts.
        The seconds ``fn`` ran (not its wait for a worker) are appended to ``spent``."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HTTPError(504, "timeout", f"the request's deadline passed before {step}")

        def timed() -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                spent.append(time.perf_counter() - t0)

        work = asyncio.get_running_loop().run_in_executor(self.cpu_pool, timed)
        try:
            return await asyncio.wait_for(work, remaining)
        except asyncio.TimeoutError:
            raise HTTPError(504, "timeout", f"the request's deadline passed during {step}") from None


# ---------------------------------------------------------------------------------------------- body
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


# ---------------------------------------------------------------------------------------------- app
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
        docs_url=None,  # served by add_offline_docs, from local assets
        redoc_url=None,
    )
    app.state.service = state
    app.add_middleware(RequestIdMiddleware)  # X-Request-ID on every answer, the id on log lines, the access log
    add_offline_docs(app)
    app.state.on_load_error = lambda: None  # `serve` makes this stop the server

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return error_response(exc.status, exc.reason, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _routing_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405 + Allow
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, reason, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        state.metrics.rejections.labels("bad_request").inc()
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_response(422, "bad_request", "; ".join(parts))

    @app.get("/healthz", summary="Liveness: the process answers", response_model=Health)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: model loaded and warmed up, not draining",
        response_model=Readiness,
        responses=READINESS_RESPONSES,
    )
    async def readyz() -> JSONResponse:
        ok = state.ready and not state.draining
        body: dict[str, Any] = {"ready": ok, "draining": state.draining}
        if state.load_error is not None:
            body["error"] = str(state.load_error)
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse, responses=METRICS_RESPONSES)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

    @app.get("/", include_in_schema=False)
    async def web_page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Content-Security-Policy": WEB_CSP})

    @app.get("/v1/model", response_model=ModelInfo, responses=MODEL_RESPONSES)
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
                "profile_s": {str(b): t for b, t in state.batch_seconds.items()},  # seconds per pass by batch size
                "max_batch_delay_ms": settings.max_batch_delay_ms,
                "bucket_px": settings.bucket_px,
                "max_queue": settings.max_queue,
            },
            "runner": runner.describe(),
        }

    @app.post("/v1/segment", response_model=SegmentResponse, responses=SEGMENT_RESPONSES, openapi_extra=SEGMENT_BODY)
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
            request.state.access = {"task": task_name}  # for the access-log line (service.logs)
            status, admitted = 500, False
            try:
                state.check_admission(deadline)  # a full queue or a draining server answers at once, before the upload
                data = await read_upload(request, state, deadline)
                admission = state.admit(deadline)
                admitted, spent = True, []  # spent: seconds of CPU-pool work for this request
                prepared = await state.before(deadline, "decoding", spent, decode_and_prepare, data, state)
                decoded = time.perf_counter()
                request.state.access.update(height=prepared.original_size[0], width=prepared.original_size[1])
                result = await wait_for_result(request, state, Item(prepared.pixels, prepared.resized_size), deadline)
                state.metrics.queue_duration.observe(result.queue_s)
                post_start = time.perf_counter()
                body = await state.before(  # not started past the deadline, and 504 at it
                    deadline,
                    "post-processing",
                    spent,
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
                request.state.access.update(queue_s=result.queue_s, inference_s=result.inference_s)
                request.state.access.update(postprocess_s=post_s)
                content = await state.before(deadline, "encoding", spent, lambda: json.dumps(body).encode())
                state.capacity.on_answered(sum(spent), *admission)
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

    configure_logging(settings.log_level, settings.log_format)  # text or JSON lines, each with its request id
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
        log_config=None,  # uvicorn's loggers go through ours (configure_logging): one format, request ids
        access_log=False,  # ours is service.logs.RequestIdMiddleware's, with the request's timings
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
