"""Does this CPU compute an int8 graph's integer products exactly? Per MatMulInteger, ONNX Runtime's int32
output against the exact product of the same uint8 activations and weights (numpy, int64).

ONNX Runtime's u8 x s8 kernels on x86-64 CPUs without VNNI (AVX2, AVX-512F/BW) multiply with VPMADDUBSW,
which adds pairs of u8*s8 products into int16 with saturation: 255*127*2 = 64770 does not fit, so entries
where both products of a pair are large come out clipped. With VNNI (VPDPBUSD, AVX-VNNI, AMX) the sums are
int32 and exact, and u8 x u8 is exact everywhere (model_format.int8).

    python bench/int8_saturation.py model-int8.onnx [--weights as-stored|uint8|int8] [--size 160] [--images 1]

Run it on the hosts you serve from, or under an emulator of one (``qemu-x86_64 -cpu max python ...`` is
AVX2 without VNNI). ``--weights`` first converts the file's weights (exactly) to that type, as the runner
does. One row per MatMulInteger: the share of wrong entries and the largest error relative to the largest
exact value; every row is 0 where the kernel is exact.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_format.int8 import cpu_int8_kernel, integer_matmul_errors, integer_matmul_weights, store_weights  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="an int8 graph written by `m2f export onnx --quantize int8`")
    ap.add_argument("--weights", choices=["as-stored", "uint8", "int8"], default="as-stored")
    ap.add_argument("--size", type=int, default=160, help="input side for dynamic graphs")
    ap.add_argument("--images", type=int, default=1, help="batch of random images for dynamic graphs")
    args = ap.parse_args()

    model = onnx.load(str(args.model))
    if args.weights != "as-stored":
        store_weights(model, args.weights)
    stored = sorted(set(integer_matmul_weights(model).values()))
    inp = model.graph.input[0]
    dims = [d.dim_value or None for d in inp.type.tensor_type.shape.dim]
    shape = [dims[0] or args.images, 3, dims[2] or args.size, dims[3] or args.size]
    x = np.random.default_rng(0).normal(0, 1, shape).astype(np.float32)
    rows = integer_matmul_errors(model, {inp.name: x})

    print(f"this CPU's u8 x s8 kernel (measured): {cpu_int8_kernel()}; weights stored as {', '.join(stored)}")
    print(f"{'MatMulInteger':60s} {'wrong':>9s} {'max err / max':>14s}")
    for name, wrong, total, rel in rows:
        print(f"{name[:60]:60s} {wrong / total:9.2%} {rel:14.2e}")
    wrong, total = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"all {len(rows)} MatMulInteger outputs: {wrong} of {total} entries wrong ({wrong / max(1, total):.3%})")


if __name__ == "__main__":
    main()
