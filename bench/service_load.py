"""Load on loopback: ``m2f serve`` with batching on and off, against calling the runtime directly.

    python bench/service_load.py [--model PATH] [--concurrency 1 2 4 8] [--seconds 10] [--json FILE]

Starts the real server (a subprocess on 127.0.0.1) once with dynamic batching (``--max-batch-size``,
default 4, 5 ms delay) and once without (batch size 1). Closed-loop clients (threads, one connection each)
send synthetic 160x160 PNGs for ``--seconds`` per concurrency level; reported: throughput and p50/p95/p99
latency as the clients see it. The baseline is the same pipeline called in this process without HTTP
(decode -> preprocess -> runtime -> post-process -> RLE JSON), one image at a time: the service's overhead
is its latency at concurrency 1 minus that. The clients share the machine's cores with the server, as any
loopback load test does; the numbers are for comparing the modes side by side, not absolute capacity.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Server, percentiles  # noqa: E402
from m2f import synth  # noqa: E402
from pipeline import steps  # noqa: E402
from runtimes import open_runner  # noqa: E402


def images(n: int = 16) -> list[bytes]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(synth.make_sample(seed=77, index=i).image).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def direct_baseline(model: str | None, runtime: str, data: list[bytes], seconds: float) -> dict[str, float]:
    """The pipeline in-process, one image at a time, no HTTP."""
    runner = open_runner(model, runtime)
    runner.warmup()
    cfg = runner.config
    latencies = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        t0 = time.perf_counter()
        prepared = steps.prepare(steps.decode(data[i % len(data)]), cfg, runner.input.size)
        class_logits, mask_logits = runner.run(prepared.pixels[None])
        result = steps.postprocess(
            "panoptic", cfg, class_logits, mask_logits, [prepared.resized_size], [prepared.original_size]
        )[0]
        json.dumps({"segments": steps.segments("panoptic", cfg, result)})
        latencies.append(time.perf_counter() - t0)
        i += 1
    return {"images_per_s": len(latencies) / sum(latencies), **percentiles(latencies)}


def load(base: str, data: list[bytes], concurrency: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(k: int) -> None:
        nonlocal errors
        with httpx.Client(base_url=base, timeout=120) as c:
            i = k
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                r = c.post("/v1/segment", content=data[i % len(data)], headers={"Content-Type": "image/png"})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        errors += 1
                i += concurrency

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "requests": len(latencies),
        "errors": errors,
        "images_per_s": len(latencies) / wall,
        **percentiles(latencies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder or .onnx (default: the demo model, PyTorch)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    runtime = "onnxruntime" if args.model and args.model.endswith(".onnx") else "torch"
    data = images()
    header = f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {runtime}"
    print(header)
    base = direct_baseline(args.model, runtime, data, args.seconds)
    print(f"direct (no HTTP, 1 image at a time): {base['images_per_s']:.1f} img/s, p50 {base['p50_ms']:.1f} ms")
    results = {"date": str(datetime.date.today()), "runtime": runtime, "model": args.model or "demo", "direct": base}
    for mode, batch, delay in (("batching", args.max_batch_size, 5.0), ("no batching", 1, 0.0)):
        server = Server(args.model, batch, delay)
        try:
            rows = []
            for c in args.concurrency:
                s0, n0 = server.batch_sizes()
                row = load(server.base, data, c, args.seconds)
                s1, n1 = server.batch_sizes()
                row["concurrency"] = c
                row["mean_batch"] = (s1 - s0) / max(n1 - n0, 1)
                rows.append(row)
                print(
                    f"{mode:12s} c={c:2d}: {row['images_per_s']:6.1f} img/s  p50 {row['p50_ms']:7.1f}  "
                    f"p95 {row['p95_ms']:7.1f}  p99 {row['p99_ms']:7.1f} ms  mean batch {row['mean_batch']:.2f}  "
                    f"errors {row['errors']}"
                )
            results[mode] = rows
        finally:
            server.stop()
    on, off = results["batching"], results["no batching"]
    print("\nthroughput with / without batching:")
    for a, b in zip(on, off):
        print(f"  c={a['concurrency']:2d}: {a['images_per_s'] / b['images_per_s']:.2f}x")
    overhead = on[0]["p50_ms"] - base["p50_ms"]
    print(f"service overhead at concurrency 1 (p50, batching on): {overhead:.1f} ms over the direct pipeline")
    results["overhead_p50_ms"] = overhead
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
