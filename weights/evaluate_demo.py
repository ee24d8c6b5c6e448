"""Score the demo model on held-out synthetic data and record the numbers its model card quotes.

    python weights/evaluate_demo.py                  # writes weights/demo/metrics.json
    python weights/evaluate_demo.py --tune           # first picks the panoptic score threshold on validation data

Three disjoint sample streams, told apart by their generator seed: training used seed 0 (see
``train_demo.py``), ``--tune`` picks the panoptic ``threshold`` on seed 999 and writes it into the
checkpoint's ``config.json``, and the reported metrics come from seed 1000, which neither training nor
tuning saw. PQ/SQ/RQ, mask AP (COCOeval) and mIoU are computed by ``m2f eval``'s code
(:mod:`m2f.evaluate`). The first ``--test-images`` held-out images are scored on their own too:
``tests/test_demo_model.py`` re-evaluates them in the default test run and compares with this record.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2f import synth  # noqa: E402
from m2f.evaluate import evaluate  # noqa: E402
from mask2former.weights import DEMO_WEIGHTS, load_model  # noqa: E402

VALIDATION_SEED = 999
HELDOUT_SEED = 1000
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def tune_threshold(weights: Path, num_images: int) -> tuple[float, dict[float, float]]:
    """The panoptic score threshold with the best PQ on validation data, and PQ at every candidate."""
    model = load_model(weights)
    with tempfile.TemporaryDirectory() as data:
        synth.write_dataset(data, num_images, VALIDATION_SEED)
        pq = {}
        for t in THRESHOLDS:
            model.config = replace(model.config, threshold=t)
            pq[t] = evaluate(model, data, "panoptic", progress=False)["metrics"]["all"]["pq"]
            print(f"  threshold {t:.1f}: PQ {pq[t]:.2f}", flush=True)
    return max(pq, key=pq.get), pq


def score(weights: Path, data: str, limit: int | None = None) -> dict:
    model = load_model(weights)
    out = {}
    for task in ("panoptic", "instance", "semantic"):
        result = evaluate(model, data, task, limit=limit, progress=False)
        out[task] = result["metrics"]
        out["num_images"] = result["num_images"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=DEMO_WEIGHTS)
    parser.add_argument("--num-images", type=int, default=500, help="held-out images (seed 1000)")
    parser.add_argument("--test-images", type=int, default=24, help="subset re-checked by the tests")
    parser.add_argument("--tune", action="store_true", help="pick the panoptic threshold on seed 999 first")
    parser.add_argument("--tune-images", type=int, default=200)
    args = parser.parse_args(argv)

    record: dict = {}
    if args.tune:
        print(f"tuning the panoptic threshold on {args.tune_images} validation images (seed {VALIDATION_SEED})")
        best, pq = tune_threshold(args.weights, args.tune_images)
        config_path = args.weights / "config.json"
        config = json.loads(config_path.read_text())
        config["threshold"] = best
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        print(f"threshold {best} written to {config_path}")
        record["threshold_tuning"] = {
            "seed": VALIDATION_SEED,
            "num_images": args.tune_images,
            "pq_by_threshold": {str(t): v for t, v in pq.items()},
            "chosen": best,
        }
    metrics_path = args.weights / "metrics.json"
    if not args.tune and metrics_path.is_file():  # keep an earlier tuning record
        record = {k: v for k, v in json.loads(metrics_path.read_text()).items() if k == "threshold_tuning"}

    with tempfile.TemporaryDirectory() as data:
        synth.write_dataset(data, args.num_images, HELDOUT_SEED)
        print(f"scoring {args.num_images} held-out images (seed {HELDOUT_SEED})", flush=True)
        record["heldout"] = {"seed": HELDOUT_SEED, "image_size": [160, 160], **score(args.weights, data)}
        record["test_subset"] = {"seed": HELDOUT_SEED, **score(args.weights, data, limit=args.test_images)}
    record["threshold"] = load_model(args.weights).config.threshold
    record["machine"] = {
        "python": platform.python_version(),
        "torch": __import__("torch").__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }
    metrics_path.write_text(json.dumps(record, indent=2) + "\n")
    h = record["heldout"]
    print(
        f"held-out: PQ {h['panoptic']['all']['pq']:.2f} (things {h['panoptic']['things']['pq']:.2f}, "
        f"stuff {h['panoptic']['stuff']['pq']:.2f}), mask AP {h['instance']['AP']:.2f}, mIoU {h['semantic']['mIoU']:.2f}"
    )
    print(f"wrote {metrics_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
