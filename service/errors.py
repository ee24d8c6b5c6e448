"""Errors answered as JSON: ``{"error": {"status", "reason", "message"}}`` with the right status."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class HTTPError(Exception):
    """An error answered as ``{"error": {"status", "reason", "message"}}``."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers or {}


def error_response(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "reason": reason, "message": message}}, status, headers)
