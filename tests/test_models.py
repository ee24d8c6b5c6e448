"""Several models in one server, by name (the real ``m2f serve`` on 127.0.0.1): routes, listing, metrics by model,
API keys, and loading, reloading and unloading while serving (a swap under load answers every request)."""

from __future__ import annotations

import io
import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from PIL import Image

from m2f import synth
from service.client import Client, ServerError
from service.settings import demo_onnx

pytest.importorskip("onnxruntime")

DEMO = demo_onnx()  # the shipped demo model as ONNX (no torch needed to serve it)
SEGMENT_KEY, ADMIN_KEY = "segment-key-0123456789", "admin-key-0123456789abcdef"


def png(index: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synth.make_sample(seed=11, index=index).image).save(buf, format="PNG")
    return buf.getvalue()


def keys_file(tmp_path: Path, segment: list[str] | None = None, admin: list[str] | None = None) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"segment": segment or [], "admin": admin or []}))
    return path


def post(base: str, path: str, data: bytes, key: str | None = None, **params: str) -> httpx.Response:
    headers = {"Content-Type": "image/png", **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(base + path, content=data, headers=headers, params=params, timeout=60)


def test_two_models_by_name_listed_answered_and_counted_apart(start_server, tmp_path):
    second = tmp_path / "second.onnx"
    shutil.copy(DEMO, second)
    server = start_server("--model", f"first={DEMO}", "--model", f"second={second}", "--max-batch-size", "2")
    listing = server.client.get("/v1/models").json()
    assert listing["default"] == "first"
    assert [(m["name"], m["version"], m["state"], m["runtime"]) for m in listing["models"]] == [
        ("first", 1, "ready", "onnxruntime"),
        ("second", 1, "ready", "onnxruntime"),
    ]
    assert all(m["resident_mb"] > 10 for m in listing["models"])  # the 16 MB demo weights each
    assert listing["memory"]["models_mb"] == pytest.approx(sum(m["resident_mb"] for m in listing["models"]), abs=0.2)

    data = png()
    by_default = post(server.base, "/v1/segment", data).json()
    by_name = post(server.base, "/v1/models/second/segment", data).json()
    assert by_name["segments"] == by_default["segments"]  # the same weights under two names
    assert server.client.get("/v1/models/second").json()["name"] == "second"
    assert server.client.get("/v1/model").json()["name"] == "first"

    missing = post(server.base, "/v1/models/third/segment", data)
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "no model named 'third'; models: first, second"
    assert server.client.get("/v1/models/third").status_code == 404
    assert server.metric("m2f_requests_total", model="second", code="200") == 1
    assert server.metric("m2f_requests_total", model="first", code="200") == 1
    assert server.metric("m2f_requests_total", model="unknown", code="404") == 1  # not a series per made-up name
    assert server.metric("m2f_batch_size_count", model="second") == 1


def test_keys_close_the_segment_routes_and_open_the_admin_ones(start_server, tmp_path):
    keys = keys_file(tmp_path, segment=[SEGMENT_KEY], admin=[ADMIN_KEY])
    server = start_server("--model", f"demo={DEMO}", "--keys-file", str(keys))
    data = png()
    for key in (None, "wrong-key-0123456789"):
        r = post(server.base, "/v1/segment", data, key)
        assert r.status_code == 401 and r.json()["error"]["reason"] == "unauthorized"
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert post(server.base, "/v1/models/demo/segment", data, SEGMENT_KEY).status_code == 200
    with Client(server.base, api_key=SEGMENT_KEY, model="demo") as client:
        assert client.segment(data).segments
    r = httpx.put(server.base + "/v1/models/demo", json={"path": str(DEMO)}, headers={"X-API-Key": SEGMENT_KEY})
    assert r.status_code == 401  # a segment key is not an admin key
    assert "wrong-key" not in server.log() and SEGMENT_KEY not in server.log()  # keys never reach the log


def test_admin_routes_are_off_without_admin_keys(start_server):
    server = start_server("--model", f"demo={DEMO}")
    r = httpx.put(server.base + "/v1/models/demo", json={"path": str(DEMO)}, headers={"X-API-Key": ADMIN_KEY})
    assert r.status_code == 403 and "admin routes are off" in r.json()["error"]["message"]
    assert httpx.delete(server.base + "/v1/models/demo").status_code == 403


def test_a_swap_under_load_answers_every_request(start_server, tmp_path):
    """Four clients send requests back to back to one model while it is reloaded three times (each reload warms
    up a new version beside the old one, then swaps): every request is answered 200, the versions count up,
    and each old version drains and leaves."""
    keys = keys_file(tmp_path, admin=[ADMIN_KEY])
    server = start_server("--model", f"demo={DEMO}", "--keys-file", str(keys), "--max-batch-size", "2")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    stop = threading.Event()
    statuses: Counter = Counter()
    lock = threading.Lock()

    def client(i: int) -> None:
        data = png(i)
        with httpx.Client(base_url=server.base, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/models/demo/segment", content=data, headers={"Content-Type": "image/png"})
                with lock:
                    statuses[r.status_code] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for version in (2, 3, 4):
            time.sleep(0.5)
            r = httpx.put(server.base + "/v1/models/demo", json={"path": str(DEMO)}, headers=admin, timeout=120)
            assert r.status_code == 200, r.text
            assert (r.json()["version"], r.json()["state"]) == (version, "ready")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(statuses) == {200} and statuses[200] > 20, statuses
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the last old version leaves once its requests are done
        listing = server.client.get("/v1/models").json()["models"]
        if len(listing) == 1:
            break
        time.sleep(0.1)
    assert [(m["name"], m["version"], m["state"]) for m in listing] == [("demo", 4, "ready")]
    assert "demo: version 3 drained and unloaded" in server.log()
    assert server.metric("m2f_model_info", model="demo", version="4") == 1
    assert server.metric("m2f_model_info", model="demo", version="3") == 0


def test_a_failed_load_leaves_the_old_version_serving_and_memory_is_budgeted(start_server, tmp_path):
    keys = keys_file(tmp_path, admin=[ADMIN_KEY])
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx file")
    server = start_server("--model", f"demo={DEMO}", "--keys-file", str(keys), "--memory-mb", "30")
    admin = {"X-API-Key": ADMIN_KEY}
    r = httpx.put(server.base + "/v1/models/demo", json={"path": str(broken)}, headers=admin, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["reason"] == "load_failed"
    assert "demo (version 2) failed to load" in r.json()["error"]["message"]
    assert post(server.base, "/v1/models/demo/segment", png()).status_code == 200  # version 1 goes on
    assert server.client.get("/v1/models/demo").json()["version"] == 1

    # 30 MiB: the demo's 16 MiB of weights fit once; a second model beside it does not
    r = httpx.put(server.base + "/v1/models/other", json={"path": str(DEMO)}, headers=admin, timeout=60)
    assert r.status_code == 507 and r.json()["error"]["reason"] == "over_memory", r.text
    assert "memory budget" in r.json()["error"]["message"]

    with pytest.raises(ServerError) as err, Client(server.base) as client:
        client.segment(png(), model="other")
    assert err.value.status == 404


def test_unload_answers_what_was_admitted_and_then_404(start_server, tmp_path):
    keys = keys_file(tmp_path, admin=[ADMIN_KEY])
    server = start_server("--model", f"main={DEMO}", "--model", f"extra={DEMO}", "--keys-file", str(keys))
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.delete(server.base + "/v1/models/main", headers=admin).status_code == 409  # the default stays
    r = httpx.delete(server.base + "/v1/models/extra", headers=admin)
    assert r.status_code == 200 and r.json()["state"] == "draining"
    assert post(server.base, "/v1/models/extra/segment", png()).status_code == 404
    assert [m["name"] for m in server.client.get("/v1/models").json()["models"]] == ["main"]


def test_an_onnx_model_can_name_its_runner_at_start_and_on_reload(start_server, tmp_path):
    """``--model NAME=PATH@RUNTIME`` and the reload body's ``runtime`` choose the runner of an .onnx model (OpenVINO
    here); without one it is the runner this CPU's class gets; a runtime for a file that is not .onnx is a 422."""
    pytest.importorskip("openvino")
    keys = keys_file(tmp_path, admin=[ADMIN_KEY])
    server = start_server("--model", f"demo={DEMO}@openvino,plain={DEMO}", "--keys-file", str(keys))
    listed = {m["name"]: m for m in server.client.get("/v1/models").json()["models"]}
    assert listed["demo"]["runtime"].startswith("openvino") and listed["plain"]["runtime"].startswith("onnxruntime")
    assert post(server.base, "/v1/models/demo/segment", png()).status_code == 200
    admin = {"X-API-Key": ADMIN_KEY}
    body = {"path": str(DEMO), "runtime": "onnxruntime"}
    r = httpx.put(server.base + "/v1/models/demo", json=body, headers=admin, timeout=120)
    assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["runtime"].startswith("onnxruntime"), r.text
    r = httpx.put(server.base + "/v1/models/demo", json={"path": str(tmp_path), "runtime": "openvino"}, headers=admin)
    assert r.status_code == 422 and r.json()["error"]["reason"] == "load_failed" and "only an .onnx file" in r.text
