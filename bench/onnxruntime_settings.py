"""What the runner's ONNX Runtime session settings are worth: the runner's settings against each one undone.

    python bench/onnxruntime_settings.py [--size 384] [--iters 10] [--int8] [--torch]

The swin-tiny COCO-panoptic architecture with random weights, batch 1, exported at a fixed size (checked
against PyTorch by the exporter; with ``--int8`` also the ``--quantize int8`` export). Each graph runs in
four sessions, timed interleaved: the runner's (``runtimes.ort_session.session_options`` + ``open_session``:
denormals flushed to zero, the SkipLayerNormalization and MatMul+Add->Gemm fusions off), the same keeping
denormals, the same with ONNX Runtime's default fusions, and ONNX Runtime's defaults for both. Prints the
median ms of each and its largest output difference from the runner's session. ``--torch`` also times our
eager model and ``transformers`` with and without ``torch.set_flush_denormal(True)``, to show whether the
denormal setting would help them too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mask2former import load_model  # noqa: E402
from mask2former.reference import architecture, save_hf_checkpoint  # noqa: E402
from model_export.onnx import export_onnx  # noqa: E402
from runtimes.ort_session import available_cpus, disabled_optimizers, session_options  # noqa: E402

CPU = ["CPUExecutionProvider"]


def interleaved(fns: dict[str, Callable[[], object]], iters: int) -> dict[str, float]:
    """Median ms of each function, timed in rotation after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def sessions(path: Path) -> dict[str, object]:
    def session(flush_denormals: bool, runner_fusions: bool):
        opts = session_options(available_cpus())
        if not flush_denormals:
            opts.add_session_config_entry("session.set_denormal_as_zero", "0")
        disabled = disabled_optimizers(CPU) if runner_fusions else []
        return ort.InferenceSession(str(path), opts, providers=CPU, disabled_optimizers=disabled)

    return {
        "runner": session(True, True),
        "denormals kept": session(False, True),
        "default fusions": session(True, False),
        "ONNX Runtime defaults": session(False, False),
    }


def compare_sessions(path: Path, size: int, iters: int) -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    runs = sessions(path)
    medians = interleaved({name: (lambda s=s: s.run(None, {"pixel_values": x})) for name, s in runs.items()}, iters)
    ref = runs["runner"].run(None, {"pixel_values": x})
    print(f"\n{path.stem}, {size}x{size} batch 1, {available_cpus()} threads, {iters} interleaved iterations")
    for name, ms in medians.items():
        out = runs[name].run(None, {"pixel_values": x})
        diff = max(float(np.abs(a - b).max()) for a, b in zip(out, ref, strict=True))
        print(f"  {name:22s} {ms:8.1f} ms  {ms / medians['runner']:5.2f}x the runner's  max |diff| {diff:.1e}")


def compare_torch(ckpt: Path, size: int, iters: int) -> None:
    from transformers import Mask2FormerForUniversalSegmentation  # lazy: transformers (a development dependency)

    ours = load_model(ckpt).eval()
    theirs = Mask2FormerForUniversalSegmentation.from_pretrained(ckpt).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))

    def timed(flush: bool, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            torch.set_flush_denormal(flush)
            try:
                return fn()
            finally:
                torch.set_flush_denormal(False)

        return run

    with torch.inference_mode():
        fns = {}
        for flush in (False, True):
            fns[f"ours, flush {flush}"] = timed(flush, lambda: ours(x))
            fns[f"transformers, flush {flush}"] = timed(flush, lambda: theirs(pixel_values=x))
        medians = interleaved(fns, iters)
    print(f"\ntorch eager, {size}x{size} batch 1, {torch.get_num_threads()} threads, torch.set_flush_denormal")
    for name, ms in medians.items():
        print(f"  {name:28s} {ms:8.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--int8", action="store_true", help="also the int8 (dynamically quantized) export")
    parser.add_argument("--torch", action="store_true", help="also torch eager with and without flush-denormal")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = save_hf_checkpoint(architecture("tiny", "coco-panoptic"), tmp / "ckpt", seed=0)
        graphs = [("float32", None)] + ([("int8", "int8")] if args.int8 else [])
        for name, quantize in graphs:
            path = tmp / f"swin-tiny-{name}.onnx"
            export_onnx(ckpt, path, height=args.size, width=args.size, quantize=quantize, log=None)
            compare_sessions(path, args.size, args.iters)
        if args.torch:
            compare_torch(ckpt, args.size, args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
