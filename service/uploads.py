"""Reading a request's image under the upload limits: size (413), total time and idle time (408), body or
multipart field, and only in the accepted Content-Types (415). No compute and no admission here: the app
counts concurrent uploads and takes a compute slot only once :func:`image_bytes` has returned."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from fastapi import Request
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service.errors import HTTPError

# The Content-Types of a raw image body: one per format the decoder accepts (pipeline.steps.ALLOWED_FORMATS),
# plus application/octet-stream. The format is read from the data, so a body in another accepted format than
# its Content-Type names is still decoded; a Content-Type not listed here is refused before the body is read.
IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff")
RAW_MEDIA_TYPES = (*IMAGE_MEDIA_TYPES, "application/octet-stream")
MULTIPART = "multipart/form-data"  # the image in its file field IMAGE_FIELD
IMAGE_FIELD = "image"
MAX_FORM_FIELDS = 16  # text fields besides the one file IMAGE_FIELD (ignored; more is a malformed body, 400)
ACCEPTED_MEDIA_TYPES = (*RAW_MEDIA_TYPES, MULTIPART)


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
        except ClientDisconnect:  # the client's doing, not ours: counted as a disconnect, never a 5xx
            raise HTTPError(
                499, "disconnected", f"client closed the connection during the upload ({size} bytes)"
            ) from None
        except asyncio.TimeoutError:
            why = "not sent in time" if left <= limits.idle_s else f"idle for {limits.idle_s:g} s"
            raise HTTPError(408, "upload_timeout", f"request body {why} ({size} bytes received)") from None
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, "too_large", f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(request: Request, limits: UploadLimits) -> bytes:
    """The encoded image: the raw body (one of ``RAW_MEDIA_TYPES``) or the multipart field ``image``."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ACCEPTED_MEDIA_TYPES:
        raise HTTPError(
            415,
            "unsupported_media_type",
            f"Content-Type {ctype or '(none)'} not accepted: send the image as the body ({', '.join(RAW_MEDIA_TYPES)}) "
            f"or as the {MULTIPART} field '{IMAGE_FIELD}'",
        )
    limit = limits.max_bytes
    body = await read_body(request, limits)
    if ctype != MULTIPART:
        if not body:
            raise HTTPError(400, "bad_image", "empty body")
        return body

    async def once():
        yield body

    try:
        form = await MultiPartParser(
            request.headers, once(), max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=limit
        ).parse()
    except MultiPartException as e:
        raise HTTPError(400, "bad_request", f"malformed multipart body: {e.message}") from None
    field = form.get(IMAGE_FIELD)
    if field is None or isinstance(field, str):
        raise HTTPError(400, "bad_request", f"multipart body has no file field '{IMAGE_FIELD}'")
    data = await field.read()
    await form.close()
    if not data:
        raise HTTPError(400, "bad_image", "empty image field")
    return data
