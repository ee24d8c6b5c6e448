"""``m2f eval --model A --model B ... [--report DIR]``: several backends over the same images, side by side.

Every backend (a PyTorch checkpoint through the service's torch runner, an ``.onnx`` file float32 / float16 /
int8 through its ONNX Runtime runner) runs over the same batches in one pass; each batch is scored with the
same scorers as ``m2f eval`` (:mod:`m2f.evaluate`), so a backend's PQ, mask AP and mIoU here are
those of a separate ``m2f eval`` run with the same batch size. Besides the scores the report says where the
backends differ and where they fail:

- per class: PQ / SQ / RQ, TP / FP / FN and semantic IoU per backend, sorted by the largest drop of PQ or IoU
  in any backend against the first (with one backend: the lowest PQ, or IoU, first);
- per image, each backend's panoptic output against the first's: segments *added*, *lost* or *relabelled*
  (segments of the two outputs match when their IoU is over 0.5, whatever their labels) and the fraction of
  pixels whose class differs; the images where anything differs, ranked by changed segments, then by that
  fraction;
- per image and backend, the quality against the ground truth (PQ of that image alone: the mean over the
  classes it holds; mIoU where the dataset has no panoptic ground truth) and the classes missed (FN) or
  invented (FP) there; the lowest first;
- timings per backend (one untimed warm-up run of the first batch, then inference and post-processing).

:func:`compare` returns the report as a JSON-ready dict (``SCHEMA``, stable keys) and the overlay pictures of
the listed images; :func:`run` writes ``report.json`` and ``report.html`` (:mod:`m2f.report_html`).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from m2f import metrics, report_html
from m2f.eval_data import DatasetLayout, find_layout
from m2f.eval_images import TopN, disagreement_key, image_quality, segment_changes, worst_key
from m2f.evaluate import MAX_INSTANCES, SCORERS, load_images, run_model
from m2f.report_html import share
from model_format.metadata import checkpoint_sha256, file_sha256
from pipeline import steps
from pipeline.processing import preprocess
from runtimes import open_runner

SCHEMA = "m2f-eval-report/1"
SUMMARY = {  # task -> (metric name, path into that task's metrics)
    "panoptic": [
        (f"{m}{suffix}", (split, m.lower()))
        for split, suffix in (("all", ""), ("things", "_th"), ("stuff", "_st"))
        for m in ("PQ", "SQ", "RQ")
    ],
    "instance": [(name, (name,)) for name in metrics.AP_NAMES],
    "semantic": [("mIoU", ("mIoU",)), ("pAcc", ("pixel_accuracy",)), ("mAcc", ("mean_accuracy",))],
}


# ---------------------------------------------------------------------------------------------- backends
@dataclass
class Backend:
    """One model to compare: a runner (:mod:`runtimes`) or, with ``--labels``, a PyTorch model."""

    label: str
    spec: str
    path: Path
    runtime: str  # "torch" | "onnxruntime"
    device: str
    precision: str  # "fp32" | "fp16" | "int8"
    model: Any
    info: dict[str, Any]
    load_s: float
    timing: dict[str, float] = field(default_factory=lambda: {"inference_s": 0.0, "postprocess_s": 0.0})

    @property
    def config(self):
        return self.model.config

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "spec": self.spec,
            "path": str(self.path),
            "runtime": self.runtime,
            "device": self.device,
            "precision": self.precision,
            "model": self.config.name,
            **self.info,
        }


def parse_spec(spec: str) -> tuple[str | None, Path, str | None]:
    """``[LABEL=]PATH[@DEVICE]`` -> (label, path, device); a path that exists as written is taken whole. DEVICE:
    cpu, cuda[:N], or openvino / openvino-bf16 (an .onnx file in OpenVINO on the CPU)."""
    label = device = None
    if not Path(spec).exists():
        head, sep, tail = spec.partition("=")
        if sep and head and "/" not in head:
            label, spec = head, tail
        m = re.fullmatch(r"(.+)@(cpu|cuda(?::\d+)?|openvino(?:-bf16)?)", spec)
        if m and not Path(spec).exists():
            spec, device = m.group(1), m.group(2)
    return label, Path(spec), device


def _checkpoint_hash(path: Path) -> dict[str, Any]:
    combined, files = checkpoint_sha256(path)
    return {"sha256": combined, "files": files}


def open_backend(spec: str, device: str = "cpu", labels: str | None = None, threads: int | None = None) -> Backend:
    """Load one ``--model``: an ``.onnx`` file runs in ONNX Runtime, anything else (HF folder, detectron2
    ``.pkl``/``.pth``) in PyTorch; ``labels`` (PyTorch only) as ``m2f eval --labels``."""
    label, path, spec_device = parse_spec(spec)
    device = spec_device or device
    if not path.exists():
        raise FileNotFoundError(f"--model {spec}: no such file or folder {path}")
    start = time.perf_counter()
    if path.suffix == ".onnx" and device.startswith("openvino"):  # PATH@openvino[-bf16]: the file in OpenVINO
        runner = open_runner(path, device, threads=threads)
        described = runner.describe()
        precision = "int8" if runner.metadata.quantization else described["precision"]
        info = {k: described[k] for k in ("sha256", "source_sha256", "quantization", "runtime", "precision")}
        runtime, device = "openvino", "cpu"
    elif path.suffix == ".onnx":
        runner = open_runner(path, "onnxruntime", device=device, threads=threads)
        meta = runner.metadata
        precision = "int8" if meta.quantization else ("fp16" if runner.input.dtype == np.float16 else "fp32")
        info = {
            "sha256": runner.sha256,
            "source_sha256": meta.source_sha256 or None,
            "quantization": meta.quantization or None,
            "int8_weights": runner.int8_weights or None,
            "providers": runner.session.get_providers(),
            "input_shape": list(runner.input.shape),
        }
        runtime = "onnxruntime"
    else:
        runtime, precision = "torch", "fp32"
        if labels is None:
            runner = open_runner(path, "torch", device=device, threads=threads)
        else:
            from mask2former import load_model  # lazy: torch

            runner = load_model(path, device=device, labels=labels)
        info = _checkpoint_hash(path)
    load_s = time.perf_counter() - start
    default = f"{runtime if runtime != 'onnxruntime' else 'onnx'}-{precision}" + (
        "" if device == "cpu" else f"@{device}"
    )
    return Backend(label or default, spec, path, runtime, device, precision, runner, info, load_s)


def _unique_labels(backends: list[Backend]) -> None:
    """Default labels that repeat get the file name; labels the user gave must differ."""
    seen: dict[str, int] = {}
    for b in backends:
        seen[b.label] = seen.get(b.label, 0) + 1
    for b in backends:
        if seen[b.label] > 1 and "=" not in b.spec:
            b.label = f"{b.label}:{b.path.name}"
    labels = [b.label for b in backends]
    if len(set(labels)) != len(labels):
        raise ValueError(f"backend labels repeat ({', '.join(labels)}): name them with --model LABEL=PATH")


def _check_same_labels(backends: list[Backend]) -> None:
    first = backends[0]
    for b in backends[1:]:
        if b.config.id2label != first.config.id2label or b.config.thing_ids != first.config.thing_ids:
            raise ValueError(f"{b.label} and {first.label} have different labels or things: not the same model")


# ---------------------------------------------------------------------------------------------- the pass
def _tasks(layout: DatasetLayout, task: str | None) -> list[str]:
    have = {
        "panoptic": layout.panoptic_json is not None,
        "instance": layout.instances_json is not None,
        "semantic": layout.semantic_dir is not None or layout.panoptic_json is not None,
    }
    if task is not None:
        if not have[task]:
            raise FileNotFoundError(f"{layout.root} has no {task} ground truth")
        return [task]
    tasks = [t for t in ("panoptic", "instance", "semantic") if have[t]]
    if not tasks:
        raise FileNotFoundError(f"{layout.root} has no ground truth (panoptic, instances or semantic)")
    return tasks


def compare(
    backends: list[Backend],
    data_dir: str | Path,
    task: str | None = None,
    batch_size: int = 4,
    limit: int | None = None,
    worst: int = 8,
    split: str | None = None,
    progress: bool = True,
    command: str | None = None,
) -> tuple[dict[str, Any], dict[int, dict[str, bytes]]]:
    """Run every backend over the dataset, batch by batch, and build the report.

    Args:
        backends: from :func:`open_backend`; the first is the reference the others are compared with.
        data_dir: a dataset folder (:func:`~m2f.eval_data.find_layout`).
        task: score only this task (default: every task the dataset has ground truth for).
        worst: how many images each ranking lists (with pictures).

    Returns:
        (the report, JSON-ready; {image id: {"image" | "gt" | backend label: JPEG overlay}} for listed images).
    """
    if not backends:
        raise ValueError("no backend to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    _unique_labels(backends)
    _check_same_labels(backends)
    layout = find_layout(data_dir, split)
    tasks = _tasks(layout, task)
    cfg = backends[0].config
    names = dict(cfg.id2label)
    scorers = {b.label: {t: SCORERS[t](layout, b.config) for t in tasks} for b in backends}
    ref = scorers[backends[0].label]
    images = ref[tasks[0]].images[:limit] if limit is not None else ref[tasks[0]].images
    if not images:
        raise ValueError(f"no images to evaluate in {layout.root}")
    for by_task in scorers.values():
        for s in by_task.values():
            s.images = images
    quality_task = next((t for t in ("panoptic", "semantic") if t in tasks), None)
    colours = report_html.class_colours(cfg, ref["panoptic"].categories if "panoptic" in tasks else None)

    rows: list[dict[str, Any]] = []
    rankings = {"disagreement": TopN(worst if len(backends) > 1 else 0)}
    rankings.update({f"worst:{b.label}": TopN(worst if quality_task else 0) for b in backends})
    pictures: dict[int, dict[str, bytes]] = {}
    desc = "eval " + " vs ".join(b.label for b in backends)
    with tqdm(total=len(images), desc=desc, unit="img", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pil_images = load_images(layout, chunk)
            gts = {t: [ref[t].ground_truth(im) for im in chunk] for t in tasks if t != "instance"}
            prepared: dict[Any, Any] = {}  # preprocessing config -> batch: once per distinct config
            outputs = {
                b.label: _run_backend(b, pil_images, chunk, tasks, scorers[b.label], gts, prepared, start == 0)
                for b in backends
            }
            for k, im in enumerate(chunk):
                row = _image_row(start + k, im, backends, outputs, k, quality_task, ref, gts, names)
                rows.append(row)
                keys = {"disagreement": disagreement_key(row)}
                keys.update({f"worst:{b.label}": worst_key(row, b.label) for b in backends})
                if _rank(rankings, keys, row["image_id"], pictures):
                    gt = next((gts[t][k] for t in ("panoptic", "semantic") if t in gts), None)
                    panels = {lab: out["panoptic"][k] for lab, out in outputs.items()}
                    pictures[row["image_id"]] = report_html.draw_panels(pil_images[k], gt, panels, colours)
            bar.update(len(chunk))

    report = _assemble(backends, layout, tasks, images, rows, scorers, worst, batch_size, limit, command, colours)
    keep = {r["image_id"] for r in report["disagreement"]}
    keep |= {r["image_id"] for lst in report["worst"].values() for r in lst}
    return report, {i: p for i, p in pictures.items() if i in keep}


def _run_backend(b: Backend, pil_images, chunk, tasks, scorers, gts, prepared, warm_up: bool) -> dict[str, list]:
    """One batch through one backend: every task's results (panoptic always), each scored; timings added."""
    cfg = b.config
    if cfg.preprocess not in prepared:
        prepared[cfg.preprocess] = preprocess(pil_images, cfg.preprocess)
    batch = prepared[cfg.preprocess]
    if warm_up:
        run_model(b.model, batch.pixel_values)
    t0 = time.perf_counter()
    class_logits, mask_logits = run_model(b.model, batch.pixel_values)
    t1 = time.perf_counter()
    args = (cfg, class_logits, mask_logits, batch.resized_sizes, batch.original_sizes)
    results = {"panoptic": steps.postprocess("panoptic", *args)}
    for t in tasks:
        if t != "panoptic":
            results[t] = steps.postprocess(t, *args, **({"max_instances": MAX_INSTANCES} if t == "instance" else {}))
    b.timing["inference_s"] += t1 - t0
    b.timing["postprocess_s"] += time.perf_counter() - t1  # every task's post-processing, not the scoring
    for t in tasks:
        for k, im in enumerate(chunk):
            scorers[t].add(im, results[t][k], gts[t][k] if t in gts else None)
    return results


def _image_row(index, im, backends, outputs, k, quality_task, ref, gts, names) -> dict[str, Any]:
    first = outputs[backends[0].label]["panoptic"][k]
    row: dict[str, Any] = {"index": index, "image_id": im.id, "file_name": im.file_name}
    row["disagreement"] = {
        b.label: segment_changes(first, outputs[b.label]["panoptic"][k], names) for b in backends[1:]
    }
    row["quality"] = {}
    if quality_task:
        gt, scorer = gts[quality_task][k], ref[quality_task]
        for b in backends:
            result = outputs[b.label][quality_task][k]
            row["quality"][b.label] = image_quality(quality_task, scorer, gt, result, names)
    return row


def _rank(rankings: dict[str, TopN], keys: dict[str, tuple | None], image_id: int, pictures: dict) -> bool:
    """Push the image into each ranking and forget the pictures of images no ranking holds any more; True when
    the image entered a ranking and has no pictures yet."""
    dropped, entered = set(), False
    for name, key in keys.items():
        if key is None:
            continue
        out = rankings[name].push(key, image_id)
        entered |= out != image_id
        if out is not None:
            dropped.add(out)
    held = set().union(*(r.ids() for r in rankings.values()))
    for i in dropped - held:
        pictures.pop(i, None)
    return entered and image_id not in pictures


# ---------------------------------------------------------------------------------------------- the report
def _get(d: dict[str, Any], path: tuple[str, ...]) -> float | None:
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else b - a


def _summary(labels: list[str], results: dict[str, dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    rows = []
    for t in tasks:
        for name, path in SUMMARY[t]:
            values = {lab: _get(results[lab][t], path) for lab in labels}
            delta = {lab: _delta(values[labels[0]], values[lab]) for lab in labels[1:]}
            rows.append({"task": t, "metric": name, "values": values, "delta": delta})
    return rows


def _per_class(labels: list[str], results, tasks, cfg) -> list[dict[str, Any]]:
    rows = []
    for cid, name in sorted(cfg.id2label.items()):
        per: dict[str, dict[str, Any]] = {}
        for lab in labels:
            entry: dict[str, Any] = {}
            if "panoptic" in tasks:
                c = results[lab]["panoptic"]["per_class"].get(cid, {})
                entry.update({k: c.get(k) for k in ("pq", "sq", "rq", "tp", "fp", "fn")})
            if "semantic" in tasks:
                entry["iou"] = results[lab]["semantic"]["per_class"].get(cid)
            per[lab] = entry
        first = per[labels[0]]
        delta = {lab: {k: _delta(first.get(k), per[lab].get(k)) for k in ("pq", "iou")} for lab in labels[1:]}
        drops = [-d[k] for d in delta.values() for k in ("pq", "iou") if d[k] is not None]  # the largest of any
        rows.append({
            "id": cid, "name": name, "isthing": cid in cfg.thing_ids, "backends": per, "delta": delta,
            "drop": max(drops) if drops else None,
        })  # fmt: skip
    if len(labels) > 1:
        rows.sort(key=lambda r: (r["drop"] is None, -(r["drop"] or 0.0), r["id"]))
    else:  # one backend: its worst classes first
        score = "pq" if "panoptic" in tasks else "iou"
        rows.sort(
            key=lambda r: (
                r["backends"][labels[0]].get(score) is None,
                r["backends"][labels[0]].get(score) or 0.0,
                r["id"],
            )
        )
    return rows


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("torch", "onnxruntime"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "?")
    return out


def _assemble(backends, layout, tasks, images, rows, scorers, worst, batch_size, limit, command, colours):
    labels = [b.label for b in backends]
    cfg = backends[0].config
    results = {lab: {t: s.compute() for t, s in scorers[lab].items()} for lab in labels}
    ranked = [r for r in rows if disagreement_key(r) is not None]
    ranked.sort(key=disagreement_key, reverse=True)
    worst_rows = {}
    for lab in labels:
        scored = [r for r in rows if worst_key(r, lab) is not None]
        scored.sort(key=lambda r, lab=lab: worst_key(r, lab), reverse=True)
        worst_rows[lab] = [
            {"image_id": r["image_id"], "file_name": r["file_name"], **r["quality"][lab]} for r in scored[:worst]
        ]
    disagreement = [
        {"image_id": r["image_id"], "file_name": r["file_name"], "backends": r["disagreement"]} for r in ranked[:worst]
    ]
    timings = {}
    for b in backends:
        busy = b.timing["inference_s"] + b.timing["postprocess_s"]
        timings[b.label] = {
            "load_s": b.load_s,
            **b.timing,
            "images": len(images),
            "inference_ms_per_image": 1000 * b.timing["inference_s"] / len(images),
            "images_per_s": len(images) / busy if busy else None,
        }
    brief_rows = [
        {
            "image_id": r["image_id"],
            "file_name": r["file_name"],
            "quality": r["quality"],
            "disagreement": {
                lab: {k: v for k, v in d.items() if k != "changes"} for lab, d in r["disagreement"].items()
            },
        }
        for r in rows
    ]
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "versions": _versions(),
        "data": {
            **layout.describe(),
            "num_images": len(images),
            "tasks": tasks,
            "annotation_sha256": {p.name: file_sha256(p) for p in layout.annotation_files()},
        },
        "settings": {"batch_size": batch_size, "limit": limit, "worst": worst, "warmup": "first batch, untimed"},
        "backends": [b.describe() for b in backends],
        "classes": [
            {"id": cid, "name": n, "isthing": cid in cfg.thing_ids, "color": colours[cid]}
            for cid, n in sorted(cfg.id2label.items())
        ],
        "summary": _summary(labels, results, tasks),
        "metrics": results,
        "per_class": _per_class(labels, results, tasks, cfg),
        "disagreement": disagreement,
        "worst": worst_rows,
        "timings": timings,
        "images": brief_rows,
    }


# ---------------------------------------------------------------------------------------------- text, CLI
def _num(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.2f}" if sign else f"{x:.2f}"


def format_text(report: dict[str, Any], top: int = 5) -> str:
    """The report as a plain-text summary: scores with differences, the largest class drops, the images
    the backends disagree on most, the worst images, timings."""
    labels = [b["label"] for b in report["backends"]]
    data = report["data"]
    lines = [
        f"{len(labels)} backend(s) on {data['num_images']} image(s) of {data['root']} ({', '.join(data['tasks'])})"
    ]
    head = f"{'':10}" + "".join(f"{lab[:16]:>17}" + ("" if i == 0 else f"{'diff':>8}") for i, lab in enumerate(labels))
    lines += ["", head]
    for row in report["summary"]:
        cells = [f"{_num(row['values'][labels[0]]):>17}"]
        cells += [f"{_num(row['values'][lab]):>17}{_num(row['delta'][lab], True):>8}" for lab in labels[1:]]
        lines.append(f"{row['metric']:10}" + "".join(cells))
    key = "pq" if "panoptic" in data["tasks"] else "iou"
    title = "largest drops against " + labels[0] if len(labels) > 1 else "lowest classes"
    lines += ["", f"per class ({key.upper()}), {title}:"]
    for row in report["per_class"][:top]:
        vals = "  ".join(f"{lab} {_num(row['backends'][lab].get(key))}" for lab in labels)
        lines.append(f"  {row['name'][:20]:20} {vals}")
    if report["disagreement"]:
        lines += ["", f"images where the backends disagree most (against {labels[0]}):"]
        for row in report["disagreement"][:top]:
            parts = [
                f"{lab}: {share(d['pixel_disagreement'])} px, +{d['added']} -{d['lost']} ~{d['relabelled']}"
                for lab, d in row["backends"].items()
            ]
            lines.append(f"  {row['file_name'][:30]:30} " + "; ".join(parts))
    for lab, rows in report["worst"].items():
        if rows:
            score = "pq" if "pq" in rows[0] else "miou"
            shown = ", ".join(f"{r['file_name']} {score.upper()} {r[score]:.1f}" for r in rows[:top])
            lines.append(f"worst for {lab}: {shown}")
    lines.append("")
    for lab, t in report["timings"].items():
        lines.append(
            f"{lab}: load {t['load_s']:.1f}s, inference {t['inference_ms_per_image']:.1f} ms/image, "
            f"post-processing {1000 * t['postprocess_s'] / t['images']:.1f} ms/image"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``m2f eval --model ... [--report DIR]``: compare, print the summary (or JSON), write the report files."""
    specs = list(args.model or [])
    if not specs:  # --report with the single-model flags
        specs = [str(args.onnx)] if getattr(args, "onnx", None) else [str(args.weights or _demo())]
    backends = [open_backend(s, device=args.device, labels=getattr(args, "labels", None)) for s in specs]
    command = command_line(args, specs)
    report, pictures = compare(
        backends,
        args.data,
        task=args.task,
        batch_size=args.batch_size,
        limit=args.limit,
        worst=args.worst,
        split=getattr(args, "split", None),
        command=command,
    )
    if args.report is not None:
        write_report(report, pictures, args.report)
    print(json.dumps(report) if args.json else format_text(report))
    if args.report is not None:
        print(f"\nwrote {args.report / 'report.json'} and {args.report / 'report.html'}", file=sys.stderr)
    return 0


def command_line(args: argparse.Namespace, specs: list[str]) -> str:
    """The ``m2f eval`` command that reproduces this report, from the parsed options (defaults spelt out)."""
    parts = ["m2f", "eval", "--data", str(args.data)]
    parts += [x for spec in specs for x in ("--model", spec)]
    for flag, value in (
        ("--split", getattr(args, "split", None)),
        ("--task", args.task),
        ("--labels", getattr(args, "labels", None)),
        ("--limit", args.limit),
        ("--batch-size", args.batch_size),
        ("--device", args.device),
        ("--worst", args.worst),
        ("--report", args.report),
    ):
        if value is not None:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _demo() -> Path:
    from mask2former.weights import DEMO_WEIGHTS  # lazy: torch (mask2former.weights imports it)

    return DEMO_WEIGHTS


def write_report(report: dict[str, Any], pictures: dict[int, dict[str, bytes]], folder: str | Path) -> None:
    """``report.json`` (the report) and ``report.html`` (self-contained) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    (folder / "report.html").write_text(report_html.render(report, pictures), encoding="utf-8")
