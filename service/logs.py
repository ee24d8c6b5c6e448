"""Request ids, logging and the access log of the HTTP service.

Every request gets an id: the client's ``X-Request-ID`` when it is usable (printable ASCII, at most 128
characters), else a new uuid4 hex. :class:`RequestIdMiddleware` sets it in a :class:`~contextvars.ContextVar`
for the duration of the request, returns it as the ``X-Request-ID`` header of every answer, and writes one
access-log line per request (logger ``m2f.access``). :class:`RequestIdFilter` puts the id on every log record,
so each line logged while a request is handled carries it; work handed to thread pools keeps it when the pool
is a :class:`ContextThreadPoolExecutor` (``loop.run_in_executor`` does not copy context variables itself).

``configure_logging(level, "text" | "json")`` sets up the root logger for ``m2f serve``: text lines, or one
JSON object per line with ``time``, ``level``, ``logger``, ``message``, ``request_id`` and, on access lines,
the access fields.

What a client sends cannot forge log structure. A client's id is kept as it is (the answer's header, the JSON
``request_id``, where JSON escaping holds it), but on a text line it is written as is only when it is made of
printable ASCII other than spaces, double quotes, backslashes and square brackets; any other id is written as
a JSON string: ``[abc-123]``, ``["a] b"]``. The request's path on text lines (access and debug) follows the
same rule, since it is percent-decoded and may hold spaces or newlines.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

HEADER = "X-Request-ID"
MAX_ID_LENGTH = 128
NO_REQUEST = "-"  # the id on lines logged outside any request (start-up, batches, shutdown)

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("m2f_request_id", default=NO_REQUEST)
access_log = logging.getLogger("m2f.access")
log = logging.getLogger("m2f.service")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def valid_request_id(value: str | None) -> bool:
    """A client's id is kept when it is 1..128 printable ASCII characters (space allowed, not only spaces)."""
    return bool(value and value.strip()) and len(value) <= MAX_ID_LENGTH and all(" " <= c <= "~" for c in value)


def choose_request_id(value: str | None) -> str:
    """The client's id when valid, else a new uuid4 hex."""
    return value if valid_request_id(value) else uuid.uuid4().hex


# ---------------------------------------------------------------------------------------------- logging
PLAIN = re.compile(r"[!#-Z^-~]+")  # printable ASCII but space, '"', '[', '\\' and ']': safe as is on a text line


def text_safe(value: str) -> str:
    """``value`` as it is on a text log line when it cannot be mistaken for the line's structure, else as a JSON
    string (quoted; quotes, backslashes, control and non-ASCII characters escaped)."""
    return value if PLAIN.fullmatch(value) else json.dumps(value)


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id``: the id of the request being handled, ``-`` outside requests; and
    ``record.request_id_text``, the same for text lines (:func:`text_safe`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        record.request_id_text = text_safe(str(record.request_id))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id, and the access
    fields on access lines (``extra={"access": {...}}``); a traceback goes in ``exception``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", NO_REQUEST),
        }
        doc.update(getattr(record, "access", {}))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id_text)s]: %(message)s"  # RequestIdFilter's fields


def configure_logging(level: str, fmt: str = "text") -> None:
    """Root logging for the service: one stderr handler, ``text`` or ``json`` lines, each with its request id.
    Uvicorn's loggers propagate to it (``m2f serve`` passes ``log_config=None``)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class ContextThreadPoolExecutor(ThreadPoolExecutor):
    """A thread pool that runs each task in a copy of the submitter's context, so that log lines written in
    the worker carry the request id (``loop.run_in_executor`` does not copy context variables)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)


# ---------------------------------------------------------------------------------------------- middleware
MAX_ERROR_BODY = 65536  # error answers are read for their reason up to this size


def error_reason(body: bytes) -> str | None:
    """The ``reason`` of an error answer ``{"error": {"reason": ...}}``, or None."""
    try:
        reason = json.loads(body)["error"]["reason"]
    except (ValueError, KeyError, TypeError):
        return None
    return reason if isinstance(reason, str) else None


def access_fields(
    method: str, path: str, status: int, seconds: float, rid: str, extra: dict, reason: str | None
) -> dict[str, Any]:
    """The access line's fields: the request, its status (and error reason) and time, and what the handler
    recorded in ``request.state.access`` (task, image size, queue / inference / post-processing seconds)."""
    fields = {"method": method, "path": path, "status": status, **({"reason": reason} if reason else {})}
    fields.update({k: round(v, 6) if isinstance(v, float) else v for k, v in extra.items()})
    fields["total_s"] = round(seconds, 6)
    fields["request_id"] = rid
    return fields


def access_message(fields: dict[str, Any]) -> str:
    """``POST /v1/segment 200 task=panoptic image=640x480 queue=0.003s ... total=0.452s``."""
    parts = [fields["method"], text_safe(fields["path"]), str(fields["status"])]
    if "reason" in fields:
        parts.append(fields["reason"])
    if "task" in fields:
        parts.append(f"task={fields['task']}")
    if "width" in fields and "height" in fields:
        parts.append(f"image={fields['width']}x{fields['height']}")
    for key in ("queue_s", "inference_s", "postprocess_s", "total_s"):
        if key in fields:
            parts.append(f"{key[:-2]}={fields[key]:.3f}s")
    return " ".join(parts)


class RequestIdMiddleware:
    """ASGI middleware: the request id (context variable and ``X-Request-ID`` on every answer) and one
    access-log line per HTTP request. An exception that escapes the app before it answered is logged and
    answered as a JSON 500 here, so that even that answer carries the id."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(HEADER.lower().encode(), b"")
        rid = choose_request_id(header.decode("latin-1") or None)
        token = request_id.set(rid)
        started = time.perf_counter()
        status, error_body = 0, bytearray()
        log.debug("%s %s from %s", scope["method"], text_safe(scope["path"]), (scope.get("client") or ("?",))[0])

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message["headers"] = [*headers, (b"x-request-id", rid.encode("latin-1"))]
            elif status >= 400 and len(error_body) < MAX_ERROR_BODY:
                error_body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if status:  # the answer had started: nothing more can be sent
                raise
            status = 500
            await send_with_id(
                {"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]}
            )
            body = {"error": {"status": 500, "reason": "internal", "message": "internal error; see the server log"}}
            await send_with_id({"type": "http.response.body", "body": json.dumps(body).encode()})
        finally:
            extra = dict((scope.get("state") or {}).get("access") or {})
            seconds = time.perf_counter() - started
            reason = error_reason(bytes(error_body)) if error_body else None
            fields = access_fields(scope["method"], scope["path"], status, seconds, rid, extra, reason)
            access_log.info(access_message(fields), extra={"access": fields})
            request_id.reset(token)
