"""A Python client for ``m2f serve``: typed results, masks decoded on demand, retries on 503, batches.

Needs only httpx, numpy, pillow and pycocotools (``pip install ".[client]"``); no torch, no FastAPI::

    from service.client import Client

    with Client("http://127.0.0.1:8000") as client:
        result = client.segment("photo.jpg", task="panoptic")
        for s in result.segments:
            print(s.label, s.score, s.area, s.mask.shape)  # s.mask: (H, W) bool, decoded from COCO RLE
        results = client.batch(["a.jpg", "b.jpg", "c.jpg"], concurrency=4)  # in input order
        client.segment("photo.jpg", model="ade20k")  # a model the server serves by name (client.models())

``Client(url, model="ade20k", api_key=KEY)`` sends every request to that model, with that key.
:class:`AsyncClient` has the same methods as coroutines. An image is a path (``str`` / ``Path``), encoded bytes,
a PIL image or a numpy array (H, W, 3) ``uint8`` (RGB; (H, W) grey and (H, W, 4) RGBA work too). A 503 that
carries ``Retry-After`` (queue full, server loading or draining, too many uploads) is retried after that many
seconds, at most ``max_retries`` times and ``max_wait_s`` seconds in all; any other error answer raises
:class:`ServerError` with the server's status, reason and message.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

ImageInput = str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray

REQUEST_ID_HEADER = "X-Request-ID"
DEFAULT_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Segment:
    """One segment of an answer; ``rle`` is its COCO RLE at the original image size."""

    id: int
    label: str
    category_id: int
    score: float | None  # None for semantic segments
    area: int
    bbox: tuple[int, int, int, int]  # x, y, width, height
    isthing: bool
    rle: dict[str, Any] = field(repr=False)

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool mask, decoded from the RLE on each access (``pycocotools.mask.decode``)."""
        rle = {"size": list(self.rle["size"]), "counts": self.rle["counts"].encode()}
        return mask_util.decode(rle).astype(bool)


@dataclass(frozen=True)
class Timings:
    """Where the server spent the request's time, in seconds (``batch_size``: images in its forward pass)."""

    decode_s: float
    queue_s: float
    inference_s: float
    postprocess_s: float
    total_s: float
    batch_size: int


@dataclass(frozen=True)
class SegmentationResult:
    """The answer of ``POST /v1/segment``. ``png`` is the decoded PNG bytes when asked for with ``png=True``."""

    width: int
    height: int
    task: str
    model: str
    segments: list[Segment]
    timings: Timings
    png: bytes | None
    request_id: str | None  # the server's X-Request-ID for this answer (find its log lines with it)


@dataclass(frozen=True)
class Label:
    id: int
    name: str
    isthing: bool


@dataclass(frozen=True)
class ModelInfo:
    """``GET /v1/models/{name}`` (``/v1/model``: the default model): the name it is served under, its version, the
    checkpoint's own name (``model``), runtime, tasks and labels; ``raw`` has the whole answer."""

    name: str
    version: int
    model: str
    runtime: str
    tasks: list[str]
    default_task: str
    labels: list[Label]
    raw: dict[str, Any] = field(repr=False)


class ServerError(Exception):
    """An error answer: HTTP ``status``, the server's ``reason`` (as in ``m2f_rejections_total``) and ``message``;
    ``retry_after`` (seconds) when the server sent one, ``attempts`` made, the answer's ``request_id``."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        request_id: str | None = None,
        retry_after: float | None = None,
        attempts: int = 1,
    ):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message
        self.request_id, self.retry_after, self.attempts = request_id, retry_after, attempts


def parse_result(doc: dict[str, Any], request_id: str | None = None) -> SegmentationResult:
    segments = [
        Segment(
            id=s["id"],
            label=s["label"],
            category_id=s["category_id"],
            score=s["score"],
            area=s["area"],
            bbox=tuple(s["bbox"]),
            isthing=s["isthing"],
            rle=s["segmentation"],
        )
        for s in doc["segments"]
    ]
    png = base64.b64decode(doc["png"]) if doc.get("png") else None
    return SegmentationResult(
        width=doc["width"],
        height=doc["height"],
        task=doc["task"],
        model=doc["model"],
        segments=segments,
        timings=Timings(**doc["timings"]),
        png=png,
        request_id=request_id,
    )


def parse_model_info(doc: dict[str, Any]) -> ModelInfo:
    labels = [Label(label["id"], label["name"], label["isthing"]) for label in doc["labels"]]
    return ModelInfo(
        doc["name"], doc["version"], doc["model"], doc["runtime"], list(doc["tasks"]), doc["default_task"], labels, doc
    )


# ---------------------------------------------------------------------------------------------- requests
def encode_image(image: ImageInput) -> bytes:
    """The bytes to upload: a file's contents, the bytes as given, or a PIL image / array encoded as PNG."""
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        image = array_to_image(image)
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "I;16", "1"):
            image = image.convert("RGB")  # e.g. CMYK, which PNG cannot hold
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    raise TypeError(f"image must be a path, bytes, a PIL image or a numpy array, got {type(image).__name__}")


def array_to_image(array: np.ndarray) -> Image.Image:
    """(H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey ``uint8`` -> PIL image."""
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        return Image.fromarray(np.ascontiguousarray(array))
    raise ValueError(f"image arrays must be (H, W, 3), (H, W, 4) or (H, W), got shape {array.shape}")


def segment_params(
    task: str | None,
    threshold: float | None,
    overlap_mask_area_threshold: float | None,
    max_instances: int | None,
    png: bool,
) -> dict[str, str]:
    params = {
        "task": task,
        "threshold": threshold,
        "overlap_mask_area_threshold": overlap_mask_area_threshold,
        "max_instances": max_instances,
    }
    out = {k: str(v) for k, v in params.items() if v is not None}
    if png:
        out["png"] = "true"
    return out


def segment_path(model: str | None) -> str:
    """The route that segments with ``model`` (None: the server's default model)."""
    return "/v1/segment" if model is None else f"/v1/models/{urllib.parse.quote(model, safe='')}/segment"


def info_path(model: str | None) -> str:
    return "/v1/model" if model is None else f"/v1/models/{urllib.parse.quote(model, safe='')}"


def auth_headers(api_key: str | None, headers: dict[str, str] | None) -> dict[str, str]:
    return {**(headers or {}), **({"Authorization": f"Bearer {api_key}"} if api_key else {})}


def request_headers(request_id: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/octet-stream"}
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    return headers


def error_from(response: httpx.Response, attempts: int = 1) -> ServerError:
    """The :class:`ServerError` of an error answer (JSON ``{"error": {...}}``, or any other body)."""
    try:
        err = response.json()["error"]
        reason, message = str(err["reason"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        reason, message = "http_error", response.text[:500] or response.reason_phrase
    return ServerError(
        response.status_code,
        reason,
        message,
        response.headers.get(REQUEST_ID_HEADER),
        retry_after_s(response),
        attempts,
    )


def retry_after_s(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (the delay form; an HTTP date is not used by this server)."""
    value = response.headers.get("Retry-After")
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class RetryPolicy:
    """Retry a 503 that has ``Retry-After``, at most ``max_retries`` times and ``max_wait_s`` seconds of waiting
    in all; a wait that would go past ``max_wait_s`` is not started (the 503 is raised instead)."""

    max_retries: int = 3
    max_wait_s: float = 30.0

    def delay(self, response: httpx.Response, retries: int, waited: float) -> float | None:
        """Seconds to wait before retrying ``response``, or None to give up."""
        if response.status_code != 503 or retries >= self.max_retries:
            return None
        delay = retry_after_s(response)
        if delay is None or waited + delay > self.max_wait_s:
            return None
        return delay


def check(response: httpx.Response, attempts: int = 1) -> httpx.Response:
    if response.status_code >= 400:
        raise error_from(response, attempts)
    return response


# ---------------------------------------------------------------------------------------------- clients
class Client:
    """Synchronous client. ``url``: the server's base URL; ``timeout``: seconds per HTTP request;
    ``max_retries`` / ``max_wait_s``: the 503 retry budget (:class:`RetryPolicy`). Thread-safe: :meth:`batch`
    shares one connection pool between its threads."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = 3,
        max_wait_s: float = 30.0,
        headers: dict[str, str] | None = None,
        model: str | None = None,
        api_key: str | None = None,
    ):
        self.retry = RetryPolicy(max_retries, max_wait_s)
        self.model = model
        self._http = httpx.Client(base_url=url, timeout=timeout, headers=auth_headers(api_key, headers))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def segment(
        self,
        image: ImageInput,
        task: str | None = None,
        threshold: float | None = None,
        overlap_mask_area_threshold: float | None = None,
        max_instances: int | None = None,
        png: bool = False,
        request_id: str | None = None,
        model: str | None = None,
    ) -> SegmentationResult:
        """Segment one image (see the module docstring for the accepted types) with ``model`` (else the client's
        model, else the server's default); parameters as the HTTP API's."""
        data = encode_image(image)
        params = segment_params(task, threshold, overlap_mask_area_threshold, max_instances, png)
        headers = request_headers(request_id)
        path = segment_path(model or self.model)
        retries, waited = 0, 0.0
        while True:
            response = self._http.post(path, content=data, params=params, headers=headers)
            delay = self.retry.delay(response, retries, waited)
            if delay is None:
                break
            time.sleep(delay)
            retries, waited = retries + 1, waited + delay
        check(response, retries + 1)
        return parse_result(response.json(), response.headers.get(REQUEST_ID_HEADER))

    def batch(
        self, images: Iterable[ImageInput], concurrency: int = 4, return_exceptions: bool = False, **kwargs: Any
    ) -> list[SegmentationResult | Exception]:
        """Segment every image, at most ``concurrency`` requests at once (threads); results in input order.
        The first failure raises, unless ``return_exceptions`` (then the exception takes its place)."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")

        def one(image: ImageInput) -> SegmentationResult | Exception:
            try:
                return self.segment(image, **kwargs)
            except Exception as e:
                if return_exceptions:
                    return e
                raise

        with ThreadPoolExecutor(concurrency, thread_name_prefix="m2f-client") as pool:
            futures = [pool.submit(one, image) for image in images]
            try:
                return [f.result() for f in futures]
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)  # what has not started yet never starts
                raise

    def health(self) -> bool:
        """``/healthz``: the process answers (False when it does not, or cannot be reached)."""
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def ready(self) -> bool:
        """``/readyz``: model loaded and warmed up, not draining."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.2) -> None:
        """Poll :meth:`ready` until it is True; ``TimeoutError`` after ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > end:
                raise TimeoutError(f"server not ready after {timeout:g}s")
            time.sleep(interval)

    def model_info(self, model: str | None = None) -> ModelInfo:
        """``GET /v1/models/{model}`` (else the client's model, else the server's default)."""
        return parse_model_info(check(self._http.get(info_path(model or self.model))).json())

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: ``default`` (the default model's name), ``models`` (one entry per version served:
        name, version, state, runtime, tasks, memory, ...) and ``memory`` (the budget and its use, MiB)."""
        return check(self._http.get("/v1/models")).json()


class AsyncClient:
    """The asynchronous twin of :class:`Client`: the same arguments and methods, as coroutines; :meth:`batch`
    bounds the requests in flight with a semaphore."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        timeout: float = DEFAULT_TIMEOUT_S,
        max_retries: int = 3,
        max_wait_s: float = 30.0,
        headers: dict[str, str] | None = None,
        model: str | None = None,
        api_key: str | None = None,
    ):
        self.retry = RetryPolicy(max_retries, max_wait_s)
        self.model = model
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout, headers=auth_headers(api_key, headers))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def segment(
        self,
        image: ImageInput,
        task: str | None = None,
        threshold: float | None = None,
        overlap_mask_area_threshold: float | None = None,
        max_instances: int | None = None,
        png: bool = False,
        request_id: str | None = None,
        model: str | None = None,
    ) -> SegmentationResult:
        """Segment one image; see :meth:`Client.segment`."""
        data = encode_image(image)
        params = segment_params(task, threshold, overlap_mask_area_threshold, max_instances, png)
        headers = request_headers(request_id)
        path = segment_path(model or self.model)
        retries, waited = 0, 0.0
        while True:
            response = await self._http.post(path, content=data, params=params, headers=headers)
            delay = self.retry.delay(response, retries, waited)
            if delay is None:
                break
            await asyncio.sleep(delay)
            retries, waited = retries + 1, waited + delay
        check(response, retries + 1)
        return parse_result(response.json(), response.headers.get(REQUEST_ID_HEADER))

    async def batch(
        self, images: Sequence[ImageInput], concurrency: int = 4, return_exceptions: bool = False, **kwargs: Any
    ) -> list[SegmentationResult | Exception]:
        """Segment every image, at most ``concurrency`` requests in flight; results in input order. The first
        failure raises (the other requests are cancelled), unless ``return_exceptions``."""
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        slots = asyncio.Semaphore(concurrency)

        async def one(image: ImageInput) -> SegmentationResult:
            async with slots:
                return await self.segment(image, **kwargs)

        tasks = [asyncio.ensure_future(one(image)) for image in images]
        try:
            return list(await asyncio.gather(*tasks, return_exceptions=return_exceptions))
        finally:
            for t in tasks:
                t.cancel()

    async def health(self) -> bool:
        try:
            return (await self._http.get("/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def wait_ready(self, timeout: float = 120.0, interval: float = 0.2) -> None:
        end = time.monotonic() + timeout
        while not await self.ready():
            if time.monotonic() > end:
                raise TimeoutError(f"server not ready after {timeout:g}s")
            await asyncio.sleep(interval)

    async def model_info(self, model: str | None = None) -> ModelInfo:
        return parse_model_info(check(await self._http.get(info_path(model or self.model))).json())

    async def models(self) -> dict[str, Any]:
        return check(await self._http.get("/v1/models")).json()
