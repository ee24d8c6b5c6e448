"""Request ids and logs: ``X-Request-ID`` on every answer, the id on every log line written while a request is
handled (worker threads included), one access line per request, ``--log-format json``."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image

from m2f import synth
from service import logs
from service.segment import MAX_BODY_BYTES

HEX_ID = re.compile(r"^[0-9a-f]{32}$")


def png_bytes(index: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synth.make_sample(seed=2024, index=index, size=(128, 160)).image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(start_server):
    # Debug level: PIL logs each PNG chunk it reads, in the decode worker thread; those lines must carry the id.
    return start_server("--log-format", "json", "--log-level", "debug", "--max-batch-delay-ms", "1")


def segment(server, data: bytes, rid: str | bytes | None = None, **params) -> httpx.Response:
    headers = {"Content-Type": "image/png"}
    if rid is not None:
        headers["X-Request-ID"] = rid
    return server.client.post("/v1/segment", content=data, headers=headers, params=params)


def log_records(server) -> list[dict]:
    """The server's JSON log lines (every line it wrote must be one)."""
    lines = [line for line in server.log().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def wait_for_access(server, rid: str, timeout: float = 10.0) -> list[dict]:
    """The log records of request ``rid`` once its access line is written."""
    end = time.monotonic() + timeout
    while True:
        records = [r for r in log_records(server) if r["request_id"] == rid]
        if any(r["logger"] == "m2f.access" for r in records) or time.monotonic() > end:
            return records
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- ids
def test_client_ids_are_kept_when_valid_and_replaced_otherwise(server):
    data = png_bytes()
    for rid in ("abc-123_X.y", "a" * 128, "with spaces and :/=+"):
        r = segment(server, data, rid)
        assert r.status_code == 200 and r.headers["X-Request-ID"] == rid
    for rid in ("a" * 129, "tab\there", b"caf\xe9"):  # too long, a control character, not ASCII
        r = segment(server, data, rid)
        assert r.status_code == 200 and HEX_ID.match(r.headers["X-Request-ID"]), rid
    first, second = segment(server, data), segment(server, data)
    assert HEX_ID.match(first.headers["X-Request-ID"]) and HEX_ID.match(second.headers["X-Request-ID"])
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]


def test_every_answer_carries_the_id(server):
    big = bytes(MAX_BODY_BYTES + 1)  # over the body limit
    calls = {
        "segment 200": lambda h: server.client.post("/v1/segment", content=png_bytes(), headers=h),
        "segment 415": lambda h: server.client.post("/v1/segment", content=b"text", headers=h),
        "segment 400": lambda h: server.client.post("/v1/segment", content=png_bytes()[:200], headers=h),
        "segment 413": lambda h: server.client.post("/v1/segment", content=big, headers=h),
        "segment 422": lambda h: server.client.post("/v1/segment?threshold=7", content=png_bytes(), headers=h),
        "healthz": lambda h: server.client.get("/healthz", headers=h),
        "readyz": lambda h: server.client.get("/readyz", headers=h),
        "metrics": lambda h: server.client.get("/metrics", headers=h),
        "model": lambda h: server.client.get("/v1/model", headers=h),
        "openapi": lambda h: server.client.get("/openapi.json", headers=h),
        "docs": lambda h: server.client.get("/docs", headers=h),
        "404": lambda h: server.client.get("/no/such/path", headers=h),
        "405": lambda h: server.client.delete("/v1/segment", headers=h),
    }
    expected = {"segment 415": 415, "segment 400": 400, "segment 413": 413, "segment 422": 422}
    expected |= {"404": 404, "405": 405}
    for name, call in calls.items():
        r = call({"X-Request-ID": f"every-{name.replace(' ', '-')}", "Content-Type": "image/png"})
        assert r.status_code == expected.get(name, 200), f"{name}: {r.status_code} {r.text[:200]}"
        assert r.headers["X-Request-ID"] == f"every-{name.replace(' ', '-')}", name
        generated = call({"Content-Type": "image/png"}).headers["X-Request-ID"]
        assert HEX_ID.match(generated), name


# ---------------------------------------------------------------------------------------------- logs
def test_every_line_of_a_request_carries_its_id_and_one_access_line_has_its_fields(server):
    rid = "trace-me-1"
    r = segment(server, png_bytes(2), rid, task="instance")
    assert r.status_code == 200
    timings = r.json()["timings"]
    records = wait_for_access(server, rid)
    access = [x for x in records if x["logger"] == "m2f.access"]
    assert len(access) == 1
    line = access[0]
    assert (line["method"], line["path"], line["status"], line["task"]) == ("POST", "/v1/segment", 200, "instance")
    assert (line["width"], line["height"]) == (160, 128)
    for key in ("queue_s", "inference_s", "postprocess_s"):
        assert line[key] == pytest.approx(timings[key], abs=1e-6)  # rounded to the microsecond
    assert line["total_s"] >= timings["total_s"] > 0
    assert line["level"] == "INFO" and line["message"].startswith("POST /v1/segment 200 task=instance image=160x128")
    assert set(line) >= {"time", "level", "logger", "message", "request_id"}
    # Lines written while the request was handled carry its id: the middleware's start line (event loop) and
    # PIL's PNG chunk lines, written in the decode worker thread.
    assert any(x["logger"] == "m2f.service" and x["message"].startswith("POST /v1/segment from") for x in records)
    assert any(x["logger"].startswith("PIL.") for x in records), [x["logger"] for x in records]
    # No PIL line (they are only written while decoding an upload) lost its request's id.
    assert all(x["request_id"] != logs.NO_REQUEST for x in log_records(server) if x["logger"].startswith("PIL."))


def test_concurrent_requests_keep_their_own_ids(server):
    ids = [f"parallel-{i}" for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: segment(server, png_bytes(i), ids[i]), range(6)))
    assert [a.headers["X-Request-ID"] for a in answers] == ids
    for rid, answer in zip(ids, answers):
        line = next(x for x in wait_for_access(server, rid) if x["logger"] == "m2f.access")
        assert line["status"] == 200
        assert line["inference_s"] == pytest.approx(answer.json()["timings"]["inference_s"], abs=1e-6)


def test_error_access_lines_carry_the_reason(server):
    r = segment(server, b"not an image", "trace-err-1")
    assert r.status_code == 415
    line = next(x for x in wait_for_access(server, "trace-err-1") if x["logger"] == "m2f.access")
    assert (line["status"], line["reason"]) == (415, "unsupported_media_type")
    assert "415 unsupported_media_type" in line["message"]


# ---------------------------------------------------------------------------------------------- in process
def test_formats_and_context_propagation_to_threads():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RequestIdFilter())
    logger = logging.getLogger("m2f.test-formats")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        handler.setFormatter(logging.Formatter(logs.TEXT_FORMAT))
        token = logs.request_id.set("ctx-1")
        try:
            logger.info("in the request")
            with ThreadPoolExecutor(1) as plain, logs.ContextThreadPoolExecutor(1) as ours:
                plain.submit(logger.info, "plain pool").result()  # loses the context
                ours.submit(logger.info, "context pool").result()
        finally:
            logs.request_id.reset(token)
        logger.info("after the request")
        text = stream.getvalue().splitlines()
        assert [line.split(": ", 1)[0].rsplit(" ", 1)[-1] for line in text] == ["[ctx-1]", "[-]", "[ctx-1]", "[-]"]

        handler.setFormatter(logs.JsonFormatter())
        stream.seek(0), stream.truncate()
        token = logs.request_id.set("ctx-2")
        try:
            logger.info("done", extra={"access": {"status": 200, "total_s": 0.5}})
        finally:
            logs.request_id.reset(token)
        doc = json.loads(stream.getvalue())
        assert {k: doc[k] for k in ("level", "logger", "message", "request_id", "status", "total_s")} == {
            "level": "INFO",
            "logger": "m2f.test-formats",
            "message": "done",
            "request_id": "ctx-2",
            "status": 200,
            "total_s": 0.5,
        }
    finally:
        logger.removeHandler(handler)


TEXT_LINE = re.compile(
    r'^\S+ \S+ (?P<level>[A-Z]+) (?P<logger>\S+) \[(?P<id>"(?:[^"\\]|\\.)*"|[^\s"\[\]\\]+)\]: (?P<msg>.*)$'
)
FORGED_ID = 'x] CRITICAL m2f.service [y "z" \\'  # a client's id that would forge a text line's structure


def text_id(match: re.Match) -> str:
    """The request id of a parsed text line (a quoted one is a JSON string)."""
    value = match["id"]
    return json.loads(value) if value.startswith('"') else value


def test_client_ids_cannot_forge_log_structure():
    """The id is written as is on text lines when it is plain, else as a JSON string that parses back to it; on
    JSON lines it is the request_id field. A percent-decoded path with a newline stays on its access line."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RequestIdFilter())
    logger = logging.getLogger("m2f.test-forged")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fields = logs.access_fields("GET", "/a b]\nforged line", 404, 0.001, FORGED_ID, {}, "not_found")
    try:
        for fmt in (logging.Formatter(logs.TEXT_FORMAT), logs.JsonFormatter()):
            handler.setFormatter(fmt)
            stream.seek(0), stream.truncate()
            for rid in (FORGED_ID, "abc-123_X.y:z=1", "with spaces"):
                token = logs.request_id.set(rid)
                try:
                    logger.info("message")
                finally:
                    logs.request_id.reset(token)
            token = logs.request_id.set(FORGED_ID)
            try:
                logger.info(logs.access_message(fields), extra={"access": fields})
            finally:
                logs.request_id.reset(token)
            lines = stream.getvalue().splitlines()
            assert len(lines) == 4, lines
            if isinstance(fmt, logs.JsonFormatter):
                docs = [json.loads(line) for line in lines]
                assert [d["request_id"] for d in docs] == [FORGED_ID, "abc-123_X.y:z=1", "with spaces", FORGED_ID]
                assert docs[3]["path"] == "/a b]\nforged line"
                continue
            matches = [TEXT_LINE.match(line) for line in lines]
            assert all(matches), lines
            assert [text_id(m) for m in matches] == [FORGED_ID, "abc-123_X.y:z=1", "with spaces", FORGED_ID]
            assert [m["level"] for m in matches] == ["INFO"] * 4
            assert lines[1].endswith("[abc-123_X.y:z=1]: message")  # plain ids as they are
            assert matches[3]["msg"] == 'GET "/a b]\\nforged line" 404 not_found total=0.001s'
    finally:
        logger.removeHandler(handler)


def test_text_log_of_the_server_keeps_one_line_per_record(start_server):
    """The real server with text logs: a client id with brackets, spaces and quotes and a path with an encoded
    newline; every line of the log parses, and the request's lines carry the id as a JSON string."""
    server = start_server("--log-level", "debug", "--max-batch-delay-ms", "1")
    r = server.client.get("/no%20such]%0Apath", headers={"X-Request-ID": FORGED_ID})
    assert r.status_code == 404 and r.headers["X-Request-ID"] == FORGED_ID
    r = server.client.get("/healthz", headers={"X-Request-ID": "plain-id.1"})
    assert r.status_code == 200
    end = time.monotonic() + 10
    while "[plain-id.1]: GET /healthz 200" not in server.log() and time.monotonic() < end:  # the access line
        time.sleep(0.05)
    lines = [line for line in server.log().splitlines() if line.strip()]
    parsed = [TEXT_LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed) if not m]
    ours = [m for m in parsed if text_id(m) == FORGED_ID]
    assert [m["logger"] for m in ours] == ["m2f.service", "m2f.access"]  # the debug start line, the access line
    assert ours[1]["msg"].startswith('GET "/no such]\\npath" 404 not_found') and ours[1]["level"] == "INFO"
    assert any(m["logger"] == "m2f.access" and "[plain-id.1]: GET /healthz 200" in m.group(0) for m in parsed)


def test_unhandled_error_is_answered_in_json_with_the_id():
    app = FastAPI()
    app.add_middleware(logs.RequestIdMiddleware)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/boom", headers={"X-Request-ID": "boom-1"})

    r = asyncio.run(call())
    assert r.status_code == 500 and r.headers["X-Request-ID"] == "boom-1"
    assert r.json()["error"]["reason"] == "internal"
