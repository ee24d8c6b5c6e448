"""Spinning vs sleeping intra-op threads beside busy threads: the demo model's forward pass.

    python bench/spin_wait.py [--busy 0 2] [--repeats 20]

The service runs inference in one thread pool and decodes/post-processes in others, on the same cores.
Each case runs in its own process (OpenMP reads its wait policy when torch loads it): torch with
``OMP_WAIT_POLICY`` ACTIVE (spinning) or PASSIVE, ONNX Runtime (``weights/demo/model.onnx``) with
``session.intra_op.allow_spinning`` 1 or 0, 2 intra-op threads, beside ``--busy`` numpy threads doing
what post-processing does (matrix products, exp). Reported: the median forward pass of a 160x224 image.
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
x = np.zeros((1, 3, 160, 224), np.float32)
if runtime == "torch":
    from runtimes import TorchRunner
    run = TorchRunner(None, threads=2).run
else:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    session = ort.InferenceSession("weights/demo/model.onnx", opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    def run(a):
        return session.run(None, {name: a})
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


def case(runtime: str, spin: bool, busy: int, repeats: int) -> float:
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE" if spin else "PASSIVE"}
    out = subprocess.run(
        [sys.executable, "-c", CASE, runtime, "1" if spin else "0", str(busy), str(repeats)],
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
    args = p.parse_args()
    print("| runtime | busy threads | spinning ms | sleeping ms |")
    print("| --- | ---: | ---: | ---: |")
    for runtime in ("torch", "onnxruntime"):
        for busy in args.busy:  # the two policies back to back, per row
            spinning = case(runtime, True, busy, args.repeats)
            sleeping = case(runtime, False, busy, args.repeats)
            print(f"| {runtime} | {busy} | {spinning:.0f} | {sleeping:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
