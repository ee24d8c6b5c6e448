"""Where the time goes: ONNX Runtime's per-op profile of the exported graph next to torch's of our eager model.

    python bench/onnxruntime_profile.py [--size 384] [--opset 20] [--iters 4] [--top 12]

The swin-tiny COCO-panoptic architecture with random weights, batch 1, exported at a fixed size (checked
against PyTorch by the exporter). ONNX Runtime runs with its profiler on and the service runner's session
settings (``runtimes.ort_session.session_options`` / ``open_session``); kernel times are summed per op type
and averaged per run. torch's profiler does the same for our eager model (self CPU time per aten op). Both
include the profilers' own overhead.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mask2former import load_model  # noqa: E402
from mask2former.reference import architecture, save_hf_checkpoint  # noqa: E402
from model_export.onnx import export_onnx  # noqa: E402
from runtimes.ort_session import available_cpus, open_session, session_options  # noqa: E402


def ort_profile(path: Path, size: int, iters: int, tmp: Path) -> tuple[dict[str, float], float]:
    """Per-op-type milliseconds per run, and the mean wall time per run (ms)."""
    opts = session_options(available_cpus())  # the runner's settings
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / "ort")
    session = open_session(str(path), opts, ["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    session.run(None, {"pixel_values": x})  # warm-up (also profiled: its kernels are skipped below)
    t0 = time.perf_counter()
    for _ in range(iters):
        session.run(None, {"pixel_values": x})
    wall = (time.perf_counter() - t0) / iters * 1e3
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    first_end = runs[0]["ts"] + runs[0]["dur"]  # skip the warm-up run's kernels
    per_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_end:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / iters
    return dict(per_op), wall


def torch_profile(model, size: int, iters: int) -> tuple[dict[str, float], float]:
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(iters):
                model(x)
            wall = (time.perf_counter() - t0) / iters * 1e3
    per_op = {a.key: a.self_cpu_time_total / 1e3 / iters for a in prof.key_averages()}
    return per_op, wall


def table(title: str, per_op: dict[str, float], wall: float, top: int) -> None:
    total = sum(per_op.values())
    print(f"\n{title}: {wall:.0f} ms per run (profiled), kernels {total:.0f} ms")
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {op:48s} {ms:8.1f} ms  {100 * ms / total:5.1f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--opset", type=int, default=None)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = save_hf_checkpoint(architecture("tiny", "coco-panoptic"), tmp / "ckpt", seed=0)
        path = tmp / "model.onnx"
        opset = {"opset": args.opset} if args.opset else {}
        report = export_onnx(ckpt, path, height=args.size, width=args.size, log=None, **opset)
        print(f"swin-tiny {args.size}x{args.size} batch 1, opset {report.opset}, {available_cpus()} threads")
        table("ONNX Runtime", *ort_profile(path, args.size, args.iters, tmp), args.top)
        table("torch eager (ours)", *torch_profile(load_model(ckpt).eval(), args.size, args.iters), args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
