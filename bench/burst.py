"""Bursts against the real server: does every request end, and does nothing admitted time out?

    python bench/burst.py [--bursts 20] [--requests 500] [--connections 64] [--json FILE] [--env K=V ...]
    python bench/burst.py --source OTHER_CHECKOUT ...    # the same bursts against another checkout's server

Starts ``m2f serve`` (the demo model, default settings unless ``--env`` says otherwise) on
127.0.0.1, then sends ``--bursts`` bursts of ``--requests`` requests over ``--connections`` connections
(asyncio + httpx in this process, each connection sending its next request as soon as its answer is in), a
burst starting when the last one has ended. Photos: 640x480 synthetic scenes (``m2f synth``) as JPEG.
Reported per burst: answers by status and reason, the longest stretch with requests outstanding and no
answer at all (a stall: the scheduler has stopped), and its duration. Each request has a client timeout of
the server's deadline plus 30 s, so a server that never answers shows up as a client timeout (``stuck``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Server  # noqa: E402
from m2f import synth  # noqa: E402
from service.client import retry_after_s  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def photos(n: int = 8) -> list[bytes]:
    out = []
    for i in range(n):
        image = Image.fromarray(synth.make_sample(seed=30, index=i).image).resize((640, 480))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


async def burst(base: str, data: list[bytes], requests: int, connections: int, timeout_s: float) -> dict[str, Any]:
    """``requests`` requests over ``connections`` connections; counts, the longest stall, the duration."""
    counts: Counter = Counter()
    left = iter(range(requests))
    outstanding = 0
    last_answer = started = time.monotonic()
    longest_stall = 0.0

    async def connection(client: httpx.AsyncClient) -> None:
        nonlocal outstanding, last_answer, longest_stall
        for i in left:
            outstanding += 1
            try:
                r = await client.post(
                    "/v1/segment", content=data[i % len(data)], headers={"Content-Type": "image/jpeg"}
                )
                key = f"{r.status_code} {r.json()['error']['reason']}" if r.status_code != 200 else "200"
                counts[key] += 1
                if r.status_code == 503 and (wait := retry_after_s(r)) is not None:
                    await asyncio.sleep(min(wait, 1.0))  # as a client would, but do not let a burst idle long
            except httpx.TimeoutException:
                counts["stuck"] += 1
            except httpx.HTTPError as e:
                counts[f"error {type(e).__name__}"] += 1
            finally:
                outstanding -= 1
                now = time.monotonic()
                longest_stall = max(longest_stall, now - last_answer)
                last_answer = now

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=base, timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(connection(client) for _ in range(connections)))
    return {"counts": dict(counts), "longest_stall_s": round(longest_stall, 3), "seconds": time.monotonic() - started}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bursts", type=int, default=20)
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--source", type=Path, default=REPO, help="the checkout whose server to run (default: this)")
    p.add_argument("--env", nargs="*", default=[], help="K=V settings for the server")
    p.add_argument("--deadline", type=float, default=30.0, help="the server's request timeout (for the client's)")
    p.add_argument("--stall-s", type=float, default=10.0, help="no answer for this long with requests out: a stall")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.env)
    server = Server(None, batch=None, delay_ms=5.0, env=env, source=args.source.resolve())  # default batching
    data = photos()
    results = []
    try:
        for b in range(args.bursts):
            r = asyncio.run(burst(server.base, data, args.requests, args.connections, args.deadline + 30))
            r["stalled"] = r["longest_stall_s"] >= args.stall_s or "stuck" in r["counts"]
            results.append(r)
            print(f"burst {b + 1}: {r['counts']} longest stall {r['longest_stall_s']} s, {r['seconds']:.1f} s")
    finally:
        server.stop()
    total: Counter = Counter()
    for r in results:
        total.update(r["counts"])
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": cpu_model(),
        "cpus": os.cpu_count(),
        "commit": subprocess.run(
            ["git", "-C", str(args.source), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "env": env,
        "bursts": len(results),
        "stalled_bursts": sum(r["stalled"] for r in results),
        "totals": dict(total),
        "per_burst": results,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "per_burst"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
