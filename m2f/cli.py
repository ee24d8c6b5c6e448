"""The ``m2f`` command line: ``predict``, ``synth`` (synthetic dataset), ``eval`` (PQ / AP / mIoU), ``export onnx``,
``serve`` (the HTTP service), ``convert`` (a detectron2 checkpoint to an HF-format folder), ``batch`` (bulk
segmentation on Ray Data)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from m2f import bulk, eval_report, evaluate, synth
from m2f.evaluate import run_model
from m2f.visualize import draw_overlay
from model_export.cli import add_export_parser
from pipeline import steps
from pipeline.config import ResNetConfig
from pipeline.postprocess import TASKS
from pipeline.processing import load_image


def segment_image(
    model,
    image,
    task: str,
    threshold: float | None = None,
    overlap_mask_area_threshold: float | None = None,
    max_instances: int = 100,
) -> dict[str, Any]:
    """Run one PIL image through preprocessing, the model and ``task`` post-processing; a JSON-ready dict.

    ``model`` is a PyTorch model or a runner (:mod:`runtimes`); the steps are the service's
    (:mod:`pipeline.steps`), so ``m2f predict`` answers what ``POST /v1/segment`` answers.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    cfg = model.config
    t0 = time.perf_counter()
    prepared = steps.prepare(image, cfg)
    t1 = time.perf_counter()
    class_logits, mask_logits = run_model(model, prepared.pixels[None])
    t2 = time.perf_counter()
    answer = steps.answer(
        task,
        cfg,
        prepared,
        class_logits[0],
        mask_logits[0],
        threshold=threshold,
        overlap_mask_area_threshold=overlap_mask_area_threshold,
        max_instances=max_instances,
    )
    t3 = time.perf_counter()
    del answer["png"]
    return {
        **answer,
        "timings": {"preprocess_s": t1 - t0, "inference_s": t2 - t1, "postprocess_s": t3 - t2},
    }


def _add_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="segment one image and write the JSON result")
    p.add_argument("image", type=Path, help="image file (JPEG, PNG, WebP, BMP, TIFF, ...)")
    p.add_argument(
        "--weights", type=Path, help="HF checkpoint folder or detectron2 .pkl/.pth file; default: the demo model"
    )
    p.add_argument("--labels", help=LABELS_HELP)
    p.add_argument("--task", choices=TASKS, default="panoptic")
    p.add_argument("--output", "-o", type=Path, help="write the JSON here (default: standard output)")
    p.add_argument("--overlay", type=Path, help="also write a PNG of the segments drawn over the image")
    p.add_argument(
        "--threshold", type=float, help="score threshold (default: the checkpoint's panoptic one; instance: none)"
    )
    p.add_argument("--overlap-mask-area-threshold", type=float, help="panoptic: min visible/own mask area (0.8)")
    p.add_argument("--max-instances", type=int, default=100, help="instance: top-k (query, class) pairs")
    p.add_argument("--shortest-edge", type=int, help="override the checkpoint's resize setting")
    p.add_argument("--longest-edge", type=int, help="override the checkpoint's resize cap (0: none)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.set_defaults(run=_predict)


def _predict(args: argparse.Namespace) -> int:
    from mask2former import load_model  # lazy: torch

    try:
        image = load_image(args.image)
    except OSError as e:  # PIL.UnidentifiedImageError and truncated files are OSErrors; name the file
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{args.image}: cannot read it as an image ({type(e).__name__})") from None
    model = load_model(args.weights, device=args.device, labels=args.labels)
    if args.shortest_edge is not None:
        model.config = model.config.with_preprocess(shortest_edge=args.shortest_edge)
    if args.longest_edge is not None:
        model.config = model.config.with_preprocess(longest_edge=args.longest_edge)
    result = segment_image(
        model, image, args.task, args.threshold, args.overlap_mask_area_threshold, args.max_instances
    )
    text = json.dumps(result)
    if args.output:
        args.output.write_text(text + "\n")
    else:
        print(text)
    if args.overlay:
        draw_overlay(image, result["segments"]).save(args.overlay)
    n = len(result["segments"])
    print(f"{args.task}: {n} segment(s) in {sum(result['timings'].values()):.2f}s", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2f", description="Mask2Former: predict, export and serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_predict, _add_synth, _add_eval, _add_batch, _add_serve, _add_convert):
        add(sub)
    add_export_parser(sub)
    return parser


LABELS_HELP = (
    "class names, thing ids and test-time resize: a label set (coco-panoptic, coco-instance, ade20k-semantic, ade20k-semantic-640, "
    "ade20k-panoptic, ade20k-instance, cityscapes-semantic, cityscapes-panoptic, cityscapes-instance, "
    "mapillary-vistas-semantic, mapillary-vistas-panoptic) or a labels .json file; for a detectron2 file the "
    "default is the set its class count implies"
)


def _add_convert(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a detectron2 checkpoint (.pkl / .pth) to an HF-format folder",
        description="Read a detectron2 Mask2Former checkpoint (model_final.pth or a model-zoo .pkl), derive the "
        "architecture from its tensors, and write an HF-format folder (config.json with thing_ids, "
        "preprocessor_config.json, model.safetensors) that predict, eval, export and serve take.",
    )
    p.add_argument("source", type=Path, help="the detectron2 checkpoint file")
    p.add_argument("--output", "-o", type=Path, required=True, help="the folder to write")
    p.add_argument("--labels", help=LABELS_HELP)
    p.set_defaults(run=_convert)


def _convert(args: argparse.Namespace) -> int:
    from mask2former.detectron2 import read_detectron2, write_hf_checkpoint  # lazy: torch
    from mask2former.weights import build_model  # lazy: torch

    if not args.source.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {args.source}")
    cfg, hf_state, names = read_detectron2(args.source, args.labels)
    build_model(cfg, hf_state, names)  # every tensor has its place (else CheckpointMismatch) before writing
    write_hf_checkpoint(cfg, hf_state, args.output)
    bb = cfg.backbone
    backbone = (
        f"ResNet (depths {list(bb.depths)})"
        if isinstance(bb, ResNetConfig)
        else f"Swin (embed {bb.embed_dim}, depths {list(bb.depths)}, window {bb.window_size})"
    )
    things = len(cfg.thing_ids)
    print(
        f"wrote {args.output}: {backbone}, {cfg.num_labels} classes ({things} things), {cfg.num_queries} queries, "
        f"{cfg.decoder_layers} decoder layers; resize {cfg.preprocess.shortest_edge}/{cfg.preprocess.longest_edge}"
    )
    return 0


def _add_synth(sub: Any) -> None:
    p = sub.add_parser("synth", help="write a deterministic synthetic panoptic dataset (COCO formats)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, default=(160, 160), metavar=("H", "W"), help="image size")
    p.set_defaults(run=_synth)


def _synth(args: argparse.Namespace) -> int:
    return synth.run(args)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="start the HTTP segmentation service",
        description="Start the HTTP service. Every option can also be set as an environment variable "
        "(M2F_MODEL, M2F_PORT, M2F_MAX_BATCH_SIZE, ...); options given here win.",
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]PATH",
        help="HF checkpoint folder, detectron2 .pkl/.pth file or .onnx file (default: the demo model); repeatable "
        "as NAME=PATH to serve several by name (the first is the default), or a model repository folder",
    )
    p.add_argument("--device", help="torch device (cpu, cuda, ...)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the usable cores)")
    p.add_argument(
        "--max-batch-size",
        type=int,
        help="images per forward pass at most (default: up to 4, as a start-up profile finds it pays)",
    )
    p.add_argument("--max-batch-delay-ms", type=float, help="how long an image may wait for a batch to fill (5)")
    p.add_argument("--request-timeout-s", type=float, help="one deadline per request; 504 past it (30)")
    p.add_argument("--memory-mb", type=int, help="memory the requests in progress may hold, estimated (2048)")
    p.add_argument("--cache-dir", type=Path, help="ONNX Runtime optimized-graph cache folder")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--log-format", choices=("text", "json"), help="json: one JSON object per log line (text)")
    p.add_argument(
        "--keys-file",
        type=Path,
        help='API keys, JSON {"segment": [...], "admin": [...]}: segment keys close the segment routes to requests '
        "without one; admin keys turn on the routes that load and unload models",
    )
    p.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError  # lazy: pydantic (the serve extra)

    from service.server import serve  # lazy: fastapi, uvicorn (the serve extra)
    from service.settings import Settings  # lazy: pydantic-settings (the serve extra)

    names = ("device", "host", "port", "threads", "max_batch_size", "max_batch_delay_ms", "request_timeout_s")
    names += ("memory_mb", "cache_dir", "log_level", "log_format", "keys_file")
    given = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.model:
        given["model"] = ",".join(args.model)
    try:
        settings = Settings(**given)
    except ValidationError as e:
        raise ValueError(f"invalid settings: {e}") from None
    return serve(settings)


def _add_batch(sub: Any) -> None:
    p = sub.add_parser(
        "batch",
        help="segment a folder, glob or manifest of images with Ray Data (resumable, sharded COCO or Parquet)",
        description="Segment every image of INPUT on Ray Data: a local Ray started here, or the cluster at --address. "
        "Writes sharded COCO results (panoptic: JSON + PNGs) or Parquet, errors.jsonl and _SUCCESS; running the "
        "same command again skips finished shards.",
    )
    p.add_argument("input", help="a folder (recursive), a glob ('imgs/**/*.jpg') or a manifest (.txt/.csv/.parquet)")
    p.add_argument("--output", "-o", required=True, help="output folder (local path or URI, e.g. s3://bucket/out)")
    p.add_argument("--model", type=Path, help="HF checkpoint folder, detectron2 file or .onnx file (default: demo)")
    p.add_argument("--runtime", choices=("auto", "torch", "onnxruntime"), default="auto")
    p.add_argument("--device", default="cpu", help="cpu or cuda (one inference actor per GPU)")
    p.add_argument("--task", choices=TASKS, help="default: the model's (panoptic with things and stuff)")
    p.add_argument("--format", choices=("coco", "parquet"), default="coco")
    p.add_argument("--address", help="Ray cluster address (ray://host:10001 or auto); default: a local Ray")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per output shard (1000)")
    p.add_argument(
        "--batch-size",
        type=int,
        help="images per forward pass (default: on CPU each actor times 1, 2, 4, 8 and keeps the largest that raises images/s; 8 on GPU)",
    )
    p.add_argument("--actors", type=int, help="inference actors (default: one per GPU, or per 8 cores of a node)")
    p.add_argument("--threads", type=int, help="intra-op threads per actor (default: node cores / actors - 1)")
    p.add_argument("--bucket-px", type=int, default=128, help="batch images whose padded sizes round to the same")
    p.add_argument("--threshold", type=float, help="score threshold (default: the model's; instance: 0)")
    p.add_argument("--overlap-mask-area-threshold", type=float, help="panoptic: min visible/own mask area")
    p.add_argument("--max-instances", type=int, default=100, help="instance: top-k (query, class) pairs")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="larger images are errors (header check)")
    p.add_argument("--max-shards", type=int, help="stop after this many new shards (run again to continue)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=_batch)


def _batch(args: argparse.Namespace) -> int:
    return bulk.run(args)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a dataset written by `m2f synth` (or COCO-style)")
    p.add_argument(
        "--weights", type=Path, help="HF checkpoint folder or detectron2 .pkl/.pth file; default: the demo model"
    )
    p.add_argument("--labels", help=LABELS_HELP)
    p.add_argument("--data", type=Path, required=True, help="dataset folder (m2f synth's layout, or COCO's)")
    p.add_argument("--split", help="the split of a COCO-layout folder (val2017, ...) when it holds several")
    p.add_argument(
        "--task", choices=TASKS, help="default: panoptic; with --model/--report: every task the data has labels for"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, help="evaluate the first N images only")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    p.add_argument(
        "--model",
        action="append",
        metavar="[LABEL=]PATH[@DEVICE]",
        help="repeatable: compare backends (HF folder or detectron2 file in PyTorch, .onnx file fp32/fp16/int8 in ONNX "
        "Runtime) on the same images, the first being the reference",
    )
    p.add_argument("--report", type=Path, metavar="DIR", help="write report.json and report.html (with pictures) here")
    p.add_argument("--worst", type=int, default=8, help="images listed per ranking in the report (8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--onnx", type=Path, help="evaluate this exported .onnx file in ONNX Runtime instead of --weights")
    p.add_argument("--predictions", help="score a finished `m2f batch` output (folder or URI) instead of a model")
    p.set_defaults(run=_eval)


def _eval(args: argparse.Namespace) -> int:
    if args.model or args.report is not None:
        if getattr(args, "predictions", None) is not None:
            raise ValueError("--predictions scores a finished job; leave out --model and --report")
        if args.model and (args.weights or args.onnx):
            raise ValueError("give every backend as --model (--weights/--onnx evaluate one model)")
        return eval_report.run(args)
    if args.task is None and getattr(args, "predictions", None) is None:
        args.task = "panoptic"
    return evaluate.run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, OSError) as e:  # CheckpointMismatch is a ValueError
        print(f"m2f {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
