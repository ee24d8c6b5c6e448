"""Errors answered as JSON: ``{"error": {"status", "reason", "message"}}`` with the right status.

A 408 or 413 also says ``Connection: close``: such an answer comes before the request's body was read to its
end, so the server closes the connection rather than read the rest (:mod:`service.server` closes it).
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.metrics import Metrics


class HTTPError(Exception):
    """An error answered as ``{"error": {"status", "reason", "message"}}``."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers or {}


CLOSE_STATUSES = (408, 413)  # answered before the body was read: the connection is closed


def error_document(status: int, reason: str, message: str) -> dict:
    return {"error": {"status": status, "reason": reason, "message": message}}


def error_body(status: int, reason: str, message: str) -> bytes:
    """The JSON body of an error answer, for answers written outside the app (:mod:`service.server`)."""
    return json.dumps(error_document(status, reason, message), separators=(",", ":")).encode()


def error_response(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    if status in CLOSE_STATUSES:
        headers = {**(headers or {}), "Connection": "close"}
    return JSONResponse(error_document(status, reason, message), status, headers)


def add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Answer our :class:`HTTPError`, routing errors (404, 405 + Allow) and invalid parameters (422, counted as
    ``bad_request`` rejections in ``metrics``) in the JSON error format."""

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return error_response(exc.status, exc.reason, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _routing_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405 + Allow
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:  # Starlette names the methods of the first route on the path; list them all
            methods = set()
            for route in request.app.routes:
                if route.matches(request.scope)[0] != Match.NONE:
                    methods |= getattr(route, "methods", None) or set()
            headers = {**(headers or {}), "Allow": ", ".join(sorted(methods))}
        return error_response(exc.status_code, reason, str(exc.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.rejections.labels("bad_request").inc()
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_response(422, "bad_request", "; ".join(parts))
