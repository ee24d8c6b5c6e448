"""The ``m2f`` command line: ``predict``, ``synth`` (synthetic dataset), ``eval`` (PQ / AP / mIoU), ``export onnx``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

TASKS = ("panoptic", "instance", "semantic")


def segment_image(
    model,
    image,
    task: str,
    threshold: float | None = None,
    overlap_mask_area_threshold: float | None = None,
    max_instances: int = 100,
) -> dict[str, Any]:
    """Run one PIL image through preprocessing, the model and ``task`` post-processing; a JSON-ready dict."""
    import numpy as np

    from mask2former import postprocess
    from mask2former.evaluate import run_model
    from mask2former.processing import preprocess
    from service import encoding

    cfg = model.config
    t0 = time.perf_counter()
    batch = preprocess([image], cfg.preprocess)
    t1 = time.perf_counter()
    class_logits, mask_logits = run_model(model, batch.pixel_values)
    t2 = time.perf_counter()
    args = (class_logits, mask_logits, batch.resized_sizes, batch.original_sizes)
    if task == "panoptic":
        result = postprocess.panoptic_segmentation(
            *args,
            thing_ids=cfg.thing_ids,
            threshold=cfg.threshold if threshold is None else threshold,
            mask_threshold=cfg.mask_threshold,
            overlap_mask_area_threshold=(
                cfg.overlap_mask_area_threshold if overlap_mask_area_threshold is None else overlap_mask_area_threshold
            ),
        )[0]
        segments = encoding.panoptic_records(
            result.segmentation.cpu().numpy(), result.segments, cfg.id2label, cfg.thing_ids
        )
    elif task == "instance":
        result = postprocess.instance_segmentation(
            *args, threshold=0.0 if threshold is None else threshold, max_instances=max_instances
        )[0]
        segments = encoding.instance_records(
            result.masks.cpu().numpy(),
            result.labels.cpu().numpy(),
            result.scores.cpu().numpy(),
            cfg.id2label,
            cfg.thing_ids,
        )
    elif task == "semantic":
        label_map = postprocess.semantic_segmentation(*args)[0].cpu().numpy().astype(np.int64)
        segments = encoding.semantic_records(label_map, cfg.id2label, cfg.thing_ids)
    else:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    t3 = time.perf_counter()
    height, width = batch.original_sizes[0]
    return {
        "width": width,
        "height": height,
        "task": task,
        "model": cfg.name,
        "segments": segments,
        "timings": {"preprocess_s": t1 - t0, "inference_s": t2 - t1, "postprocess_s": t3 - t2},
    }


def _predict(args: argparse.Namespace) -> int:
    from mask2former import load_model
    from mask2former.processing import load_image
    from mask2former.visualize import draw_overlay

    image = load_image(args.image)
    model = load_model(args.weights, device=args.device)
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
    p = sub.add_parser("predict", help="segment one image and write the JSON result")
    p.add_argument("image", type=Path, help="image file (JPEG, PNG, WebP, BMP, TIFF, ...)")
    p.add_argument("--weights", type=Path, help="HF checkpoint folder (config.json + weights); default: the demo model")
    p.add_argument("--task", choices=TASKS, default="panoptic")
    p.add_argument("--output", "-o", type=Path, help="write the JSON here (default: standard output)")
    p.add_argument("--overlay", type=Path, help="also write a PNG of the segments drawn over the image")
    p.add_argument("--threshold", type=float, help="score threshold (default: 0.8 panoptic, 0.0 instance)")
    p.add_argument("--overlap-mask-area-threshold", type=float, help="panoptic: min visible/own mask area (0.8)")
    p.add_argument("--max-instances", type=int, default=100, help="instance: top-k (query, class) pairs")
    p.add_argument("--shortest-edge", type=int, help="override the checkpoint's resize setting")
    p.add_argument("--longest-edge", type=int, help="override the checkpoint's resize cap (0: none)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.set_defaults(run=_predict)

    p = sub.add_parser("synth", help="write a deterministic synthetic panoptic dataset (COCO formats)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, default=(160, 160), metavar=("H", "W"), help="image size")
    p.set_defaults(run=_synth)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a dataset written by `m2f synth` (or COCO-style)")
    p.add_argument("--weights", type=Path, help="HF checkpoint folder; default: the demo model")
    p.add_argument("--data", type=Path, required=True, help="dataset folder")
    p.add_argument("--task", choices=TASKS, default="panoptic")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, help="evaluate the first N images only")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    p.add_argument("--device", default="cpu")
    p.add_argument("--onnx", type=Path, help="evaluate this exported .onnx file in ONNX Runtime instead of --weights")
    p.set_defaults(run=_eval)

    from model_export.cli import add_export_parser

    add_export_parser(sub)
    return parser


def _synth(args: argparse.Namespace) -> int:
    from mask2former import synth

    return synth.run(args)


def _eval(args: argparse.Namespace) -> int:
    from mask2former import evaluate

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
