"""CPU speed of an int8 graph by how its weights are stored: uint8 (u8 x u8 kernels, exact on every x86 CPU;
what `m2f export onnx --quantize int8` writes) vs int8 (u8 x s8 kernels: VNNI where the CPU has it,
saturating VPMADDUBSW where it does not), against the float32 graph, side by side.

    python bench/int8_weights.py [--sizes 384 640] [--batch 1] [--iters 7]

The public swin-tiny COCO-panoptic architecture (random weights) is exported once per size as float32 and
as int8; the int8 file's weights are then also written as int8 (model_format.int8.store_weights: the same
integers, shifted by 128). Each variant runs in a session opened directly (no runner-side conversion), and
iterations rotate through the variants so machine noise hits all alike. Reports the median and spread per
forward pass and the ratios, with this CPU's int8 kernel (model_format.int8.cpu_int8_kernel), and what the
runner's conversion of the weights costs when it loads the file (median of 3 loads, no cache).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mask2former.reference import architecture, save_hf_checkpoint  # noqa: E402
from model_export.onnx import export_onnx  # noqa: E402
from model_format.int8 import (
    cpu_int8_kernel,  # noqa: E402
    store_weights,  # noqa: E402
)
from runtimes.onnx_runner import OnnxRunner  # noqa: E402
from runtimes.ort_session import available_cpus, open_session, session_options  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[384, 640])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    threads = available_cpus()
    kernel = cpu_int8_kernel()
    print(
        f"{datetime.date.today()}, {cpu_name()}, {threads} threads, onnxruntime {ort.__version__}, int8 kernel: {kernel}"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_hf_checkpoint(architecture("tiny", "coco-panoptic"), Path(tmp) / "ckpt", seed=0)
        for size in args.sizes:
            paths = {"float32": Path(tmp) / f"fp32-{size}.onnx", "int8 (uint8 weights)": Path(tmp) / f"u8-{size}.onnx"}
            export_onnx(ckpt, paths["float32"], height=size, width=size, dynamic_batch=True, log=None)
            export_onnx(
                ckpt,
                paths["int8 (uint8 weights)"],
                height=size,
                width=size,
                dynamic_batch=True,
                quantize="int8",
                log=None,
            )
            s8 = onnx.load(str(paths["int8 (uint8 weights)"]))
            store_weights(s8, "int8")
            paths["int8 (int8 weights)"] = Path(tmp) / f"s8-{size}.onnx"
            onnx.save(s8, str(paths["int8 (int8 weights)"]))
            # What converting costs at load: the runner on the uint8 file, run as stored vs converted to int8.
            loads: dict[str, list[float]] = {"as stored (uint8)": [], "converted to int8": []}
            for _ in range(3):
                for name, weights in (("as stored (uint8)", "uint8"), ("converted to int8", "int8")):
                    t0 = time.perf_counter()
                    runner = OnnxRunner(paths["int8 (uint8 weights)"], threads=threads, int8_weights=weights)
                    loads[name].append(time.perf_counter() - t0)
                    assert runner.int8_weights == weights
            load_s = {name: statistics.median(ts) for name, ts in loads.items()}
            print(f"{size}x{size} runner load (no cache): " + ", ".join(f"{n} {t:.2f} s" for n, t in load_s.items()))
            sessions = {
                name: open_session(str(p), session_options(threads), ["CPUExecutionProvider"])
                for name, p in paths.items()
            }
            for batch in args.batch:
                x = np.random.default_rng(0).normal(0, 1, (batch, 3, size, size)).astype(np.float32)
                times: dict[str, list[float]] = {name: [] for name in sessions}
                for s in sessions.values():  # warm-up
                    s.run(None, {"pixel_values": x})
                for _ in range(args.iters):
                    for name, s in sessions.items():
                        t0 = time.perf_counter()
                        s.run(None, {"pixel_values": x})
                        times[name].append(time.perf_counter() - t0)
                row = {"size": size, "batch": batch, "ms": {}, "spread_ms": {}, "runner_load_s": load_s}
                for name, ts in times.items():
                    row["ms"][name] = 1000 * statistics.median(ts)
                    row["spread_ms"][name] = [1000 * min(ts), 1000 * max(ts)]
                ms = row["ms"]
                row["u8_over_s8"] = ms["int8 (uint8 weights)"] / ms["int8 (int8 weights)"]
                row["fp32_over_u8"] = ms["float32"] / ms["int8 (uint8 weights)"]
                row["fp32_over_s8"] = ms["float32"] / ms["int8 (int8 weights)"]
                results.append(row)
                print(
                    f"{size}x{size} b{batch}: "
                    + ", ".join(
                        f"{n} {ms[n]:.0f} ms [{row['spread_ms'][n][0]:.0f}-{row['spread_ms'][n][1]:.0f}]" for n in ms
                    )
                    + f"; uint8/int8 weights time {row['u8_over_s8']:.3f}, float32/int8: uint8 {row['fp32_over_u8']:.2f}x,"
                    f" int8 {row['fp32_over_s8']:.2f}x"
                )
    if args.json:
        doc = {"date": str(datetime.date.today()), "cpu": cpu_name(), "int8_kernel": kernel, "threads": threads}
        args.json.write_text(json.dumps({**doc, "onnxruntime": ort.__version__, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
