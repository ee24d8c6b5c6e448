"""Deadlines and admission under overload, end to end on a real server (demo model, loopback).

- One deadline covers the whole request: a request whose post-processing outlasts it gets 504 at the
  deadline (before: 200, long after it).
- Admission by measured capacity: under 10x overload every admitted request is answered 200; the rest
  get 503 with Retry-After at once (before: admitted requests timed out with 504).
Counts are asserted, never durations.
"""

from __future__ import annotations

import io
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
from PIL import Image

from m2f import synth
from service.batching import choose_batch_size


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def test_post_processing_past_the_deadline_gets_504(start_server):
    """A 36-megapixel image: decoding and the 160 px forward pass are quick, the semantic map at full size
    is not (~5 s on 2 cores), so the 3 s deadline falls during post-processing (on a machine slow enough
    for decoding to take 3 s it falls earlier: still 504 at the deadline, which is the point)."""
    server = start_server("--request-timeout-s", "3")
    data = png(Image.new("RGB", (6000, 6000), (200, 30, 30)))  # 36 MP, under max_pixels; ~120 kB
    r = server.client.post(
        "/v1/segment", content=data, headers={"Content-Type": "image/png"}, params={"task": "semantic"}
    )
    assert r.status_code == 504, r.text[:200]
    assert r.json()["error"]["reason"] == "timeout"
    assert server.metric("m2f_rejections_total", reason="timeout") == 1
    small = png(Image.fromarray(synth.make_sample(seed=3, index=0).image))
    assert server.client.post("/v1/segment", content=small, headers={"Content-Type": "image/png"}).status_code == 200


def test_every_admitted_request_is_answered_under_10x_overload(start_server):
    """64 clients, 3 requests each, as fast as they can, at 1280x960 (post-processing ~0.1 s a request on the
    demo model) with a 4 s deadline: far more than fits. Admitted requests must all be answered in time.

    The deadline is not shorter because the start of the burst (64 connections opened, most refused, on the
    same 2 cores as the server) costs a fixed time the service cannot have measured before it: with 2 s, a
    slow CI host once had 5 of 8 admitted requests time out; the default deadline is 30 s. For the same
    reason the admission share is the one such a short deadline needs (README): the default 0.7, sized for
    30 s, left 0.9 s of a 3 s deadline, and 2 of 4 runs had 2-5 admitted requests time out; 0.5 of 3 s (1.5 s
    of margin) still let 2 of 16 time out in one fresh-clone CI run of the whole suite. Now 0.4 of 4 s: about
    as many admitted as 0.5 of 3 s (answers predicted within 1.6 s), 2.4 s of margin."""
    server = start_server("--request-timeout-s", "4", "--admit-share", "0.4")
    batching = server.client.get("/v1/model").json()["batching"]  # the default: batch size from a profile
    profile = {int(b): t for b, t in batching["profile_s"].items()}
    quarter = 4 / 4  # the latency limit: one pass may take a quarter of the deadline
    assert sorted(profile) == [1, 2, 4] and batching["max_batch_size"] == choose_batch_size(profile, quarter)
    if batching["max_batch_size"] > 1:  # checked against the served passes (batch 1 until 3 pairs say otherwise)
        assert batching["check"]["checked"] == batching["max_batch_size"] == batching["check"]["in_use"]
    else:
        assert batching["check"] is None
    image = Image.fromarray(synth.make_sample(seed=5, index=1).image).resize((1280, 960), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    headers = {"Content-Type": "image/jpeg"}
    for _ in range(3):  # a running service: the cost per request has been measured
        assert server.client.post("/v1/segment", content=data, headers=headers).status_code == 200

    def client(_: int) -> list[tuple[int, str, str | None]]:
        out = []
        with httpx.Client(base_url=server.base, timeout=60) as c:
            for _ in range(3):
                r = c.post("/v1/segment", content=data, headers=headers)
                reason = r.json()["error"]["reason"] if r.status_code != 200 else ""
                out.append((r.status_code, reason, r.headers.get("Retry-After")))
        return out

    with ThreadPoolExecutor(64) as pool:
        replies = [reply for replies in pool.map(client, range(64)) for reply in replies]
    counts = Counter((status, reason) for status, reason, _ in replies)
    assert sum(counts.values()) == 192
    assert set(counts) <= {(200, ""), (503, "queue_full")}, counts  # no 504: nothing admitted times out
    assert counts[(200, "")] >= 3 and counts[(503, "queue_full")] >= 64, counts  # overloaded, and served
    assert all(int(retry) >= 1 for status, _, retry in replies if status == 503)
    assert server.metric("m2f_inflight_requests") == 0 and server.metric("m2f_queue_depth") == 0
