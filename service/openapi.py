"""What ``/openapi.json`` says about the routes beyond their pydantic models: the request body of
``POST /v1/segment`` (exactly the Content-Types :func:`service.uploads.image_bytes` accepts), the media type
of ``/metrics``, and every status code each route answers, with the schema of its body.

The routes in :mod:`service.app` pass these as ``responses=`` / ``openapi_extra=``; ``tests/test_openapi.py``
fuzzes the running server against the document with schemathesis.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from service.schemas import ErrorResponse, Readiness
from service.uploads import IMAGE_FIELD, IMAGE_MEDIA_TYPES, MAX_FORM_FIELDS, MULTIPART, RAW_MEDIA_TYPES

BINARY = {"type": "string", "format": "binary"}

SEGMENT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "The encoded image (JPEG, PNG, WebP, BMP or TIFF; the format is read from the data, animated images "
            f"give their first frame) as the body, or as the {MULTIPART} file field '{IMAGE_FIELD}'. Any other "
            "Content-Type gets 415."
        ),
        "content": {
            **{media_type: {"schema": BINARY} for media_type in RAW_MEDIA_TYPES},
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "properties": {IMAGE_FIELD: BINARY},
                    "required": [IMAGE_FIELD],
                    # Other fields are ignored: at most MAX_FORM_FIELDS, text (one file per request). Any value is
                    # text on the wire, so no type is stated for them.
                    "maxProperties": 1 + MAX_FORM_FIELDS,
                    "description": f"the image in the file field '{IMAGE_FIELD}'; other fields (text, at most "
                    f"{MAX_FORM_FIELDS}) are ignored",
                },
                "encoding": {IMAGE_FIELD: {"contentType": ", ".join((*IMAGE_MEDIA_TYPES, "application/octet-stream"))}},
            },
        },
    }
}


# With response_class=PlainTextResponse: documented as text/plain (the route answers CONTENT_TYPE_LATEST).
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": f"the Prometheus text exposition format (Content-Type: {CONTENT_TYPE_LATEST})"}
}

READINESS_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {
        "model": Readiness,
        "description": "the model is loading or failed to load (error), or the server is draining",
    }
}

RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before trying again (absent when the model failed to load)",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def errors(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for error status -> description, each with the ErrorResponse body."""
    return {status: {"model": ErrorResponse, "description": text} for status, text in descriptions.items()}


MODEL_RESPONSES = errors(
    {404: "not_found: no model of that name (the message lists those there are)", 503: "not_ready: still loading"}
)
ADMIN_RESPONSES = errors(
    {
        400: "http_error: a body that is not JSON",
        401: "unauthorized: no admin key, or not a valid one",
        403: "forbidden: the admin routes are off (the server has no admin keys)",
        404: "not_found: no model of that name (unload)",
        409: "conflict: the default model cannot be unloaded",
        422: "load_failed: the model failed to load (the version serving before goes on), or a malformed body",
        503: "draining: the server is shutting down",
        507: "over_memory: the model would not fit the memory budget (memory_mb) beside the models loaded",
    }
)

SEGMENT_RESPONSES = errors(
    {
        400: "bad_image (empty, truncated, zero-size or corrupt image) or bad_request (malformed multipart body, "
        f"no file field '{IMAGE_FIELD}', invalid Content-Length)",
        401: "unauthorized: the server has segment keys and the request named none, or not a valid one",
        404: "not_found: no model of that name (the message lists those there are)",
        408: "upload_timeout: the body was not sent within the upload timeout, or the upload stalled",
        413: "too_large: the body is over the size limit, or the image over the pixel limit (read from its header)",
        415: "unsupported_media_type: a Content-Type not listed in the request body, or data that is not an image "
        "in an accepted format",
        422: "bad_request: invalid query parameters",
        500: "internal: inference failed (see the server log)",
        503: "not_ready, draining, queue_full (cannot be answered before its deadline) or too_many_uploads",
        504: "timeout: the request's deadline passed",
    }
)
SEGMENT_RESPONSES[503]["headers"] = RETRY_AFTER
