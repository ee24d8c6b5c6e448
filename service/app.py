"""The HTTP service: thin FastAPI routes over the service state, the scheduler and the pipeline.

``create_app(settings)`` builds the app; the models load and warm up in the background after start-up
(``/healthz`` answers at once, ``/readyz`` once every model is ready; :meth:`service.state.ServiceState.start`).
A segmentation request goes through :func:`service.segment.answer`: upload under its own limits, then the
scheduler (:mod:`service.scheduler`) admits it by predicted work and memory and runs its decoding, its share
of a batch, post-processing and encoding, all within one deadline. Errors are answered in the JSON format of
:mod:`service.errors`.

Models are addressed by name: ``POST /v1/models/{name}/segment``, ``GET /v1/models``, ``GET /v1/models/{name}``;
``POST /v1/segment`` and ``GET /v1/model`` are the default model's. With admin keys, ``PUT /v1/models/{name}``
loads a model or a new version of it while serving, ``DELETE /v1/models/{name}`` unloads one
(:mod:`service.access`).

On SIGTERM (see :mod:`service.server`, which runs it with uvicorn) the service stops admitting (503 ``draining``,
``/readyz`` 503) and finishes what it accepted before exiting (each request ends by its deadline).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from runtimes import Runner
from service.docs import add_offline_docs
from service.errors import add_error_handlers
from service.logs import RequestIdMiddleware
from service.openapi import (
    ADMIN_RESPONSES,
    METRICS_RESPONSES,
    MODEL_RESPONSES,
    READINESS_RESPONSES,
    SEGMENT_BODY,
    SEGMENT_RESPONSES,
)
from service.schemas import Health, LoadRequest, ModelInfo, ModelList, ModelSummary, Readiness, SegmentResponse
from service.segment import SegmentQuery, answer_unless_abandoned
from service.segment import model_info as describe_model
from service.settings import NAME, Settings
from service.state import ServiceState

ModelName = Annotated[str, PathParam(pattern=NAME.pattern, description="a model's name (GET /v1/models)")]
WEB_DIR = Path(__file__).parent / "static"  # the web page at / (index.html and its scripts and styles)
WEB_CSP = (  # the page loads nothing from elsewhere; blob: is its raw-JSON download link
    "default-src 'self'; img-src 'self' blob: data:; connect-src 'self' blob:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)


def create_app(settings: Settings | None = None, runner: Runner | None = None) -> FastAPI:
    """The FastAPI app. With ``runner`` given, that runner is served (and not loaded from ``settings``)."""
    state = ServiceState(settings or Settings(), runner)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.ensure_future(state.start(on_load_error=lambda: app.state.on_load_error()))
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
    add_error_handlers(app, state.metrics)
    app.state.on_load_error = lambda: None  # `service.server.serve` makes this stop the server

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

    @app.get("/v1/models", response_model=ModelList, summary="The models served, by name")
    async def list_models() -> dict[str, Any]:
        scheduler = state.scheduler
        versions = [*state.models.values(), *state.draining_versions]
        models_mb = scheduler.models_bytes() / 2**20
        return {
            "default": state.default,
            "models": [v.describe() for v in versions],
            "memory": {
                "memory_mb": state.settings.memory_mb,
                "models_mb": round(models_mb, 1),
                "requests_mb": round(scheduler.stats().bytes / 2**20, 1),
            },
        }

    @app.get("/v1/models/{name}", response_model=ModelInfo, responses=MODEL_RESPONSES, summary="One model")
    async def one_model(name: ModelName) -> dict[str, Any]:
        return describe_model(state, state.version(name))

    @app.get("/v1/model", response_model=ModelInfo, responses=MODEL_RESPONSES, summary="The default model")
    async def default_model() -> dict[str, Any]:
        return describe_model(state, state.version(state.default))

    @app.post(
        "/v1/models/{name}/segment",
        response_model=SegmentResponse,
        responses=SEGMENT_RESPONSES,
        openapi_extra=SEGMENT_BODY,
        summary="Segment an image with a named model",
    )
    async def segment_with(request: Request, name: ModelName, query: Annotated[SegmentQuery, Depends()]) -> Response:
        return await answer_unless_abandoned(request, state, name, query)

    @app.post(
        "/v1/segment",
        response_model=SegmentResponse,
        responses=SEGMENT_RESPONSES,
        openapi_extra=SEGMENT_BODY,
        summary="Segment an image with the default model",
    )
    async def segment(request: Request, query: Annotated[SegmentQuery, Depends()]) -> Response:
        return await answer_unless_abandoned(request, state, state.default, query)

    @app.put(
        "/v1/models/{name}",
        response_model=ModelSummary,
        responses=ADMIN_RESPONSES,
        summary="Admin: load a model, or a new version of it (it takes new requests once warmed up)",
    )
    async def load_model(request: Request, name: ModelName, body: LoadRequest) -> dict[str, Any]:
        state.keys.check(request, "admin")
        version = await state.load(name, Path(body.path), runtime=body.runtime)
        return version.describe()

    @app.delete(
        "/v1/models/{name}",
        response_model=ModelSummary,
        responses=ADMIN_RESPONSES,
        summary="Admin: unload a model (its admitted requests are answered)",
    )
    async def unload_model(request: Request, name: ModelName) -> dict[str, Any]:
        state.keys.check(request, "admin")
        return (await state.unload(name)).describe()

    return app
