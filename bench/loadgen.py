"""Closed-loop HTTP clients for the service benchmarks, in this process or in a child process of lower priority.

    python bench/loadgen.py REQUEST.pickle        # what :func:`closed_loop_elsewhere` runs; prints one JSON run

Each client sends ``POST /v1/segment`` with the next photo as soon as its answer is in. On loopback the clients
share the cores with the server: eight client threads waking up to read answers and send uploads take CPU time
from the server's forward pass (and, with OpenMP's parallel regions, stall both of its threads at once).
:func:`closed_loop_elsewhere` runs them in a child process at ``nice`` 19, so that the kernel gives the server's
threads the cores whenever both want them: the nearest this machine gets to clients on another host. The
child imports only httpx (no torch), so it starts in well under a second.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.client import retry_after_s  # noqa: E402


def closed_loop(
    base: str, data: list[bytes], concurrency: int, seconds: float, params: dict[str, Any], raw: bool = False
) -> dict[str, Any]:
    """``concurrency`` clients, each sending the next photo as soon as its answer is in, for ``seconds``.

    Clients behave as ``service.client.Client`` does: a 503 with ``Retry-After`` (the server refused the request
    before doing any work: its queue would not be answered in time) is counted as ``refused`` and the same photo
    is sent again after that many seconds; the latency of a request runs from its first send to its 200. Any
    other failure is an error and the client moves on."""
    latencies: list[float] = []
    segments: list[int] = []
    errors = refused = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(k: int) -> None:
        nonlocal errors, refused
        with httpx.Client(base_url=base, timeout=300) as c:
            i = k
            while time.monotonic() < stop_at:
                photo = data[i % len(data)]  # raw: the JPEG as the body; else the multipart field ``image``
                body = {"content": photo, "headers": {"Content-Type": "image/jpeg"}} if raw else {}
                files = None if raw else {"image": ("photo.jpg", photo, "image/jpeg")}
                t0 = time.perf_counter()
                n = None
                while time.monotonic() < stop_at:
                    try:
                        r = c.post("/v1/segment", params=params, files=files, **body)
                        wait = retry_after_s(r) if r.status_code == 503 else None
                        if wait is None:
                            n = len(r.json()["segments"]) if r.status_code == 200 else None
                            break
                    except (httpx.HTTPError, ValueError, KeyError):
                        break
                    with lock:
                        refused += 1
                    time.sleep(max(0.0, min(wait, stop_at - time.monotonic())))
                else:
                    break  # time is up while waiting to retry: not an answer, not an error
                dt = time.perf_counter() - t0
                with lock:
                    if n is None:
                        errors += 1
                    else:
                        latencies.append(dt)
                        segments.append(n)
                i += concurrency

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "wall_s": time.perf_counter() - t0,
        "latencies": latencies,
        "segments": segments,
        "errors": errors,
        "refused": refused,
    }


def closed_loop_elsewhere(
    base: str,
    data: list[bytes],
    concurrency: int,
    seconds: float,
    params: dict[str, Any],
    nice: int = 19,
    raw: bool = False,
) -> dict[str, Any]:
    """:func:`closed_loop` in a child process whose niceness is raised by ``nice`` (0: same priority as this one).

    Same arguments and result; the child's start-up (under a second) is not part of ``wall_s``."""
    with tempfile.TemporaryDirectory(prefix="m2f-loadgen-") as tmp:
        request = Path(tmp) / "request.pickle"
        request.write_bytes(
            pickle.dumps(
                {
                    "base": base,
                    "data": data,
                    "concurrency": concurrency,
                    "seconds": seconds,
                    "params": params,
                    "raw": raw,
                }
            )
        )
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), str(request)],
            check=True,
            capture_output=True,
            text=True,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    request = pickle.loads(Path(args[0]).read_bytes())
    print(json.dumps(closed_loop(**request)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
