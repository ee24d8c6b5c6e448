"""Reloads under load: ``--clients`` send requests back to back to one model while it is reloaded ``--swaps``
times through the admin route (a new version loads beside the old one, takes the new requests, the old one
drains); counts the answers by status (all should be 200) and times each reload.

    python bench/swap_under_load.py --clients 8 --swaps 10 --json bench/results/swap_under_load.json
"""

from __future__ import annotations

import argparse
import io
import json
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from PIL import Image

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Server, machine_info  # noqa: E402
from m2f import synth  # noqa: E402
from service.settings import demo_onnx  # noqa: E402


def png(index: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synth.make_sample(seed=11, index=index).image).save(buf, format="PNG")
    return buf.getvalue()


def run(args: argparse.Namespace) -> dict:
    key = secrets.token_hex(16)
    statuses: Counter = Counter()
    lock, stop = threading.Lock(), threading.Event()
    with tempfile.TemporaryDirectory(prefix="m2f-swap-") as tmp:
        keys = Path(tmp) / "keys.json"
        keys.write_text(json.dumps({"admin": [key]}))
        server = Server(f"demo={demo_onnx()}", batch=2, delay_ms=5.0, env={"M2F_KEYS_FILE": str(keys)})

        def client(i: int) -> None:
            data = png(i)
            with httpx.Client(base_url=server.base, timeout=60) as c:
                while not stop.is_set():
                    r = c.post("/v1/models/demo/segment", content=data, headers={"Content-Type": "image/png"})
                    with lock:
                        statuses[r.status_code] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        swaps = []
        try:
            for _ in range(args.swaps):
                time.sleep(args.interval)
                t0 = time.perf_counter()
                r = httpx.put(
                    server.base + "/v1/models/demo",
                    json={"path": str(demo_onnx())},
                    headers={"X-API-Key": key},
                    timeout=300,
                )
                swaps.append(
                    {"status": r.status_code, "version": r.json().get("version"), "s": time.perf_counter() - t0}
                )
            time.sleep(args.interval)
        finally:
            stop.set()
            for t in threads:
                t.join()
            server.stop()
    return {"machine": machine_info(threads=0), "statuses": dict(statuses), "swaps": swaps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reloads")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = run(args)
    seconds = sorted(s["s"] for s in results["swaps"])
    print(f"answers by status: {results['statuses']}")
    print(f"reloads: {[s['status'] for s in results['swaps']]}, {seconds[0]:.2f}-{seconds[-1]:.2f} s each")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
