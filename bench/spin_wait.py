"""Spinning vs sleeping intra-op threads beside busy threads: one model's forward pass.

    python bench/spin_wait.py [--busy 0 2] [--repeats 20]
    python bench/spin_wait.py --model CHECKPOINT --onnx MODEL.onnx --size 384x512 --busy 0 --rounds 3

The service runs inference in one thread pool and decodes/post-processes in others, on the same cores.
Each case runs in its own process (OpenMP reads its wait policy when torch loads it): torch with
``OMP_WAIT_POLICY`` ACTIVE (spinning) or PASSIVE, ONNX Runtime (``weights/demo/model.onnx``) with
``session.intra_op.allow_spinning`` 1 or 0, 2 intra-op threads, beside ``--busy`` numpy threads doing
what post-processing does (matrix products, exp). Reported: the median forward pass of a ``--size`` image
(160x224 by default). The runners are the service's (``TorchRunner``, ``OnnxRunner`` with its session
settings, spinning aside); by default on the demo model (``weights/demo/model.onnx`` for ONNX Runtime).
``--rounds`` repeats every row, the two policies in alternating order.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CASE = r"""
import json, sys, threading, time
import numpy as np
runtime, spin, busy, repeats = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
model, (h, w) = sys.argv[5] or None, map(int, sys.argv[6].split("x"))
x = np.zeros((1, 3, h, w), np.float32)
if runtime == "torch":
    from runtimes import TorchRunner
    run = TorchRunner(model, threads=2).run
else:
    import runtimes.onnx_runner as onnx_runner
    from runtimes import OnnxRunner
    options = onnx_runner.session_options
    def spinning_options(threads):
        opts = options(threads)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")  # replaces the entry
        return opts
    onnx_runner.session_options = spinning_options
    run = OnnxRunner(model or "weights/demo/model.onnx", threads=2).run
for _ in range(3):
    run(x)
stop = False
def burn():
    a = np.random.default_rng(0).random((300, 300), dtype=np.float32)
    while not stop:
        (a @ a).sum()
        np.exp(a)
threads = [threading.Thread(target=burn) for _ in range(busy)]
for t in threads:
    t.start()
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    run(x)
    times.append(time.perf_counter() - t0)
stop = True
for t in threads:
    t.join()
print(json.dumps({"median_ms": 1000 * float(np.median(times))}))
"""


def case(runtime: str, spin: bool, busy: int, repeats: int, model: str, size: str) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE" if spin else "PASSIVE"}
    out = subprocess.run(
        [sys.executable, "-c", CASE, runtime, "1" if spin else "0", str(busy), str(repeats), model, size],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", type=int, nargs="+", default=[0, 2], help="busy numpy threads beside (default 0 2)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--model", default="", help="torch: checkpoint folder (default: the demo model)")
    p.add_argument("--onnx", default="", help="ONNX Runtime: .onnx file (default: weights/demo/model.onnx)")
    p.add_argument("--size", default="160x224", help="input HxW (default 160x224)")
    p.add_argument("--runtimes", nargs="+", choices=("torch", "onnxruntime"), default=["torch", "onnxruntime"])
    p.add_argument("--rounds", type=int, default=1, help="times each row is measured (default 1)")
    args = p.parse_args()
    print(f"input {args.size}, {args.repeats} passes per case, median")
    print("| runtime | busy threads | spinning ms | sleeping ms |")
    print("| --- | ---: | ---: | ---: |")
    for runtime in args.runtimes:
        model = args.model if runtime == "torch" else args.onnx
        for busy in args.busy:  # the two policies back to back, per row, in alternating order
            for rnd in range(args.rounds):
                order = (True, False) if rnd % 2 == 0 else (False, True)
                ms = {spin: case(runtime, spin, busy, args.repeats, model, args.size) for spin in order}
                print(f"| {runtime} | {busy} | {ms[True]:.0f} | {ms[False]:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
