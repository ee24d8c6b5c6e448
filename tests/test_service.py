"""End to end: the real ``m2f serve`` on 127.0.0.1, spoken to over HTTP.

The reference for every returned mask is the model called directly in this process (PyTorch, the torch
post-processing), so the server's pipeline (decode, batch, numpy post-processing, RLE) is checked against
an independent path. Servers use the demo model (160 px images, ~0.1 s per forward pass on 2 cores).
"""

from __future__ import annotations

import base64
import io
import json
import re
import select
import signal
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import torch_postprocess
from PIL import Image
from pycocotools import mask as mask_util

from m2f import synth
from mask2former import load_model
from pipeline import postprocess
from pipeline.processing import load_image, preprocess
from service.schemas import SegmentResponse
from service.segment import MAX_BODY_BYTES, MAX_UPLOADS

REPO = Path(__file__).resolve().parents[1]


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def sample_image(index: int, size=(160, 160)) -> Image.Image:
    return Image.fromarray(synth.make_sample(seed=2024, index=index, size=size).image)


def post(server, data: bytes, ctype: str = "image/png", **params) -> httpx.Response:
    return server.client.post("/v1/segment", content=data, headers={"Content-Type": ctype}, params=params)


def decode_rle(segment: dict) -> np.ndarray:
    return mask_util.decode(segment["segmentation"]).astype(bool)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(
        "--max-batch-size", "4", "--max-batch-delay-ms", "150"
    )  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return load_model()


def direct(model, image: Image.Image, task: str):
    """The reference: the model and the post-processing the server runs (numpy), called in this process. (numpy
    vs the torch oracle: tests/test_postprocess.py, where near-tie pixels may differ by the CPU's BLAS.)"""
    batch = preprocess([image], model.config.preprocess)
    with torch.inference_mode():
        out = model(torch.from_numpy(batch.pixel_values))
    args = (out.class_logits.numpy(), out.mask_logits.numpy(), batch.resized_sizes, batch.original_sizes)
    cfg = model.config
    if task == "panoptic":
        return postprocess.panoptic_segmentation(*args, **cfg.postprocess_kwargs(task))[0]
    if task == "instance":
        return postprocess.instance_segmentation(*args, **cfg.postprocess_kwargs(task), max_instances=100)[0]
    return postprocess.semantic_segmentation(*args, **cfg.postprocess_kwargs(task))[0]


# ---------------------------------------------------------------------------------------------- results
@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
@pytest.mark.parametrize("shape", [(160, 160), (120, 208)])
def test_each_task_matches_the_model_called_directly(server, model, task, shape):
    for index in range(2):
        image = sample_image(index, shape)
        r = post(server, encode(image), task=task)
        assert r.status_code == 200, r.text
        body = r.json()
        SegmentResponse.model_validate(body)
        assert (body["width"], body["height"], body["task"]) == (shape[1], shape[0], task)
        assert body["model"] == "mask2former-demo-synth"
        segs = body["segments"]
        masks = np.stack([decode_rle(s) for s in segs]) if segs else np.zeros((0, *shape), bool)
        assert masks.shape[1:] == shape
        ref = direct(model, image, task)
        if task == "panoptic":
            assert [(s["id"], s["category_id"], s["isthing"]) for s in segs] == [
                (s.id, s.label_id, s.isthing) for s in ref.segments
            ]
            assert [s["score"] for s in segs] == pytest.approx([s.score for s in ref.segments], abs=1e-5)
            for s, m in zip(segs, masks):
                assert np.array_equal(m, ref.segmentation == s["id"])
        elif task == "instance":
            assert [s["category_id"] for s in segs] == ref.labels.tolist()
            assert [s["score"] for s in segs] == pytest.approx(ref.scores.tolist(), abs=1e-5)
            assert np.array_equal(masks, ref.masks)
        else:
            label_map = ref
            assert [s["category_id"] for s in segs] == np.unique(label_map).tolist()
            assert all(s["score"] is None for s in segs)
            for s, m in zip(segs, masks):
                assert np.array_equal(m, label_map == s["category_id"])
        for s, m in zip(segs, masks):
            assert s["area"] == int(m.sum())
            assert s["label"] == model.config.id2label[s["category_id"]]
            ys, xs = np.nonzero(m)
            if not m.any():  # an instance pair with an empty mask (score 0): kept, as the official top-k keeps it
                assert task == "instance" and s["bbox"] == [0, 0, 0, 0] and s["score"] == 0
                continue
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_panoptic_segments_do_not_overlap_and_areas_add_up(server):
    image = sample_image(7, (144, 176))
    body = post(server, encode(image), task="panoptic", png="true").json()
    masks = np.stack([decode_rle(s) for s in body["segments"]])
    assert masks.sum(0).max() <= 1  # no pixel in two segments
    void = int((masks.sum(0) == 0).sum())
    assert sum(s["area"] for s in body["segments"]) + void == 144 * 176
    # The PNG carries the same segmentation: id = R + 256 G + 256^2 B.
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["png"])))).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    for s, m in zip(body["segments"], masks):
        assert np.array_equal(ids == s["id"], m)
    assert ((ids == 0) == (masks.sum(0) == 0)).all()


def test_semantic_png_and_multipart_upload(server):
    image = sample_image(3)
    files = {"image": ("x.jpg", encode(image, "JPEG", quality=95), "image/jpeg")}
    r = server.client.post("/v1/segment", files=files, params={"task": "semantic", "png": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    label_map = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["png"]))))
    assert label_map.shape == (160, 160)
    for s in body["segments"]:
        assert np.array_equal(decode_rle(s), label_map == s["category_id"])


def test_instance_parameters(server):
    data = encode(sample_image(1))
    top3 = post(server, data, task="instance", max_instances="3").json()["segments"]
    every = post(server, data, task="instance").json()["segments"]
    # the things among the top 3 (query, class) pairs: the official order is top-k first, then things only
    assert 1 <= len(top3) <= 3 and all(s["isthing"] for s in every)
    assert [(s["category_id"], s["score"]) for s in top3] == [(s["category_id"], s["score"]) for s in every][
        : len(top3)
    ]
    scores = [s["score"] for s in every]
    assert scores == sorted(scores, reverse=True)
    high = post(server, data, task="instance", threshold="0.5").json()["segments"]
    assert [s["score"] for s in high] == [s for s in scores if s > 0.5]


def test_concurrent_requests_are_batched(server):
    before_count = server.metric("m2f_batch_size_count")
    before_sum = server.metric("m2f_batch_size_sum")
    data = [encode(sample_image(i)) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda d: post(server, d, task="panoptic"), data))
    assert all(r.status_code == 200 for r in responses)
    batches = server.metric("m2f_batch_size_count") - before_count
    images = server.metric("m2f_batch_size_sum") - before_sum
    assert images == 8
    assert batches < 8, "8 concurrent requests ran as 8 batches of one"
    assert max(r.json()["timings"]["batch_size"] for r in responses) > 1


# ---------------------------------------------------------------------------------------------- inputs
def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (zero allowed) and whose data is one grey row."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def bad_inputs() -> list[tuple[str, bytes, str, int, str]]:
    good = encode(sample_image(0))
    gif = encode(sample_image(0), "GIF")
    over = bytes(MAX_BODY_BYTES + 1)  # refused from its Content-Length, before it is read
    boundary = "XyZ"
    no_image_field = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="other"\r\n\r\nhello\r\n--{boundary}--\r\n'
    ).encode()
    return [
        ("not an image", b"this is text, not pixels", "image/png", 415, "unsupported_media_type"),
        ("GIF is not accepted", gif, "image/gif", 415, "unsupported_media_type"),
        ("JSON content type", b'{"image": 1}', "application/json", 415, "unsupported_media_type"),
        ("no content type", good, "", 415, "unsupported_media_type"),
        ("truncated PNG", good[: len(good) // 2], "image/png", 400, "bad_image"),
        ("truncated JPEG", encode(sample_image(0), "JPEG")[:600], "image/jpeg", 400, "bad_image"),
        ("zero-size image", png_with_size(0, 16), "image/png", 400, "bad_image"),
        ("empty body", b"", "image/png", 400, "bad_image"),
        ("body over the limit", over, "image/png", 413, "too_large"),
        ("declared pixels over the limit", png_with_size(7000, 6000), "image/png", 413, "too_large"),
        ("malformed multipart", b"--nope\r\ngarbage", f"multipart/form-data; boundary={boundary}", 400, "bad_request"),
        ("multipart without image", no_image_field, f"multipart/form-data; boundary={boundary}", 400, "bad_request"),
    ]


@pytest.mark.parametrize("case", bad_inputs(), ids=lambda c: c[0])
def test_bad_input_gets_its_status_and_the_server_keeps_answering(server, case):
    name, data, ctype, status, reason = case
    before = server.metric("m2f_rejections_total", reason=reason)
    headers = {"Content-Type": ctype} if ctype else {}
    r = server.client.post("/v1/segment", content=data, headers=headers)
    assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
    err = r.json()["error"]
    assert err["status"] == status and err["reason"] == reason and err["message"]
    assert server.metric("m2f_rejections_total", reason=reason) == before + 1
    assert server.client.get("/healthz").status_code == 200
    assert post(server, encode(sample_image(0))).status_code == 200


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"task": "everything"}, "task"),
        ({"threshold": "2"}, "less than or equal to 1"),
        ({"threshold": "nan"}, "finite number"),  # before: "should be less than or equal to 1"
        ({"overlap_mask_area_threshold": "inf"}, "finite number"),
        ({"max_instances": "0"}, "greater than or equal to 1"),
        ({"max_instances": "101"}, "less than or equal to 100"),
        ({"png": "maybe"}, "png"),
    ],
    ids=str,
)
def test_bad_query_parameters_get_422_saying_why(server, params, says):
    r = post(server, encode(sample_image(0)), **params)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["reason"] == "bad_request" and says in r.json()["error"]["message"]


def test_png_for_instances_says_why_there_is_none(server):
    """Instances overlap, so there is no map: the answer says so (before: png null without a word)."""
    body = post(server, encode(sample_image(0)), task="instance", png="true").json()
    assert body["png"] is None and body["warnings"] and "instances overlap" in body["warnings"][0]
    assert post(server, encode(sample_image(0)), task="semantic", png="true").json()["warnings"] == []


def test_a_client_that_leaves_mid_upload_is_a_disconnect_not_a_server_error(server):
    """Headers and half the body, then the connection closes: counted as disconnected, no 5xx, no ERROR line."""
    data = encode(sample_image(4))
    before = server.metric("m2f_rejections_total", reason="disconnected")
    errors = server.metric("m2f_requests_total", task="panoptic", code="500")
    head = f"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(data)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head.encode() + data[: len(data) // 2])
        time.sleep(0.3)
    assert server.wait_metric("m2f_rejections_total", before + 1, reason="disconnected") == before + 1
    assert server.metric("m2f_requests_total", task="panoptic", code="500") == errors
    assert server.metric("m2f_requests_total", task="panoptic", code="499") >= 1
    assert " ERROR " not in server.log() and "Traceback" not in server.log()


def image_variants() -> list[tuple[str, bytes]]:
    rgb = sample_image(5)
    grey16 = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    frames = [sample_image(5), sample_image(6)]
    animated_png = io.BytesIO()
    frames[0].save(animated_png, format="PNG", save_all=True, append_images=frames[1:])
    animated_webp = io.BytesIO()
    frames[0].save(animated_webp, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    return [
        ("CMYK JPEG", encode(rgb.convert("CMYK"), "JPEG")),
        ("palette PNG", encode(rgb.convert("P"))),
        ("LA PNG", encode(rgb.convert("LA"))),
        ("RGBA PNG", encode(rgb.convert("RGBA"))),
        ("16-bit grey PNG", encode(grey16)),
        ("TIFF", encode(rgb, "TIFF")),
        ("BMP", encode(rgb, "BMP")),
        ("WebP", encode(rgb, "WEBP")),
        ("animated PNG", animated_png.getvalue()),
        ("animated WebP", animated_webp.getvalue()),
    ]


@pytest.mark.parametrize("case", image_variants(), ids=lambda c: c[0])
def test_image_modes_and_formats_are_converted(server, model, case):
    name, data = case
    r = post(server, data, ctype="application/octet-stream", task="semantic")
    assert r.status_code == 200, f"{name}: {r.text}"
    body = r.json()
    assert (body["width"], body["height"]) == (160, 160)
    # The same conversion as the library's loader (first frame, alpha on white, 16-bit scaled).
    label_map = direct(model, load_image(data), "semantic")
    assert [s["category_id"] for s in body["segments"]] == np.unique(label_map).tolist()


# ---------------------------------------------------------------------------------------------- info
def test_model_info_docs_and_health(server):
    info = server.client.get("/v1/model").json()
    assert info["name"] == "default" and info["model"] == "mask2former-demo-synth" and info["runtime"] == "torch"
    assert info["default_task"] == "panoptic" and info["tasks"] == ["panoptic", "instance", "semantic"]
    assert [label["name"] for label in info["labels"]] == [c["name"] for c in synth.CATEGORIES]
    assert [label["isthing"] for label in info["labels"]] == [bool(c["isthing"]) for c in synth.CATEGORIES]
    assert info["batching"]["max_batch_size"] == 4
    spec = server.client.get("/openapi.json").json()
    assert "image/png" in spec["paths"]["/v1/segment"]["post"]["requestBody"]["content"]  # see test_openapi.py
    assert server.client.get("/docs").status_code == 200
    assert server.client.get("/healthz").json() == {"status": "ok"}
    assert server.client.get("/readyz").json()["ready"] is True


def documented_metrics() -> list[str]:
    text = (REPO / "docs" / "metrics-and-logs.md").read_text()
    section = text[text.index("## Metrics") :]
    return re.findall(r"^\| `(m2f_[a-z_]+)`", section, flags=re.M)


def test_metrics_exposes_the_documented_names(server):
    names = documented_metrics()
    assert len(names) >= 11
    exposed = server.metrics()
    for name in names:
        assert re.search(rf"^{name}(_bucket|_count|_sum)?[{{ ]", exposed, flags=re.M), f"{name} not exposed"
    assert server.metric("m2f_ready") == 1
    info = {"model": "default", "version": "1", "checkpoint": "mask2former-demo-synth", "runtime": "torch"}
    assert server.metric("m2f_model_info", **info) == 1
    assert server.metric("m2f_requests_total", task="panoptic", code="200") > 0


# ---------------------------------------------------------------------------------------------- admission
def test_refused_past_its_deadline_timeout_and_disconnect(start_server):
    """Batches wait 3 s to fill but requests time out after 1 s. A 40-megapixel image (declared in its header)
    is refused at once: its decoding and post-processing alone are predicted past the deadline (before: it was
    admitted, and timed out with its work still running)."""
    server = start_server("--max-batch-size", "8", "--max-batch-delay-ms", "3000", "--request-timeout-s", "1")
    data = encode(sample_image(0))
    with ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(post, server, data) for _ in range(2)]
        server.wait_metric("m2f_inflight_requests", 2)
        full = post(server, png_with_size(6320, 6320))
        assert full.status_code == 503, full.text
        assert full.json()["error"]["reason"] == "queue_full" and "alone" in full.json()["error"]["message"]
        assert int(full.headers["Retry-After"]) >= 1
        for f in waiting:
            r = f.result()
            assert r.status_code == 504 and r.json()["error"]["reason"] == "timeout"
    assert server.metric("m2f_rejections_total", reason="queue_full") == 1
    assert server.metric("m2f_rejections_total", reason="timeout") == 2
    assert server.metric("m2f_queue_depth") == 0 and server.metric("m2f_inflight_requests") == 0

    # A client that leaves while its request waits is dropped from the queue at once.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        head = f"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(data)}\r\n\r\n"
        sock.sendall(head.encode() + data)
        assert server.wait_metric("m2f_queue_depth", 1) == 1
    # Well before the 1 s deadline, so it is the disconnect that removed it.
    assert server.wait_metric("m2f_rejections_total", 1, timeout=0.9, reason="disconnected") == 1
    assert server.metric("m2f_queue_depth") == 0 and server.metric("m2f_inflight_requests") == 0
    assert server.client.get("/healthz").status_code == 200


def read_reply(sock: socket.socket, timeout: float = 30) -> tuple[int, dict]:
    """Status and JSON body of the HTTP response on a raw socket (the server closes the connection)."""
    sock.settimeout(timeout)
    reply = b""
    while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
        part = sock.recv(4096)
        if not part:
            break
        reply += part
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def test_stalled_uploads_do_not_block_other_requests(start_server):
    """64 clients send their headers and one byte of a 100 kB body, then stall. They hold no compute slot
    (there are 32): 10 well-behaved requests sent meanwhile are all answered, and each stalled upload gets a
    JSON 408 once it has been idle for the upload idle timeout. (Before uploads were read outside the
    compute slots, the stalled clients held all 32 and every other request got 503.)"""
    server = start_server()
    data = encode(sample_image(1))
    head = "POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    stalled = []
    try:
        for _ in range(64):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(head.encode() + b"\x89")
            stalled.append(sock)
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(lambda _: post(server, data), range(10)))
        assert [r.status_code for r in answers] == [200] * 10
        for sock in stalled:  # then each stalled client is told why, in JSON
            status, body = read_reply(sock)
            assert status == 408 and body["error"]["reason"] == "upload_timeout" and "idle" in body["error"]["message"]
    finally:
        for sock in stalled:
            sock.close()
    assert server.metric("m2f_rejections_total", reason="upload_timeout") == 64
    assert server.metric("m2f_inflight_requests") == 0
    assert server.client.get("/healthz").status_code == 200


def test_slow_uploads_get_408_and_uploads_are_capped(start_server):
    """A client trickling its body (a byte every 0.3 s: never idle for the 5 s idle timeout) gets 408 at its
    8 s deadline; a client that stalls gets 408 after 5 s idle; with 128 uploads in progress (the cap) one more
    gets 503 at once."""
    server = start_server("--request-timeout-s", "8")
    head = "POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    others = []
    try:
        with (
            socket.create_connection(("127.0.0.1", server.port)) as slow,
            socket.create_connection(("127.0.0.1", server.port)) as stalled,
        ):
            slow.sendall(head.encode())
            stalled.sendall(head.encode() + b"\x89")
            for _ in range(MAX_UPLOADS - 2):
                sock = socket.create_connection(("127.0.0.1", server.port))
                sock.sendall(head.encode() + b"\x89")
                others.append(sock)
            time.sleep(1.0)  # all are being read by now
            third = post(server, encode(sample_image(0)))
            assert third.status_code == 503 and third.json()["error"]["reason"] == "too_many_uploads"
            assert third.headers["Retry-After"] == "1"
            sent = 0
            while sent < 60 and not select.select([slow], [], [], 0.3)[0]:  # until the server answers (18 s at most)
                slow.sendall(b"\x00")
                sent += 1
            status, body = read_reply(slow)
            assert status == 408 and "not sent in time" in body["error"]["message"]
            assert 15 <= sent < 40  # cut off at the 8 s deadline (about 23 bytes), not at the idle timeout
            status, body = read_reply(stalled)
            assert status == 408 and "idle" in body["error"]["message"]
    finally:
        for sock in others:
            sock.close()
    assert server.metric("m2f_rejections_total", reason="too_many_uploads") == 1
    assert server.wait_metric("m2f_rejections_total", MAX_UPLOADS, reason="upload_timeout") == MAX_UPLOADS
    assert post(server, encode(sample_image(0))).status_code == 200


def test_the_drain_answers_open_requests_in_json_by_their_deadline(start_server):
    """SIGTERM with a request waiting for its batch (which would wait 20 s) and an upload stalled: the drain
    lasts at most the request timeout (2 s), and both get their JSON answer by their deadline (504 and 408),
    with no traceback in the log, and the process exits."""
    server = start_server("--max-batch-size", "8", "--max-batch-delay-ms", "20000", "--request-timeout-s", "2")
    head = "POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    with ThreadPoolExecutor(1) as pool, socket.create_connection(("127.0.0.1", server.port)) as stalled:
        waiting = pool.submit(post, server, encode(sample_image(2)))
        assert server.wait_metric("m2f_queue_depth", 1) == 1
        stalled.sendall(head.encode() + b"\x89")
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        r = waiting.result(timeout=30)
        assert r.status_code == 504 and r.json()["error"]["reason"] == "timeout"
        status, body = read_reply(stalled)
        assert status == 408 and body["error"]["reason"] == "upload_timeout"
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    log = server.log()
    assert "Traceback" not in log and "CancelledError" not in log and "Internal Server Error" not in log


def test_sigterm_drains_accepted_requests(start_server):
    server = start_server("--max-batch-size", "8", "--max-batch-delay-ms", "1500")
    data = encode(sample_image(2))
    with ThreadPoolExecutor(3) as pool:
        accepted = [pool.submit(post, server, data) for _ in range(3)]
        assert server.wait_metric("m2f_queue_depth", 3) == 3
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # Not ready any more, answered on a listener that stays open while accepted requests are in progress.
        assert server.client.get("/readyz", timeout=2).status_code == 503
        assert [f.result().status_code for f in accepted] == [200, 200, 200]
    assert server.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
    assert "draining: 3 request(s) in progress" in server.log()


def test_model_that_fails_to_load_ends_the_server(start_server, tmp_path):
    server = start_server("--model", str(tmp_path / "missing"), ready=False)
    assert server.proc.wait(120) == 1
    failed = [line for line in server.log().splitlines() if "model failed to load" in line]
    assert len(failed) == 1 and "missing" in failed[0]
    assert "Traceback" not in server.log()  # the cause in one line; the traceback only at debug level


def test_port_in_use_fails_at_once(start_server):
    """The address is bound before anything else: a port in use ends `m2f serve` with one line and exit 2,
    before the model starts loading (no "ready" line, no load)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_server("--port", str(port), ready=False)
        assert server.proc.wait(120) == 2
    log = server.log()
    assert f"cannot listen on 127.0.0.1:{port}" in log and "Traceback" not in log
    assert "ready:" not in log and "Started server" not in log


# ---------------------------------------------------------------------------------------------- ONNX Runtime
def mismatch(a: np.ndarray, b: np.ndarray) -> float:
    return float((a != b).mean())


def test_onnx_runtime_server_runs_without_torch_and_agrees(start_server, server, model, demo_onnx, tmp_path):
    """The exported demo (fixed 160x160, dynamic batch) served by ONNX Runtime in a process where importing
    torch fails; its answers agree with the PyTorch server's up to float differences (ORT vs PyTorch logits
    differ by ~1e-6, which may move a boundary pixel: at most 0.1% of pixels per mask)."""
    blocker = tmp_path / "no-torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is blocked in this test')\n")
    ort = start_server("--model", str(demo_onnx), "--max-batch-size", "4", env={"PYTHONPATH": str(blocker.parent)})
    info = ort.client.get("/v1/model").json()
    assert info["runtime"] == "onnxruntime" and info["input"]["shape"][2:] == [160, 160]
    for task in ("panoptic", "instance", "semantic"):
        for index in range(3):
            data = encode(sample_image(index))
            a, b = post(ort, data, task=task).json(), post(server, data, task=task).json()
            assert [s["category_id"] for s in a["segments"]] == [s["category_id"] for s in b["segments"]]
            assert [s["score"] for s in a["segments"]] == pytest.approx([s["score"] for s in b["segments"]], abs=1e-4)
            for sa, sb in zip(a["segments"], b["segments"]):
                assert mismatch(decode_rle(sa), decode_rle(sb)) <= 1e-3

    # An image whose resize (160 x 240) does not fit the fixed graph is scaled down to fit (106 x 160) and
    # the masks come back at its original size; the reference resizes and pads the same way, in PyTorch.
    image = sample_image(4, (320, 480))
    body = post(ort, encode(image), task="panoptic").json()
    assert (body["width"], body["height"]) == (480, 320)
    small = image.resize((160, 106), Image.Resampling.BILINEAR)
    cfg = model.config
    batch = preprocess([small], cfg.with_preprocess(shortest_edge=106, longest_edge=0).preprocess, pad_to=(160, 160))
    with torch.inference_mode():
        out = model(torch.from_numpy(batch.pixel_values))
    ref = torch_postprocess.panoptic_segmentation(
        out.class_logits, out.mask_logits, batch.resized_sizes, [(320, 480)], thing_ids=cfg.thing_ids,
        threshold=cfg.threshold, mask_threshold=cfg.mask_threshold,
        overlap_mask_area_threshold=cfg.overlap_mask_area_threshold,
    )[0]  # fmt: skip
    assert [s["category_id"] for s in body["segments"]] == [s.label_id for s in ref.segments]
    for s in body["segments"]:
        assert mismatch(decode_rle(s), ref.segmentation.numpy() == s["id"]) <= 1e-3
    assert "torch is blocked" not in ort.log()
