"""Two models in one server, one about 10x slower than the other: the fast model's latency alone, and with the
slow one saturated (``m2f serve --model fast=... --model slow=...``).

The fast model is the demo model's ONNX export at its own resize (shortest edge 160); the slow one the same
weights with the resize raised to ``--slow-edge`` (512: about 10x the pixels, so about 10x the pass), written as
a copy of the .onnx file whose metadata says so. Closed-loop clients (``bench.common.closed_loop``) send the
same 640x480 photos; phase 1 drives the fast model alone, phase 2 both at once: ``--slow-clients`` keep the slow
model's queue full while ``--fast-clients`` time the fast one. The scheduler shares the inference thread between
the two lanes by pass time, so the fast model's wait is bounded by a slow pass or two rather than by the slow
model's queue; the report gives the fast model's p50/p99 in both phases, the slow model's throughput, and the
slow model's mean pass time (from the server's metrics) to compare p99 with.

    python bench/two_models.py --seconds 30 --json bench/results/two_models.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import onnx

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Server, closed_loop, machine_info, percentiles, photos  # noqa: E402
from model_format.metadata import read_metadata, write_metadata  # noqa: E402
from service.settings import demo_onnx  # noqa: E402


def slow_copy(source: Path, output: Path, edge: int) -> Path:
    """The demo graph with its resize raised to ``edge`` (shortest and longest edge): the same weights, more
    pixels per image."""
    proto = onnx.load(str(source))
    meta = read_metadata(source)
    pre = {**meta.preprocess, "shortest_edge": edge, "longest_edge": max(edge, meta.preprocess["longest_edge"])}
    write_metadata(proto, dataclasses.replace(meta, preprocess=pre))
    onnx.save(proto, str(output))
    return output


def pass_seconds(base: str, model: str) -> float:
    """Mean seconds per forward pass of ``model`` so far, from ``/metrics``."""
    total = count = 0.0
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith("m2f_inference_duration_seconds_") and f'model="{model}"' in line:
            key, value = line.rsplit(" ", 1)
            if key.startswith("m2f_inference_duration_seconds_sum"):
                total += float(value)
            elif key.startswith("m2f_inference_duration_seconds_count"):
                count += float(value)
    return total / count if count else 0.0


def run(args: argparse.Namespace) -> dict:
    data = photos((640, 480))
    with tempfile.TemporaryDirectory(prefix="m2f-two-models-") as tmp:
        slow = slow_copy(demo_onnx(), Path(tmp) / "slow.onnx", args.slow_edge)
        server = Server(f"fast={demo_onnx()},slow={slow}", batch=1, delay_ms=0.0)
        try:
            params = {"task": "panoptic"}
            fast_path, slow_path = "/v1/models/fast/segment", "/v1/models/slow/segment"
            closed_loop(server.base, data, 1, 3, params, path=slow_path)  # warm-up
            closed_loop(server.base, data, args.fast_clients, 3, params, path=fast_path)
            alone = closed_loop(server.base, data, args.fast_clients, args.seconds, params, path=fast_path)
            slow_result: dict = {}
            saturate = threading.Thread(
                target=lambda: slow_result.update(
                    closed_loop(server.base, data, args.slow_clients, args.seconds + 4, params, path=slow_path)
                )
            )
            saturate.start()
            threading.Event().wait(2)  # the slow model's queue fills first
            beside = closed_loop(server.base, data, args.fast_clients, args.seconds, params, path=fast_path)
            saturate.join()
            slow_pass = pass_seconds(server.base, "slow")
            fast_pass = pass_seconds(server.base, "fast")
        finally:
            server.stop()

    def row(r: dict) -> dict:
        n = len(r["latencies"])
        return {"answered": n, "images_per_s": n / r["wall_s"], "errors": r["errors"], "refused": r["refused"]} | (
            percentiles(r["latencies"]) if n else {}
        )

    return {
        "machine": machine_info(threads=0),
        "args": {**vars(args), "json": None if args.json is None else str(args.json)},
        "fast_alone": row(alone),
        "fast_beside_slow": row(beside),
        "slow_saturated": row(slow_result),
        "slow_pass_ms": 1000 * slow_pass,
        "fast_pass_ms": 1000 * fast_pass,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds per phase")
    parser.add_argument("--fast-clients", type=int, default=2)
    parser.add_argument("--slow-clients", type=int, default=8)
    parser.add_argument("--slow-edge", type=int, default=512, help="the slow model's resize (the fast one's: 160)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results = run(args)
    print(f"{'phase':<28} {'answered':>8} {'img/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'refused':>8}")
    for name in ("fast_alone", "fast_beside_slow", "slow_saturated"):
        r = results[name]
        p50, p99 = r.get("p50_ms", 0.0), r.get("p99_ms", 0.0)
        print(f"{name:<28} {r['answered']:>8} {r['images_per_s']:>7.2f} {p50:>8.0f} {p99:>8.0f} {r['refused']:>8}")
    print(f"mean pass: slow {results['slow_pass_ms']:.0f} ms, fast {results['fast_pass_ms']:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
