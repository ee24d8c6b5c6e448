"""The two op-level choices behind our eager speed, each timed against the obvious alternative.

    python bench/ops.py [--size 640] [--iters 20]

1. Swin window attention: ``scaled_dot_product_attention`` on 4-D (B*nW, heads, N, d) tensors (ours),
   against the same call on 5-D (B, nW, heads, N, d) tensors and against matmul + softmax (what
   ``transformers`` does). Shapes: swin-tiny stage 1 for a size x size input.
2. MSDeformAttn reduction of the sampled values: one fused multiply-add per sampling point (ours),
   against ``(samples * weights).sum(-1)``. Shapes: the stride-8 level for a size x size input.

Each pair is checked to give the same result before it is timed; medians in ms and the ratio are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def report(title: str, ours, others: dict, iters: int) -> None:
    ref = ours()
    t_ours = median_ms(ours, iters)
    print(f"{title}\n  ours: {t_ours:8.2f} ms")
    for name, fn in others.items():
        diff = (fn() - ref).abs().max().item()
        assert diff < 1e-4, f"{name} disagrees with ours by {diff}"
        t = median_ms(fn, iters)
        print(f"  {name}: {t:8.2f} ms   ({t / t_ours:.1f}x ours; max |diff| {diff:.1e})")


def window_attention(size: int, iters: int) -> None:
    gen = torch.Generator().manual_seed(0)
    side = -(-(size // 4) // 7) * 7  # stage-1 map padded to the 7x7 windows
    b, nw, heads, n, d = 1, (side // 7) ** 2, 3, 49, 32
    q, k, v = (torch.randn(b, nw, heads, n, d, generator=gen) for _ in range(3))
    mask = torch.randn(1, heads, n, n, generator=gen) + torch.where(
        torch.rand(nw, 1, n, n, generator=gen) < 0.3, -100.0, 0.0
    )
    q4, k4, v4 = (t.reshape(b * nw, heads, n, d) for t in (q, k, v))

    def ours():
        return F.scaled_dot_product_attention(
            q4, k4, v4, attn_mask=mask.expand(b, nw, heads, n, n).reshape(b * nw, heads, n, n)
        )

    def five_d():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(b * nw, heads, n, d)

    def matmul_softmax():
        attn = (q * d**-0.5) @ k.transpose(-2, -1) + mask
        return (attn.softmax(-1) @ v).reshape(b * nw, heads, n, d)

    report(
        f"Swin window attention, {nw} windows x {heads} heads x {n} tokens (swin-tiny stage 1 at {size}x{size})",
        ours,
        {"5-D SDPA      ": five_d, "matmul+softmax": matmul_softmax},
        iters,
    )


def deform_reduction(size: int, iters: int) -> None:
    gen = torch.Generator().manual_seed(0)
    n, d, points = 8, 32, 4  # batch 1 x 8 heads, head dim 32, 4 points
    sq = sum((size // s) ** 2 for s in (8, 16, 32))
    samples = torch.randn(n, d, sq, points, generator=gen)
    weights = torch.rand(n, 1, sq, points, generator=gen)

    def ours():
        out = torch.zeros(n, d, sq)
        for p in range(points):
            out.addcmul_(samples[..., p], weights[..., p])
        return out

    def mul_sum():
        return (samples * weights).sum(-1)

    report(
        f"MSDeformAttn reduction, one level: {n} x {d} x {sq} queries x {points} points",
        ours,
        {"mul + sum     ": mul_sum},
        iters,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=640, help="input side (default 640)")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with torch.inference_mode():
        window_attention(args.size, args.iters)
        deform_reduction(args.size, args.iters)


if __name__ == "__main__":
    main()
