"""CPU speed: ONNX Runtime vs our eager PyTorch vs ``transformers`` eager, same weights, side by side.

    python bench/onnxruntime_vs_eager.py [--sizes 384 640] [--batch 1 4] [--iters 5] [--opset N] [--int8]

The public swin-tiny (or ``--backbone``) COCO-panoptic architecture (133 classes, 100 queries), random weights, is saved
once as an HF checkpoint; ours and ``transformers`` load it, and ``m2f export onnx`` exports it once per
size (fixed height/width, dynamic batch; the exporter checks ONNX Runtime against PyTorch before this
script times anything). Iterations rotate through the three runtimes so machine noise hits all alike.
Reports the median latency per forward pass, images/s, ratios, and the achieved GFLOP/s against a
matrix-multiply peak measured on the same machine and thread count (FLOPs of the forward counted by
``torch.utils.flop_counter`` on our model: matmuls, convolutions and attention; grid sampling and
elementwise work are not counted, so the GFLOP/s figures are lower bounds).

``--int8`` adds the dynamically quantized export (``m2f export onnx --quantize int8``) to the timed runtimes
and measures what it costs in accuracy: panoptic PQ of the demo model through ONNX Runtime, float32 vs
int8, on the first ``--pq-images`` held-out images (seed 1000, as weights/demo/metrics.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2f import synth  # noqa: E402
from m2f.evaluate import evaluate  # noqa: E402
from mask2former import load_model  # noqa: E402
from mask2former.reference import RESNET, SWIN, architecture, save_hf_checkpoint  # noqa: E402
from mask2former.weights import DEMO_WEIGHTS  # noqa: E402
from model_export.onnx import export_onnx  # noqa: E402
from runtimes.onnx_runner import OnnxRunner  # noqa: E402


def matmul_peak_gflops(threads: int, n: int = 2048, iters: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def forward_gflop(model, size: int) -> float:
    # FlopCounterMode's module hooks need autograd-visible tensors: no inference_mode, frozen parameters.
    for p in model.parameters():
        p.requires_grad_(False)
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def demo_pq_int8(num_images: int, threads: int) -> dict[str, float]:
    """Panoptic PQ of the demo model through ONNX Runtime, float32 and int8, on held-out synthetic images."""
    pq = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "heldout"
        synth.write_dataset(data, num_images, 1000)
        for name, quantize in (("float32", None), ("int8", "int8")):
            path = Path(tmp) / f"demo-{name}.onnx"
            export_onnx(DEMO_WEIGHTS, path, height=160, width=160, batch=4, quantize=quantize, log=None)
            metrics = evaluate(OnnxRunner(path, threads=threads), data, "panoptic", batch_size=4, progress=False)
            pq[name] = round(metrics["metrics"]["all"]["pq"], 2)
    return pq


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[384, 640])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--opset", type=int, default=None, help="export opset (default: the exporter's)")
    parser.add_argument("--backbone", choices=[*SWIN, *RESNET], default="tiny", help="Swin size or r50/r101")
    parser.add_argument("--int8", action="store_true", help="also time the int8 (dynamically quantized) export")
    parser.add_argument("--pq-images", type=int, default=500, help="held-out images for the int8 PQ comparison")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from transformers import Mask2FormerForUniversalSegmentation  # lazy: transformers (a development dependency)

    threads = torch.get_num_threads()
    peak = matmul_peak_gflops(threads)
    print(f"{datetime.date.today()}, torch {torch.__version__}, {threads} threads; fp32 matmul peak {peak:.1f} GFLOP/s")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_hf_checkpoint(architecture(args.backbone, "coco-panoptic"), Path(tmp) / "ckpt", seed=0)
        ours = load_model(ckpt)
        theirs = Mask2FormerForUniversalSegmentation.from_pretrained(ckpt).eval()
        for size in args.sizes:
            onnx_path = Path(tmp) / f"{args.backbone}-{size}.onnx"
            t0 = time.perf_counter()
            opset = {"opset": args.opset} if args.opset else {}
            report = export_onnx(
                ckpt, onnx_path, height=size, width=size, dynamic_batch=True, log=lambda line: None, **opset
            )
            print(
                f"exported {size}x{size} (opset {report.opset}) in {time.perf_counter() - t0:.0f}s; "
                f"check: {report.summary().splitlines()[-2]}"
            )
            runner = OnnxRunner(onnx_path, threads=threads)
            runners = {"onnxruntime": runner}
            if args.int8:
                int8_path = Path(tmp) / f"{args.backbone}-{size}-int8.onnx"
                export_onnx(
                    ckpt, int8_path, height=size, width=size, dynamic_batch=True, quantize="int8", log=None, **opset
                )
                runners["onnxruntime int8"] = OnnxRunner(int8_path, threads=threads)
            gflop = forward_gflop(ours, size)
            for batch in args.batch:
                x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
                xn = x.numpy()
                runs = {name: (lambda r=r, a=xn: r.run(a)) for name, r in runners.items()}
                runs["ours"] = lambda a=x: ours(a)
                runs["transformers"] = lambda a=x: theirs(pixel_values=a)
                times = {k: [] for k in runs}
                with torch.inference_mode():
                    for fn in runs.values():
                        fn()
                    for i in range(args.iters):
                        names = list(runs)[i % len(runs) :] + list(runs)[: i % len(runs)]
                        for name in names:
                            t0 = time.perf_counter()
                            runs[name]()
                            times[name].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                row = {"size": size, "batch": batch, "gflop_per_image": gflop, "median_ms": med}
                row["gflops"] = {k: gflop * batch / (v / 1e3) for k, v in med.items()}
                results.append(row)
                print(
                    f"{size}x{size} b{batch}: "
                    + ", ".join(f"{k} {v:.0f} ms ({row['gflops'][k]:.0f} GFLOP/s)" for k, v in med.items())
                    + "".join(f"; transformers/{k} {med['transformers'] / med[k]:.2f}x" for k in runners)
                    + f"; ours/onnxruntime {med['ours'] / med['onnxruntime']:.2f}x",
                    flush=True,
                )
    out = {"matmul_peak_gflops": peak, "threads": threads, "opset": args.opset, "results": results}
    if args.int8:
        out["demo_pq"] = demo_pq_int8(args.pq_images, threads)
        print(f"demo model panoptic PQ on {args.pq_images} held-out images: {out['demo_pq']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
