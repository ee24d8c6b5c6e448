"""Reading a request's image under the upload limits: size (413), total time and idle time (408), body or
multipart field. No compute and no admission here: the app counts concurrent uploads and takes a compute
slot only once :func:`image_bytes` has returned."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fastapi import Request
from starlette.formparsers import MultiPartException, MultiPartParser

from service.errors import HTTPError


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
