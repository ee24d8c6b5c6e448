"""Deadlines and admission under overload, end to end on a real server (demo model, loopback).

- A request that cannot be answered within its deadline, or within the memory budget, is refused at once
  (before: admitted, then 504 at the deadline with its work still running).
- Admission by predicted work: under 10x overload every admitted request is answered 200; the rest get 503
  with Retry-After at once (before: admitted requests timed out with 504).
Counts are asserted, never durations.
"""

from __future__ import annotations

import io
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
from PIL import Image

from m2f import synth
from pipeline.batch import choose_batch_size


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def test_an_image_that_cannot_be_served_in_time_or_memory_is_refused_at_once(start_server):
    """A 36-megapixel PNG (~120 kB on the wire): decoding and the semantic map at full size take seconds on
    2 cores, past a 1 s deadline, so it is refused at once with 503 + Retry-After (before: admitted, 504 at the
    deadline, and its work went on, slowing the next request). With a 256 MiB memory budget it needs more than
    the whole budget: 413. A small image is answered either way."""
    server = start_server("--request-timeout-s", "1", "--memory-mb", "256")
    data = png(Image.new("RGB", (6000, 6000), (200, 30, 30)))
    r = server.client.post("/v1/segment", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 413, r.text[:200]
    assert r.json()["error"]["reason"] == "too_large" and "memory budget" in r.json()["error"]["message"]
    small = png(Image.fromarray(synth.make_sample(seed=3, index=0).image))
    assert server.client.post("/v1/segment", content=small, headers={"Content-Type": "image/png"}).status_code == 200

    server = start_server("--request-timeout-s", "1")
    r = server.client.post(
        "/v1/segment", content=data, headers={"Content-Type": "image/png"}, params={"task": "semantic"}
    )
    assert r.status_code == 503, r.text[:200]
    assert r.json()["error"]["reason"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
    assert server.metric("m2f_rejections_total", reason="timeout") == 0
    assert server.client.post("/v1/segment", content=small, headers={"Content-Type": "image/png"}).status_code == 200


def test_every_admitted_request_is_answered_under_10x_overload(start_server):
    """64 clients, 3 requests each, as fast as they can, at 1280x960 (post-processing ~0.1 s a request on the
    demo model) with a 2 s deadline: far more than fits. Admitted requests must all be answered in time."""
    server = start_server("--request-timeout-s", "2")
    batching = server.client.get("/v1/model").json()["batching"]  # the default: batch size from a profile
    profile = {int(b): t for b, t in batching["profile_s"].items()}
    half = 2 / 4  # the latency limit: one pass may take a quarter of the deadline
    assert sorted(profile) == [1, 2, 4] and batching["max_batch_size"] == choose_batch_size(profile, half)
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
