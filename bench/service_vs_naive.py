"""Services side by side: ``m2f serve`` (torch, ONNX Runtime fp32, ONNX Runtime int8) against a naive FastAPI +
``transformers`` server, on the same checkpoint and the same photos, over loopback HTTP.

    pip install scikit-image                          # the photos (a bench-only dependency)
    python bench/service_vs_naive.py --prepare        # once: the checkpoint and both exports, kept in --workdir
    python bench/service_vs_naive.py --json bench/results/service_vs_naive.json   # 16 runs of ~40 s each
    python bench/service_vs_naive.py --tiny           # a smoke run: a tiny model, 160x160 photos, 2 s per run

The checkpoint: the swin-tiny COCO-panoptic architecture (133 classes with their COCO names, 100 queries),
random weights (``--seed``), resize to shortest edge 384 / longest 640 (``preprocessor_config.json``), saved
once with ``save_pretrained`` under ``--workdir``; both servers load that folder, and ``m2f export onnx``
(dynamic shape and batch; ``--quantize int8`` for the int8 one) exports it there once: reruns skip all three.

Plain random weights answer nothing either post-processing can count: the decoder's queries collapse onto
one another and every class score is about 1/134. ``transformers``' panoptic post-processing then returns no
segment at any threshold (it counts a query's own area where score x sigmoid >= 0.5, not sigmoid >= 0.5 as
detectron2 does). So the random weights are shaped once, before saving (:func:`bench.common.shape_outputs_`): the
decoder's residual updates are scaled by 0.1 (queries keep their identity) and the class head by 4 (scores
spread over 0.3-0.9 like a trained model's; about 20 of 100 queries pass 0.8). The compute is the same.

The naive server is ``bench/naive_server.py`` (image processor, model, HF post-processing, pycocotools RLE,
one image at a time); ``m2f serve`` runs with its default batching (up to 4 images, 5 ms; its start-up
profile picks the largest batch that pays, reported per row with the mean batch it ran). Both get the same
``--threshold`` and ``--overlap-mask-area-threshold`` (default 0.8 and 0.8, the service's) with every
request; each row reports its mean segments per image, and a row whose count differs from the naive
server's by more than 2x (or where either is zero) is marked void.

Photos: scikit-image's sample photographs resized to each ``--sizes`` (WxH, default 640x480 and 1333x800),
sent as JPEG (quality 90) in the multipart field ``image``. Per measurement point (size, concurrency) the
servers take turns, in an order rotated from point to point, and only one server process is alive at a
time: each is started, warmed up with the point's load for ``--warmup-seconds``, measured with closed-loop
clients (threads, one httpx connection each) for ``--seconds``, and stopped. Reported per (server, size,
concurrency): img/s, p50/p99 latency as the clients see it (a 503 with ``Retry-After`` is retried after it, as
``service.client.Client`` does, and counted), errors, mean segments per image and img/s
relative to the naive server. The clients share the cores with the server, as in any loopback test; they run in a
child process at ``--clients-nice`` 19 (:func:`bench.common.closed_loop_elsewhere`), so that the kernel gives the
server the cores when both want them, as clients on another host would (``--in-process-clients``: threads of this
process, as before 2026-12-03; with them the naive server lost 9-11 % from 1 to 8 clients on 2 cores).
Run it on an otherwise idle machine: on 2 cores busy with other work, torch's two intra-op threads ran our
tiny model 10x slower than one thread did (and ``transformers``' 15x), which swamps any difference between
the servers; ``--threads`` sets every server's intra-op threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    CLASS_SCALE,
    DECODER_UPDATE_SCALE,
    PHOTOS,
    Server,
    build_checkpoint,
    checkpoint_folder,
    closed_loop,
    closed_loop_elsewhere,
    free_port,
    full_setting,
    machine_info,
    parse_size,
    percentiles,
    photos,
    tiny_setting,
)

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
SERVERS = ("naive", "m2f-torch", "m2f-onnx-fp32", "m2f-onnx-int8")
SEGMENT_RATIO_LIMIT = 2.0  # a row whose mean segments differ from the naive server's by more is void


# ---------------------------------------------------------------------------------------------- exports
def export(checkpoint: Path, output: Path, quantize: bool) -> Path:
    """``m2f export onnx`` (dynamic shape and batch, checked against PyTorch) unless ``output`` exists."""
    if output.is_file():
        return output
    partial = output.with_name(output.stem + ".partial.onnx")
    cmd = [sys.executable, "-m", "m2f.cli", "export", "onnx", "--weights", str(checkpoint)]
    cmd += ["--output", str(partial), "--dynamic-shape", "--dynamic-batch"] + (
        ["--quantize", "int8"] if quantize else []
    )
    print(f"exporting {output.name} ...", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    partial.rename(output)
    return output


# ---------------------------------------------------------------------------------------------- servers
class NaiveServer:
    """``bench/naive_server.py`` under uvicorn on 127.0.0.1, ready once ``/healthz`` answers."""

    def __init__(self, checkpoint: Path):
        self.port = free_port()
        cmd = [sys.executable, "-m", "uvicorn", "naive_server:create_app", "--factory", "--app-dir", str(BENCH)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        env = {**os.environ, "M2F_NAIVE_MODEL": str(checkpoint), "TRANSFORMERS_VERBOSITY": "error"}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env)
        self.base = f"http://127.0.0.1:{self.port}"
        end = time.monotonic() + 300
        while time.monotonic() < end:
            try:
                r = httpx.get(self.base + "/healthz", timeout=2)
                if r.status_code == 200:
                    self.image_processor = r.json()["image_processor"]
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("naive server exited")
            time.sleep(0.2)
        self.stop()
        raise TimeoutError("naive server not ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def start(server: str, checkpoint: Path, models: dict[str, Path], before: Path | None) -> NaiveServer | Server:
    """``server``: a name of ``SERVERS``; ``name@before``: that ``m2f serve`` from the ``--before`` checkout."""
    if server == "naive":
        return NaiveServer(checkpoint)
    name, _, which = server.partition("@")
    if which == "before":  # its --max-batch-size 4 was the profile's limit, as the default is now
        return Server(str(models[name]), batch=4, delay_ms=5.0, source=before)
    return Server(str(models[name]), batch=None, delay_ms=5.0)  # m2f serve's default batching


# ---------------------------------------------------------------------------------------------- load
def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Runs of one (server, size, concurrency) pooled: img/s over all rounds, latency percentiles, segments."""
    latencies = [x for r in runs for x in r["latencies"]]
    segments = [x for r in runs for x in r["segments"]]
    row: dict[str, Any] = {
        "requests": len(latencies),
        "errors": sum(r["errors"] for r in runs),
        "refused": sum(r.get("refused", 0) for r in runs),
        "images_per_s": len(latencies) / sum(r["wall_s"] for r in runs),
        "images_per_s_by_round": [round(len(r["latencies"]) / r["wall_s"], 3) for r in runs],
        "mean_segments": float(np.mean(segments)) if segments else 0.0,
        "batching": runs[-1].get("batching"),  # m2f serve: chosen max batch, profile, mean batch run
    }
    row.update(
        percentiles(latencies)
        if latencies
        else {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    )
    return row


def compare_to_naive(rows: list[dict[str, Any]]) -> None:
    """Add ``ratio_vs_naive`` (img/s) and ``void`` (segment counts differ more than 2x) to every row."""
    naive = {(r["size"], r["concurrency"]): r for r in rows if r["server"] == "naive"}
    for r in rows:
        ref = naive.get((r["size"], r["concurrency"]))
        r["ratio_vs_naive"] = r["images_per_s"] / ref["images_per_s"] if ref and ref["images_per_s"] else None
        if ref is None:
            r["void"] = None
            continue
        a, b = r["mean_segments"], ref["mean_segments"]
        r["void"] = bool(a == 0 or b == 0 or max(a / b, b / a) > SEGMENT_RATIO_LIMIT)


def batching(proc: NaiveServer | Server, before: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``m2f serve``'s batching: the largest batch its start-up profile chose, the profile (seconds per pass by
    batch size), the serving check of that choice (``check``: the size in use, the pairs' ratios) and, given the
    state ``before`` a measurement, the mean batch it ran since. None for naive."""
    if not isinstance(proc, Server):
        return None
    info = httpx.get(proc.base + "/v1/model", timeout=30).json()["batching"]
    total, count = proc.batch_sizes()
    out = {
        "max_batch_size": info["max_batch_size"],
        "profile_s": info["profile_s"],
        "cpu_work_between_passes": info.get("cpu_work_between_passes"),
        "sum": total,
        "count": count,
    }
    if before is not None:
        done = count - before["count"]
        out["mean_batch"] = (total - before["sum"]) / done if done else None
    return out


def run_points(args: argparse.Namespace, checkpoint: Path, models: dict[str, Path]) -> tuple[list[dict[str, Any]], str]:
    """Every (round, size, concurrency) point, the servers taking turns in a rotated order. Returns the rows and
    the naive server's image processor class."""
    params = {
        "task": args.task,
        "threshold": args.threshold,
        "overlap_mask_area_threshold": args.overlap_mask_area_threshold,
    }
    inputs = {size: photos(size) for size in args.sizes}

    def load(base: str, data: list[bytes], c: int, seconds: float, params: dict[str, Any]) -> dict[str, Any]:
        if args.in_process_clients:
            return closed_loop(base, data, c, seconds, params)
        return closed_loop_elsewhere(base, data, c, seconds, params, nice=args.clients_nice)

    runs: dict[tuple[str, tuple[int, int], int], list[dict[str, Any]]] = {}
    points = [(size, c) for size in args.sizes for c in args.concurrency]
    k, image_processor = 0, ""
    for rnd in range(args.rounds):
        for size, c in points:
            order = args.servers[k % len(args.servers) :] + args.servers[: k % len(args.servers)]
            k += 1
            for server in order:
                t0 = time.perf_counter()
                proc = start(server, checkpoint, models, args.before)
                image_processor = getattr(proc, "image_processor", image_processor)
                try:
                    load(proc.base, inputs[size], c, args.warmup_seconds, params)
                    before = batching(proc)
                    run = load(proc.base, inputs[size], c, args.seconds, params)
                    run["batching"] = batching(proc, before)
                finally:
                    proc.stop()
                runs.setdefault((server, size, c), []).append(run)
                n = len(run["latencies"])
                print(
                    f"round {rnd + 1} {size[0]}x{size[1]} c={c} {server:14s} {n / run['wall_s']:6.2f} img/s "
                    f"({n} ok, {run['errors']} errors, {run['refused']} refused, {np.mean(run['segments']) if n else 0:.1f} segments/img; "
                    f"{time.perf_counter() - t0:.0f}s with start and stop)",
                    flush=True,
                )
    rows = []
    for (server, size, c), rs in runs.items():
        rows.append({"server": server, "size": f"{size[0]}x{size[1]}", "concurrency": c, **summarize(rs)})
    rows.sort(
        key=lambda r: (args.sizes.index(parse_size(r["size"])), r["concurrency"], args.servers.index(r["server"]))
    )
    compare_to_naive(rows)
    return rows, image_processor


# ---------------------------------------------------------------------------------------------- report
def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| server | photo size | clients | img/s | p50 ms | p99 ms | errors | 503 then retried | segments/img "
        "| batch (max / mean) | x naive |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = "" if r["ratio_vs_naive"] is None else f"{r['ratio_vs_naive']:.2f}x"
        if r["void"]:
            ratio += " (void: segment counts differ)"
        b = r.get("batching")
        batch = f"{b['max_batch_size']} / {b['mean_batch']:.2f}" if b and b.get("mean_batch") else "-"
        lines.append(
            f"| {r['server']} | {r['size']} | {r['concurrency']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['errors']} | {r['refused']} | {r['mean_segments']:.1f} | {batch} | {ratio} |"
        )
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import fastapi  # lazy: fastapi, only its version (the servers run in subprocesses)
    import onnxruntime  # lazy: onnxruntime, only its version
    import uvicorn  # lazy: uvicorn, only its version

    return {"onnxruntime": onnxruntime.__version__, "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workdir", type=Path, default=REPO / "out" / "service_vs_naive", help="checkpoint and exports (kept)"
    )
    p.add_argument(
        "--sizes", type=parse_size, nargs="+", help="photo sizes WxH (default 640x480 1333x800; tiny 160x160)"
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="closed-loop clients (default 1 8)")
    p.add_argument("--seconds", type=float, help="measured seconds per point and server (default 20; tiny 2)")
    p.add_argument("--warmup-seconds", type=float, help="load before each measurement, not counted (default 3; tiny 1)")
    p.add_argument("--rounds", type=int, default=1, help="passes over all points; results pooled (default 1)")
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument(
        "--before",
        type=Path,
        help="another checkout: each m2f server also runs from there (rows named server@before), side by side",
    )
    p.add_argument("--task", choices=("panoptic", "instance"), default="panoptic")
    p.add_argument("--threshold", type=float, default=0.8, help="score threshold, both servers (default 0.8)")
    p.add_argument("--overlap-mask-area-threshold", type=float, default=0.8, help="both servers (default 0.8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--threads", type=int, help="intra-op threads of every server (default: each one's own, the usable cores)"
    )
    p.add_argument(
        "--clients-nice", type=int, default=19, help="niceness added to the clients' child process (default 19)"
    )
    p.add_argument("--in-process-clients", action="store_true", help="clients as threads of this process instead")
    p.add_argument("--prepare", action="store_true", help="only build the checkpoint and the exports, then exit")
    p.add_argument("--tiny", action="store_true", help="smoke test: a tiny random model, 160x160 photos, 2 s per point")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    args.sizes = args.sizes or ([(160, 160)] if args.tiny else [(640, 480), (1333, 800)])
    args.seconds = args.seconds if args.seconds is not None else (2.0 if args.tiny else 20.0)
    args.warmup_seconds = args.warmup_seconds if args.warmup_seconds is not None else (1.0 if args.tiny else 3.0)
    if args.rounds < 1 or min(args.concurrency) < 1 or args.seconds <= 0:
        p.error("--rounds, --concurrency and --seconds must be positive")
    args.models = [s for s in args.servers if s != "naive"]
    if args.before:  # naive once, each m2f server from both checkouts
        args.servers += [f"{s}@before" for s in args.servers if s != "naive"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info(args.threads or torch.get_num_threads()) | versions()
    print(
        f"machine: {info['cpu']}; {info['cores']} cores ({info['cores_usable']} usable); torch {info['torch']}, "
        f"transformers {info['transformers']}, onnxruntime {info['onnxruntime']}; {info['date']}",
        flush=True,
    )
    setting = tiny_setting() if args.tiny else full_setting()
    work = checkpoint_folder(args.workdir, setting, args.seed)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("M2F_CACHE_DIR", str(args.workdir / "ort-cache"))  # faster restarts of m2f serve (ORT)
    if args.threads:  # read by m2f serve (M2F_THREADS) and by torch in the naive server (OMP_NUM_THREADS)
        os.environ.update(M2F_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    checkpoint = build_checkpoint(setting, work / "checkpoint", args.seed)
    models: dict[str, Path] = {"m2f-torch": checkpoint}
    if "m2f-onnx-fp32" in args.models:
        models["m2f-onnx-fp32"] = export(checkpoint, work / "fp32.onnx", quantize=False)
    if "m2f-onnx-int8" in args.models:
        models["m2f-onnx-int8"] = export(checkpoint, work / "int8.onnx", quantize=True)
    if args.prepare:
        print(f"prepared: {', '.join(str(m) for m in models.values())}")
        return 0
    points = len(args.sizes) * len(args.concurrency) * args.rounds
    print(
        f"model: {setting.name}, shaped random weights (seed {args.seed}), "
        f"resize {setting.shortest_edge}/{setting.longest_edge}; "
        f"task {args.task}, threshold {args.threshold}, overlap {args.overlap_mask_area_threshold}; "
        f"{points} points x {len(args.servers)} servers x ({args.warmup_seconds:g} + {args.seconds:g} s + start/stop)",
        flush=True,
    )
    rows, image_processor = run_points(args, checkpoint, models)
    print()
    print(markdown_table(rows))
    limit = SEGMENT_RATIO_LIMIT
    print(f"x naive: img/s over the naive server's at the same point; void: mean segments differ > {limit:g}x")
    if args.json:
        report = {
            "benchmark": "service_vs_naive",
            "date": str(datetime.date.today()),
            "machine": info,
            "model": {
                "setting": setting.name,
                "seed": args.seed,
                "resize": [setting.shortest_edge, setting.longest_edge],
                "decoder_update_scale": DECODER_UPDATE_SCALE,
                "class_scale": CLASS_SCALE,
            },
            "args": {k: v for k, v in vars(args).items() if not isinstance(v, Path)},  # no local paths
            "photos": list(PHOTOS),
            "naive_image_processor": image_processor,
            "results": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
