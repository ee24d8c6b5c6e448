"""The OpenAPI document of ``m2f serve`` says what the server does.

The real server (demo model) on 127.0.0.1: its ``/openapi.json`` lists exactly the accepted upload types and
``/metrics`` as text/plain, each listed type is accepted and others get 415, and schemathesis fuzzes every
operation of the document over HTTP with all its default checks (no 5xx, only documented status codes and
content types, bodies and headers matching their schemas, invalid input rejected, valid input accepted).
"""

from __future__ import annotations

import io

import hypothesis
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import strategies as st
from PIL import Image
from schemathesis.config import SchemathesisConfig

from m2f import synth
from pipeline.steps import ALLOWED_FORMATS
from service.app import create_app

# Every format the decoder accepts, by the media type PIL gives it: the document must list exactly these.
Image.init()
IMAGE_FORMATS = {Image.MIME[name]: name for name in sorted(ALLOWED_FORMATS)}
OTHER_TYPES = ["image/gif", "image/jpg", "image/svg+xml", "image/x-icon", "text/plain", "application/json"]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--max-batch-size", "1")


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def sample(size: tuple[int, int] = (96, 64)) -> Image.Image:
    return Image.fromarray(synth.make_sample(seed=7, index=0, size=size).image)


# ---------------------------------------------------------------------------------------------- document
def test_document_lists_the_accepted_types_and_metrics_as_text(server):
    spec = server.client.get("/openapi.json").json()
    body = spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]
    assert set(body) == {*IMAGE_FORMATS, "application/octet-stream", "multipart/form-data"}
    part_types = body["multipart/form-data"]["encoding"]["image"]["contentType"].split(", ")
    assert set(part_types) == {*IMAGE_FORMATS, "application/octet-stream"}
    metrics = spec["paths"]["/metrics"]["get"]["responses"]
    assert set(metrics) == {"200"} and set(metrics["200"]["content"]) == {"text/plain"}
    assert server.client.get("/metrics").headers["content-type"].startswith("text/plain;")
    readyz = spec["paths"]["/readyz"]["get"]["responses"]
    assert {code: list(r["content"]) for code, r in readyz.items()} == {
        "200": ["application/json"],
        "503": ["application/json"],
    }
    for code, response in spec["paths"]["/v1/segment"]["post"]["responses"].items():
        ref = response["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/SegmentResponse" if code == "200" else "/ErrorResponse"), code


@pytest.mark.parametrize("ctype", sorted(IMAGE_FORMATS))
def test_each_listed_image_type_is_accepted(server, ctype):
    image = sample()
    data = encode(image, IMAGE_FORMATS[ctype])
    r = server.client.post("/v1/segment", content=data, headers={"Content-Type": ctype}, params={"task": "semantic"})
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == image.size


def test_octet_stream_and_multipart_are_accepted(server):
    data = encode(sample(), "WEBP")
    r = server.client.post("/v1/segment", content=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    r = server.client.post("/v1/segment", files={"image": ("x.tif", encode(sample(), "TIFF"), "image/tiff")})
    assert r.status_code == 200, r.text


def test_multipart_field_limit_is_the_documented_one(server):
    spec = server.client.get("/openapi.json").json()
    form = spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    most = form["maxProperties"]  # the image and the other (ignored) fields
    files = {"image": ("x.png", encode(sample(), "PNG"), "image/png")}
    fields = {f"field{i}": "x" for i in range(most)}
    r = server.client.post("/v1/segment", files=files, data=dict(list(fields.items())[: most - 1]))
    assert r.status_code == 200, r.text
    r = server.client.post("/v1/segment", files=files, data=fields)
    assert r.status_code == 400 and r.json()["error"]["reason"] == "bad_request", r.text


@pytest.mark.parametrize("ctype", OTHER_TYPES)
def test_other_content_types_get_415(server, ctype):
    r = server.client.post("/v1/segment", content=encode(sample(), "PNG"), headers={"Content-Type": ctype})
    assert r.status_code == 415, r.text
    assert r.json()["error"]["reason"] == "unsupported_media_type"
    assert ctype in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- schemathesis
@st.composite
def images(draw: st.DrawFn, formats: tuple[str, ...]) -> bytes:
    """A small image in one of ``formats`` (PIL names): random size, mode and pixels."""
    w, h = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA"]))
    fmt = draw(st.sampled_from(formats))
    if fmt == "JPEG" and mode == "RGBA":
        mode = "RGB"
    pixels = draw(st.binary(min_size=w * h * len(mode), max_size=w * h * len(mode)))
    return encode(Image.frombytes(mode, (w, h), pixels), fmt)


# Bodies of each listed type are real images of that format (octet-stream: any accepted one); schemathesis'
# own raw bodies would be random bytes, which the schema (a binary string) allows but no decoder reads.
for _ctype, _fmt in IMAGE_FORMATS.items():
    schemathesis.openapi.media_type(_ctype, images((_fmt,)))
schemathesis.openapi.media_type("application/octet-stream", images(tuple(sorted(ALLOWED_FORMATS))))


# The document is built in process at collection (schemathesis' fixture-based loader does not run under pytest 9.2:
# it sets the removed ``Function._nodeid``); test_the_server_serves_this_document ties it to the server's.
DOCUMENT = create_app().openapi()
CONFIG = {"seed": 2024, "generation": {"max-examples": 15, "database": "none"}, "request-timeout": 30}
schema = schemathesis.openapi.from_dict(DOCUMENT, config=SchemathesisConfig.from_dict(CONFIG))


def test_the_server_serves_this_document(server):
    assert server.client.get("/openapi.json").json() == DOCUMENT


def test_not_ready_answers_match_the_document():
    """The 503s of a server whose model is not loaded (in process: the app without its start-up) against the
    document, with the conformance checks (not_a_server_error would reject any 503)."""
    conformance = [
        schemathesis.checks.status_code_conformance,
        schemathesis.checks.content_type_conformance,
        schemathesis.checks.response_headers_conformance,
        schemathesis.checks.response_schema_conformance,
    ]
    png = encode(sample(), "PNG")
    client = TestClient(create_app())  # not entered as a context manager: no start-up, no model
    calls = [("/readyz", "GET", {}), ("/v1/model", "GET", {}), ("/v1/segment", "POST", {"body": png})]
    for path, method, kwargs in calls:
        case = schema[path][method].Case(media_type="image/png" if kwargs else None, **kwargs)
        response = client.request(method, path, content=kwargs.get("body"), headers={"Content-Type": "image/png"})
        assert response.status_code == 503, (path, response.text)
        case.validate_response(response, checks=conformance)
    assert client.post("/v1/segment", content=png, headers={"Content-Type": "image/png"}).headers["Retry-After"] == "5"


def test_unknown_routes_and_methods_get_json_errors(server):
    r = server.client.delete("/v1/segment")
    assert r.status_code == 405 and r.headers["Allow"] == "POST"
    assert r.json()["error"] == {"status": 405, "reason": "method_not_allowed", "message": "Method Not Allowed"}
    r = server.client.get("/v2/segment")
    assert r.status_code == 404 and r.json()["error"]["reason"] == "not_found"


@schema.parametrize()
@hypothesis.settings(deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
def test_server_conforms_to_its_document(case, server):
    case.call_and_validate(base_url=server.base)
