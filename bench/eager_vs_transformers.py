"""Eager PyTorch speed: our Mask2Former against ``transformers``' on the same weights, side by side.

Builds a random-weight HF checkpoint of a public architecture (swin-tiny COCO panoptic by default: 133
classes, 100 queries), loads it into both ``mask2former.Mask2Former`` and
``transformers.Mask2FormerForUniversalSegmentation``, checks that the two agree, then times them with
interleaved iterations (ours, theirs, theirs, ours, ...) so that machine noise hits both equally.

    python bench/eager_vs_transformers.py                      # tiny, 384x384 and 640x640, batch 1
    python bench/eager_vs_transformers.py --sizes 256x256 --iters 2 --warmup 1   # smoke run
    python bench/eager_vs_transformers.py --backbone base --batch 1 4 --threads 8 --json out.json

``--sizes`` are WxH, width first as in every bench script (before 2026-12-07 this one read HxW; every recorded run
used square sizes); in the JSON, ``args.sizes`` are [W, H] as given and each result's ``size`` is the input
tensor's [H, W].

Reports per model the median and p10/p90 latency of one forward pass in ms, images/s at the median, and
the ratio theirs/ours of the medians (> 1: ours is faster). Exits non-zero without timing anything if the
outputs disagree by more than 1e-4 x max |reference|, unless every decoder step agrees within that up to
an attention-mask bit flipped by float rounding (then it warns; see :func:`flipped_mask_bits`).
``transformers`` is a development dependency.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, parse_size  # noqa: E402
from mask2former import load_model  # noqa: E402
from mask2former.attention_mask import attention_mask, attention_mask_at_level  # noqa: E402
from mask2former.reference import DATASETS, RESNET, SWIN, architecture, save_hf_checkpoint  # noqa: E402

REL_TOL = 1e-4


def build_models(backbone: str, dataset: str, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, theirs), both float32 in eval mode, loaded from one random-weight HF checkpoint."""
    from transformers import Mask2FormerForUniversalSegmentation  # lazy: transformers (a development dependency)
    from transformers.utils import logging as hf_logging  # lazy: transformers

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="m2f-bench-") as folder:
        save_hf_checkpoint(architecture(backbone, dataset), folder, seed=seed)
        ours = load_model(folder).eval()
        theirs = Mask2FormerForUniversalSegmentation.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, theirs


def run_ours(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(x)
    return out.class_logits, out.mask_logits


def run_theirs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(pixel_values=x)
    return out.class_queries_logits, out.masks_queries_logits


def parity(ours: tuple[torch.Tensor, torch.Tensor], theirs: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Max |ours - theirs| relative to max |theirs|, for class and mask logits."""
    result = {}
    for name, a, b in zip(("class", "mask"), ours, theirs):
        if a.shape != b.shape:
            raise SystemExit(f"FAIL: {name} logits shape {tuple(a.shape)} != transformers {tuple(b.shape)}")
        diff = (a - b).abs().max().item()
        scale = b.abs().max().item()
        result[f"{name}_max_abs_diff"] = diff
        result[f"{name}_rel_diff"] = diff / scale if scale > 0 else float("inf")
    return result


def flipped_mask_bits(ours: torch.nn.Module, theirs: torch.nn.Module, x: torch.Tensor) -> int | None:
    """Whether a disagreement comes from masked attention's threshold rather than from the models.

    A mask logit within float rounding of the threshold (sigmoid = 0.5) can land on different sides in
    the two implementations; the flipped bit changes what a query attends to, and every later prediction
    diverges by far more than rounding. Compares the prediction after every decoder step: returns the
    number of attention-mask bits flipped just before the first step that disagrees, if every step
    before it agrees and some bits flipped there; None otherwise (a real disagreement).
    """
    features = ours.backbone(x)
    mask_features, multi_scale = ours.pixel_decoder(features)
    preds, attention_logits = ours.decoder(multi_scale, mask_features, all_layers=True)
    r = theirs(pixel_values=x, output_auxiliary_logits=True)
    steps = [(a["class_queries_logits"], a["masks_queries_logits"]) for a in r.auxiliary_logits]
    steps.append((r.class_queries_logits, r.masks_queries_logits))
    flips = 0
    for i, (p, ref) in enumerate(zip(preds, steps, strict=True)):
        check = parity((p.class_logits, p.mask_logits), ref)
        if max(check["class_rel_diff"], check["mask_rel_diff"]) > REL_TOL:
            return flips or None
        if i + 1 < len(preds):
            size = multi_scale[i % len(multi_scale)].shape[-2:]
            ours_mask = attention_mask_at_level(attention_logits[i])  # what our layer i attended with
            flips = int((ours_mask != attention_mask(ref[1], size)).sum())
    return None


def summary(times_s: list[float], batch: int) -> dict[str, Any]:
    ms = np.asarray(times_s) * 1e3
    median = float(np.median(ms))
    return {
        "median_ms": median,
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
        "images_per_s": batch / median * 1e3,
        "iters": len(ms),
        "times_ms": [round(float(t), 3) for t in ms],
    }


@torch.inference_mode()
def bench_one(
    ours: torch.nn.Module,
    theirs: torch.nn.Module,
    size: tuple[int, int],
    batch: int,
    warmup: int,
    iters: int,
    max_seconds: float,
) -> dict[str, Any]:
    w, h = size  # (W, H), as --sizes reads it
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    runners = {"ours": lambda: run_ours(ours, x), "theirs": lambda: run_theirs(theirs, x)}

    # The first call of each is the parity check, and counts as a warm-up iteration.
    check = parity(runners["ours"](), runners["theirs"]())
    worst = max(check["class_rel_diff"], check["mask_rel_diff"])
    print(
        f"  parity {w}x{h} b{batch}: class logits max|diff| {check['class_max_abs_diff']:.2e} "
        f"(rel {check['class_rel_diff']:.1e}), mask logits max|diff| {check['mask_max_abs_diff']:.2e} "
        f"(rel {check['mask_rel_diff']:.1e})",
        flush=True,
    )
    if not worst <= REL_TOL:
        flips = flipped_mask_bits(ours, theirs, x)
        if flips is None:
            raise SystemExit(
                f"FAIL: ours and transformers disagree at {w}x{h} batch {batch}: relative max |diff| {worst:.2e} "
                f"> {REL_TOL:g}; timings of models that disagree are meaningless"
            )
        check["attention_mask_bits_flipped"] = flips
        print(
            f"  WARNING: relative max |diff| {worst:.2e} > {REL_TOL:g}, but every decoder step agrees within "
            f"{REL_TOL:g} up to where float rounding flipped {flips} attention-mask bit(s) (mask logits at the "
            "sigmoid = 0.5 threshold): the models compute the same function; timing them anyway",
            flush=True,
        )
    for _ in range(warmup - 1):
        runners["ours"]()
        runners["theirs"]()

    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    gc.collect()
    start = time.perf_counter()
    for i in range(iters):
        for name in ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours"):
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)
        if i + 1 >= 3 and time.perf_counter() - start > max_seconds:
            print(f"  time budget of {max_seconds:g}s reached after {i + 1} of {iters} iterations", flush=True)
            break
    result = {"size": [h, w], "batch": batch, "parity": check}
    result.update({name: summary(t, batch) for name, t in times.items()})
    result["ratio_theirs_over_ours"] = result["theirs"]["median_ms"] / result["ours"]["median_ms"]
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    header = (
        f"{'size':>9} {'batch':>5} | {'ours ms (p10-p90)':>24} {'img/s':>7} | "
        f"{'transformers ms (p10-p90)':>26} {'img/s':>7} | {'theirs/ours':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        o, t = r["ours"], r["theirs"]
        size = f"{r['size'][1]}x{r['size'][0]}"  # WxH, as --sizes; the JSON's "size" is [H, W]
        print(
            f"{size:>9} {r['batch']:>5} | "
            f"{o['median_ms']:>8.1f} ({o['p10_ms']:>6.1f}-{o['p90_ms']:>6.1f}) {o['images_per_s']:>7.2f} | "
            f"{t['median_ms']:>10.1f} ({t['p10_ms']:>6.1f}-{t['p90_ms']:>6.1f}) {t['images_per_s']:>7.2f} | "
            f"{r['ratio_theirs_over_ours']:>10.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backbone", choices=[*SWIN, *RESNET], default="tiny", help="Swin size or r50/r101 (default tiny)"
    )
    parser.add_argument("--dataset", choices=list(DATASETS), default="coco-panoptic", help="sets the class count")
    parser.add_argument(
        "--sizes", nargs="+", type=parse_size, default=[(384, 384), (640, 640)], help="WxH (default 384x384 640x640)"
    )
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="batch size(s) (default 1)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up iterations per model, incl. the parity check")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per model (default 10)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=60.0,
        help="time budget per size and batch: stop early (after at least 3 iterations) past it (default 60)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.iters < 1 or min(args.batch) < 1:
        parser.error("--warmup, --iters and --batch must be >= 1")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine_info(torch.get_num_threads())
    print(
        f"machine: {info['cpu']}; {info['cores']} cores ({info['cores_usable']} usable); "
        f"torch {info['torch']}, transformers {info['transformers']}, python {info['python']}; "
        f"{info['threads']} threads; {info['date']}"
    )
    arch = architecture(args.backbone, args.dataset)
    print(
        f"model: {args.backbone if args.backbone in RESNET else 'swin-' + args.backbone} {args.dataset} ({arch['num_labels']} classes, {arch['num_queries']} queries), "
        f"random weights (seed {args.seed}), float32, eager, torch.inference_mode()"
    )
    print(f"timing: {args.warmup} warm-up + up to {args.iters} interleaved iterations per model", flush=True)

    t0 = time.perf_counter()
    ours, theirs = build_models(args.backbone, args.dataset, args.seed)
    print(f"built both models in {time.perf_counter() - t0:.1f}s", flush=True)

    results = []
    for batch in args.batch:
        for size in args.sizes:
            results.append(bench_one(ours, theirs, size, batch, args.warmup, args.iters, args.max_seconds))

    print()
    print_table(results)
    print("theirs/ours = median latency ratio; > 1 means ours is faster.")
    if args.json is not None:
        report = {"benchmark": "eager_vs_transformers", "machine": info, "args": vars(args) | {"json": str(args.json)}}
        report["model"] = {"backbone": args.backbone, "dataset": args.dataset, **arch}
        report["results"] = results
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
