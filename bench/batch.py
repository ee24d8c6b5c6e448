"""Bulk throughput: ``m2f batch`` (Ray Data) vs a plain Python loop over the runner vs ``m2f serve`` under a
concurrent client, on the same images and model.

    python bench/batch.py [--num-images 200] [--size 160 160] [--model PATH] [--task panoptic]
                          [--concurrency 8] [--num-cpus N] [--json FILE]

Images are written by ``m2f synth`` into a temporary folder. The three ways, each over every image once:

- loop: this process, one image at a time: read, decode, prepare, run, post-process, JSON (the service's steps);
- service: ``m2f serve`` on 127.0.0.1 (batching on: 4 images, 5 ms), ``--concurrency`` client threads
  posting the images; timed from the first request to the last answer (model loading not included);
- batch: ``m2f batch`` as a user runs it (a subprocess: a local Ray started, actors loading the model, COCO
  shards written), timed by its own summary, which includes starting Ray and the actors; and its rate without
  that start-up, from two job sizes: the same options on the first ``--small`` images, and
  (N - small) / (wall time at N - wall time at small), what a long job runs at. (Ray Data delivers results in
  bursts, so the times of its deliveries give no rate.)

The clients share the cores with the server, as in any loopback test; all three use the machine's cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Server  # noqa: E402
from m2f import synth  # noqa: E402
from pipeline import steps  # noqa: E402
from runtimes import open_runner  # noqa: E402

WAYS = ("loop", "service", "batch")
REPO = Path(__file__).resolve().parents[1]


def plain_loop(model: str | None, runtime: str, paths: list[Path], task: str) -> dict[str, float]:
    """The service's steps in this process, one image at a time."""
    runner = open_runner(model, runtime)
    runner.warmup()
    cfg = runner.config
    t0 = time.perf_counter()
    for path in paths:
        prepared = steps.prepare(steps.decode(path.read_bytes()), cfg, runner.input.size)
        class_logits, mask_logits = runner.run(prepared.pixels[None])
        json.dumps(steps.answer(task, cfg, prepared, class_logits[0], mask_logits[0]))
    wall = time.perf_counter() - t0
    return {"images": len(paths), "wall_s": wall, "images_per_s": len(paths) / wall}


def service(model: str | None, paths: list[Path], task: str, concurrency: int) -> dict[str, float]:
    """``m2f serve`` with its default batching, every image posted once by ``concurrency`` clients."""
    server = Server(model, 4, 5.0)
    try:
        data = [p.read_bytes() for p in paths]
        with httpx.Client(base_url=server.base, timeout=300) as c:  # warm-up request
            c.post("/v1/segment", content=data[0], headers={"Content-Type": "image/png"}, params={"task": task})

        def post(body: bytes) -> int:
            with httpx.Client(base_url=server.base, timeout=300) as c:
                r = c.post("/v1/segment", content=body, headers={"Content-Type": "image/png"}, params={"task": task})
                return r.status_code

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            codes = list(pool.map(post, data))
        wall = time.perf_counter() - t0
        s, n = server.batch_sizes()
    finally:
        server.stop()
    ok = sum(code == 200 for code in codes)
    return {"images": ok, "errors": len(codes) - ok, "wall_s": wall, "images_per_s": ok / wall, "mean_batch": s / n}


def batch(
    model: str | None, folder: Path, out: Path, task: str, num_cpus: int | None, extra: str = ""
) -> dict[str, float]:
    """``m2f batch`` in a subprocess, with ``extra`` options: from its summary, images, wall time, images/s."""
    cmd = [sys.executable, "-m", "m2f.cli", "batch", str(folder), "-o", str(out), "--task", task, "--json"]
    if model:
        cmd += ["--model", model]
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    cmd += shlex.split(extra)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    total = time.perf_counter() - t0
    summary = json.loads(done.stdout.strip().splitlines()[-1])["this_run"]
    return {
        "images": summary["images"],
        "wall_s": summary["wall_s"],
        "images_per_s": summary["images_per_s"],
        "process_wall_s": total,
        "first_result_s": summary["first_result_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder or .onnx (default: the demo model, PyTorch)")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--size", type=int, nargs=2, default=(160, 160), metavar=("H", "W"))
    parser.add_argument("--task", choices=steps.TASKS, default="panoptic")
    parser.add_argument("--concurrency", type=int, default=8, help="service clients")
    parser.add_argument("--num-cpus", type=int, help="CPUs of m2f batch's local Ray (default: all)")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=list(WAYS), help="what to run (default: all)")
    parser.add_argument(
        "--batch-variants",
        nargs="+",
        default=[""],
        metavar="OPTIONS",
        help="m2f batch options, one run each (e.g. '' '--threads 2' '--batch-size 8'; default: one run, defaults)",
    )
    parser.add_argument("--small", type=int, help="images of the short job (default: a tenth, at least 20)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    runtime = "onnxruntime" if args.model and args.model.endswith(".onnx") else "torch"
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {runtime}")
    with tempfile.TemporaryDirectory(prefix="m2f-bench-batch-") as tmp:
        data = Path(tmp) / "data"
        synth.write_dataset(data, args.num_images, seed=11, size=tuple(args.size))
        paths = sorted((data / "images").glob("*.png"))
        print(f"{len(paths)} images of {args.size[0]}x{args.size[1]}, task {args.task}")
        results = {"date": str(datetime.date.today()), "runtime": runtime, "model": args.model or "demo"}
        if "loop" in args.ways:
            results["loop"] = plain_loop(args.model, runtime, paths, args.task)
            print(f"loop (1 image at a time):   {results['loop']['images_per_s']:6.2f} img/s", flush=True)
        if "service" in args.ways:
            results["service"] = s = service(args.model, paths, args.task, args.concurrency)
            print(
                f"service (c={args.concurrency}):            {s['images_per_s']:6.2f} img/s, "
                f"mean batch {s['mean_batch']:.2f}",
                flush=True,
            )
        if "batch" in args.ways:
            small = min(len(paths) - 1, args.small or max(20, len(paths) // 10))
            (data / "small").mkdir()
            for p in paths[:small]:
                shutil.copyfile(p, data / "small" / p.name)
            results["batch"] = []
            for k, extra in enumerate(args.batch_variants):
                b = batch(args.model, data / "images", Path(tmp) / f"out{k}", args.task, args.num_cpus, extra)
                short = batch(args.model, data / "small", Path(tmp) / f"short{k}", args.task, args.num_cpus, extra)
                rate = (b["images"] - short["images"]) / (b["wall_s"] - short["wall_s"])
                results["batch"].append({"options": extra, **b, "short": short, "images_per_s_without_start": rate})
                print(
                    f"m2f batch {extra or '(defaults)'}: {b['images_per_s']:6.2f} img/s over {b['wall_s']:.1f} s "
                    f"with Ray start-up; {rate:.2f} img/s without it ({short['images']} images took "
                    f"{short['wall_s']:.1f} s)",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
