"""Post-processing as a share of inference on the service's path: ``pipeline.steps.answer`` (post-processing and
COCO RLE encoding of one image) against the runner's forward pass on the same image.

    pip install scikit-image          # the photos (a bench-only dependency)
    python bench/postprocess_share.py --json bench/results/postprocess_share.json   # 2 sizes x 6 photos x 3 repeats
    python bench/postprocess_share.py --tiny                                        # a smoke run: a tiny model, 160x160

Same checkpoint (swin-tiny COCO-panoptic, shaped random weights, resize 384/640, built under ``--workdir`` as
by ``bench/service_vs_naive.py``), photos (scikit-image samples at each ``--sizes``, JPEG) and thresholds as that
benchmark. Each photo is decoded and prepared once; then, ``--repeats`` times over the photos, the runner runs
the image alone (batch 1) and ``steps.answer`` turns its logits into the JSON answer for each ``--tasks``.
For context, the same logits also go through ``transformers``' post-processing plus pycocotools RLE (what
``bench/naive_server.py`` does; ``transformers`` is a development dependency). Reported per (size, task):
forward and post-processing ms (median, p10-p90), post-processing / forward (the median of the per-image
ratios, p10-p90) and the mean segments per image of both post-processings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    build_checkpoint,
    checkpoint_folder,
    full_setting,
    hf_postprocess,
    machine_info,
    parse_size,
    photos,
    segments_json,
    tiny_setting,
)
from pipeline import steps  # noqa: E402
from pipeline.config import Mask2FormerConfig  # noqa: E402
from runtimes import Runner, open_runner  # noqa: E402


def spread(values: list[float]) -> dict[str, float]:
    """Median and p10/p90."""
    q = np.percentile(np.asarray(values), [50, 10, 90])
    return {"median": float(q[0]), "p10": float(q[1]), "p90": float(q[2])}


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def hf_answer(
    processor: Any,
    logits: tuple[np.ndarray, np.ndarray],
    prepared: steps.Prepared,
    task: str,
    args: argparse.Namespace,
    cfg: Mask2FormerConfig,
) -> int:
    """``transformers``' post-processing and RLE of one image's logits; returns the segment count."""
    import torch  # lazy: torch, for transformers' post-processing only (the runner may be ONNX Runtime)

    outputs = SimpleNamespace(
        class_queries_logits=torch.from_numpy(logits[0][None]), masks_queries_logits=torch.from_numpy(logits[1][None])
    )
    # HF resizes the (unpadded) logits straight to the target size: crop the padding as its processor's
    # input has none (it rounds the resize to the size divisor instead of padding).
    h, w = prepared.resized_size
    stride = cfg.common_stride
    outputs.masks_queries_logits = outputs.masks_queries_logits[..., : -(-h // stride), : -(-w // stride)]
    stuff = set(cfg.id2label) - set(cfg.thing_ids)
    seg, info = hf_postprocess(
        processor, outputs, prepared.original_size, task, args.threshold, args.overlap_mask_area_threshold, stuff
    )
    return len(segments_json(task, seg, info, cfg.id2label))


def measure_size(runner: Runner, processor: Any, data: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    """Forward and post-processing times of every photo at one size, ``args.repeats`` times."""
    cfg = runner.config
    prepared = [steps.prepare(steps.decode(d), cfg, runner.input.size) for d in data]
    runner.run(prepared[0].pixels[None])  # warm-up at this size
    forward: list[float] = []
    per_task = {t: {"post": [], "share": [], "segments": [], "hf_post": [], "hf_segments": []} for t in args.tasks}
    for _ in range(args.repeats):
        for p in prepared:
            (class_logits, mask_logits), fwd = timed(runner.run, p.pixels[None])
            forward.append(fwd)
            for task in args.tasks:
                body, post = timed(
                    steps.answer,
                    task,
                    cfg,
                    p,
                    class_logits[0],
                    mask_logits[0],
                    threshold=args.threshold,
                    overlap_mask_area_threshold=args.overlap_mask_area_threshold,
                )
                m = per_task[task]
                m["post"].append(post)
                m["share"].append(post / fwd)
                m["segments"].append(len(body["segments"]))
                if processor is not None:
                    n, hf = timed(hf_answer, processor, (class_logits[0], mask_logits[0]), p, task, args, cfg)
                    m["hf_post"].append(hf)
                    m["hf_segments"].append(n)
    result: dict[str, Any] = {"forward_ms": spread([t * 1e3 for t in forward]), "images": len(forward)}
    for task, m in per_task.items():
        result[task] = {
            "postprocess_ms": spread([t * 1e3 for t in m["post"]]),
            "share": spread(m["share"]),
            "mean_segments": float(np.mean(m["segments"])),
        }
        if m["hf_post"]:
            result[task]["transformers_postprocess_ms"] = spread([t * 1e3 for t in m["hf_post"]])
            result[task]["transformers_mean_segments"] = float(np.mean(m["hf_segments"]))
    return result


def print_table(results: dict[str, dict[str, Any]], tasks: list[str]) -> None:
    print(
        "| photo size | task | forward ms (p10-p90) | answer ms (p10-p90) | answer / forward (p10-p90) | segments "
        "| transformers post ms | its segments |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size, r in results.items():
        f = r["forward_ms"]
        for task in tasks:
            t = r[task]
            p, s = t["postprocess_ms"], t["share"]
            hf = t.get("transformers_postprocess_ms")
            hf_text = f"{hf['median']:.1f} ({hf['p10']:.1f}-{hf['p90']:.1f})" if hf else "-"
            print(
                f"| {size} | {task} | {f['median']:.1f} ({f['p10']:.1f}-{f['p90']:.1f}) "
                f"| {p['median']:.1f} ({p['p10']:.1f}-{p['p90']:.1f}) "
                f"| {s['median']:.1%} ({s['p10']:.1%}-{s['p90']:.1%}) | {t['mean_segments']:.1f} "
                f"| {hf_text} | {t.get('transformers_mean_segments', float('nan')):.1f} |"
            )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parents[1] / "out" / "service_vs_naive")
    p.add_argument("--model", type=Path, help="checkpoint folder or .onnx instead of the built swin-tiny checkpoint")
    p.add_argument(
        "--sizes", type=parse_size, nargs="+", help="photo sizes WxH (default 640x480 1333x800; tiny 160x160)"
    )
    p.add_argument("--tasks", nargs="+", choices=("panoptic", "instance"), default=["panoptic", "instance"])
    p.add_argument("--threshold", type=float, default=0.8, help="score threshold (default 0.8, as service_vs_naive)")
    p.add_argument("--overlap-mask-area-threshold", type=float, default=0.8)
    p.add_argument("--repeats", type=int, default=3, help="passes over the photos (default 3)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the usable cores, as m2f serve)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-transformers", action="store_true", help="skip transformers' post-processing")
    p.add_argument("--tiny", action="store_true", help="smoke test: a tiny random model, 160x160 photos")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.sizes = args.sizes or ([(160, 160)] if args.tiny else [(640, 480), (1333, 800)])
    if args.repeats < 1:
        p.error("--repeats must be >= 1")

    setting = tiny_setting() if args.tiny else full_setting()
    model = args.model
    if model is None:
        work = checkpoint_folder(args.workdir, setting, args.seed)
        work.mkdir(parents=True, exist_ok=True)
        model = build_checkpoint(setting, work / "checkpoint", args.seed)
    name = model.name if args.model else model.parent.name  # the built checkpoint's folder says what it is
    runtime = "onnxruntime" if model.suffix == ".onnx" else "torch"
    runner = open_runner(model, runtime, threads=args.threads)
    runner.warmup()
    processor = None
    if not args.no_transformers:
        from transformers import Mask2FormerImageProcessor  # lazy: transformers (a development dependency)

        processor = Mask2FormerImageProcessor()  # post-processing reads none of its resize settings
    describe = runner.describe()
    info = machine_info(describe["threads"])
    print(
        f"machine: {info['cpu']}; {info['cores']} cores ({info['cores_usable']} usable); {info['date']}; {runtime}, "
        f"{describe['threads']} threads, {name}; threshold {args.threshold}, overlap "
        f"{args.overlap_mask_area_threshold}; {args.repeats} repeats",
        flush=True,
    )
    results = {}
    for size in args.sizes:
        key = f"{size[0]}x{size[1]}"
        results[key] = measure_size(runner, processor, photos(size), args)
        print(f"  {key}: forward median {results[key]['forward_ms']['median']:.1f} ms", flush=True)
    print()
    print_table(results, args.tasks)
    print("answer = pipeline.steps.answer (post-processing + COCO RLE); share = answer / forward per image")
    if args.json:
        report = {
            "benchmark": "postprocess_share",
            "model": name,
            "machine": info,
            "runner": {k: v for k, v in describe.items() if k not in ("path", "optimized_cache")},
            "args": {k: v for k, v in vars(args).items() if not isinstance(v, Path)},  # no local paths
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
