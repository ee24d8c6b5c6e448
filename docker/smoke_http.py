"""HTTP checks of docker/smoke.sh against a running service: standard library only, one check per command.

    python docker/smoke_http.py ready URL [TIMEOUT_S]             /readyz 200 within TIMEOUT_S
    python docker/smoke_http.py compare REFERENCE_URL URL IMAGE    one answer per task, equal to the reference's
    python docker/smoke_http.py metrics URL COUNT                  /metrics: m2f_requests_total{code="200"} == COUNT
    python docker/smoke_http.py drain URL IMAGE -- STOP_COMMAND... a request in flight when STOP_COMMAND sends
                                                                   SIGTERM is answered 200; /readyz is 503 meanwhile
    python docker/smoke_http.py scraped PROMETHEUS_URL JOB COUNT   Prometheus has up == 1, m2f_ready == 1 and COUNT
                                                                   answered requests for JOB

Each prints what it saw on one line and exits 0, or prints ``FAILED: ...`` and exits 1.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

TASKS = ("semantic", "instance", "panoptic")
# Fields of a segment answer that legitimately differ between two servers answering the same image: the
# per-request timings (seconds measured on each). Everything else (size, task, model, every segment's id,
# category, label, score, area, bbox and RLE mask, the PNG and the warnings) must be equal. The request id is
# a header (X-Request-Id), not part of the body, and is not compared either.
IGNORED_FIELDS = ("timings",)


class Failed(Exception):
    pass


def get(url: str, timeout: float = 10) -> tuple[int, bytes, dict[str, str]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.read(), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


def post(url: str, body: bytes, content_type: str, timeout: float = 60) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def ready(url: str, timeout_s: str = "180") -> str:
    started = time.monotonic()
    end = started + float(timeout_s)
    last = "no answer"
    while time.monotonic() < end:
        try:
            status, body, _ = get(f"{url}/readyz", timeout=5)
            if status == 200:
                return f"{url}/readyz 200 after {time.monotonic() - started:.1f} s"
            last = f"{status} {body[:200]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.5)
    raise Failed(f"{url}/readyz not 200 within {timeout_s} s (last: {last})")


def segment(url: str, image: bytes, task: str) -> dict:
    status, body = post(f"{url}/v1/segment?task={task}", image, "image/png")
    if status != 200:
        raise Failed(f"POST {url}/v1/segment?task={task}: {status} {body[:300]!r}")
    return json.loads(body)


def differences(a, b, path: str = "") -> list[str]:
    """Where two JSON values differ (exact equality: the same model on the same input)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: only in one answer" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {str(a)[:80]} vs {str(b)[:80]}"]


def compare(reference: str, url: str, image_path: str) -> str:
    image = Path(image_path).read_bytes()
    seen = []
    for task in TASKS:
        expected, got = segment(reference, image, task), segment(url, image, task)
        for answer in (expected, got):
            for field in IGNORED_FIELDS:
                answer.pop(field, None)
        if not got.get("segments"):
            raise Failed(f"task {task}: no segments in {got}")
        diff = differences(expected, got)
        if diff:
            raise Failed(f"task {task}: answers differ from the reference's in {len(diff)} place(s): {diff[:5]}")
        seen.append(f"{task} {len(got['segments'])} segments")
    return f"equal to the reference (ignoring {', '.join(IGNORED_FIELDS)}): " + ", ".join(seen)


def metrics(url: str, count: str) -> str:
    status, body, headers = get(f"{url}/metrics")
    if status != 200:
        raise Failed(f"{url}/metrics: {status}")
    if not headers.get("content-type", "").startswith("text/plain"):
        raise Failed(f"{url}/metrics Content-Type {headers.get('content-type')!r}")
    answered = 0.0
    for line in body.decode().splitlines():
        if line.startswith("m2f_requests_total{") and 'code="200"' in line:
            answered += float(line.rsplit(" ", 1)[1])
    if answered != float(count):
        raise Failed(f'{url}/metrics counts {answered:g} m2f_requests_total{{code="200"}}, expected {count}')
    return f'{url}/metrics 200, m2f_requests_total{{code="200"}} = {answered:g}'


def drain(url: str, image_path: str, stop: list[str]) -> str:
    """Start an upload, send SIGTERM (through ``stop``) while half the body is still to come, check that the
    server now says it is not ready, send the rest: the answer must be a 200 with segments."""
    image = Path(image_path).read_bytes()
    parsed = urllib.parse.urlsplit(url)
    half = len(image) // 2
    with socket.create_connection((parsed.hostname, parsed.port), timeout=60) as sock:
        head = (
            f"POST /v1/segment?task=panoptic HTTP/1.1\r\nHost: {parsed.netloc}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(image)}\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode() + image[:half])
        time.sleep(0.5)  # the server has the headers and half the body: the request is in flight
        stopped_at = time.monotonic()
        stopper = subprocess.Popen(stop, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # The drain's first step: readiness fails at once (the listener stays open meanwhile).
        not_ready = None
        while time.monotonic() - stopped_at < 3:
            try:
                status, _, _ = get(f"{url}/readyz", timeout=2)
            except OSError:
                status = None
            if status == 503:
                not_ready = time.monotonic() - stopped_at
                break
            time.sleep(0.1)
        if not_ready is None:
            stopper.kill()
            raise Failed("after SIGTERM /readyz did not answer 503 within 3 s")
        sock.sendall(image[half:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    if b" 200 " not in status_line:
        stopper.kill()
        raise Failed(f"the request in flight during the drain got {status_line!r} {body[:300]!r}")
    segments = len(json.loads(body)["segments"])
    try:
        out, _ = stopper.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        stopper.kill()
        raise Failed(f"{' '.join(stop)} did not return within 120 s") from None
    took = time.monotonic() - stopped_at
    if stopper.returncode != 0:
        raise Failed(f"{' '.join(stop)} exited {stopper.returncode}: {out.strip()}")
    return (
        f"SIGTERM with a request in flight: /readyz 503 after {not_ready:.1f} s, the request answered 200 "
        f"({segments} segments), stopped in {took:.1f} s"
    )


def scraped(prometheus: str, job: str, count: str) -> str:
    def value(expr: str) -> float | None:
        status, body, _ = get(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise Failed(f"{expr}: {status} {answer}")
        result = answer["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    wanted = {
        f'up{{job="{job}"}}': 1.0,
        f'm2f_ready{{job="{job}"}}': 1.0,
        f'sum(m2f_requests_total{{job="{job}", code="200"}})': float(count),
    }
    end = time.monotonic() + 60
    while True:
        seen = {expr: value(expr) for expr in wanted}
        if seen == wanted:
            return "Prometheus scraped it: " + ", ".join(f"{e} = {v:g}" for e, v in seen.items())
        if time.monotonic() > end:
            raise Failed(f"Prometheus after 60 s: {seen}, expected {wanted}")
        time.sleep(1)


def main(argv: list[str]) -> int:
    commands = {"ready": ready, "compare": compare, "metrics": metrics, "scraped": scraped}
    try:
        if argv and argv[0] == "drain" and "--" in argv:
            split = argv.index("--")
            print(drain(*argv[1:split], argv[split + 1 :]))
        elif argv and argv[0] in commands:
            print(commands[argv[0]](*argv[1:]))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except Failed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
