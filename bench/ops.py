"""The op-level choices behind our eager speed, each timed against the obvious alternative.

    python bench/ops.py [--size 640] [--iters 20]

1. Swin window attention: ``scaled_dot_product_attention`` on 4-D (B*nW, heads, N, d) tensors (ours),
   against the same call on 5-D (B, nW, heads, N, d) tensors and against matmul + softmax (what
   ``transformers`` does). Shapes: swin-tiny stage 1 for a size x size input.
2. MSDeformAttn reduction of the sampled values: one fused multiply-add per sampling point on samples laid
   out points-major (N, d, P, Sq) so that each point's slice is contiguous (ours), against the same on
   points-last samples (N, d, Sq, P) and against ``(samples * weights).sum(-1)``. Shapes: one level's
   samples for the queries of all three levels of a size x size input.
3. The mask logits each decoder layer attends with: the mask embeddings projected onto the mask features
   resized to the layer's level (ours), against projecting at 1/4 resolution and resizing the logits (the
   reference). Shapes: swin-tiny COCO (100 queries, 256 channels), the 9 layers of one forward pass.

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
    samples = torch.randn(n, d, points, sq, generator=gen)  # points-major, as grid_sample gives them to us
    weights = torch.rand(n, 1, points, sq, generator=gen)
    samples_last, weights_last = samples.permute(0, 1, 3, 2).contiguous(), weights.permute(0, 1, 3, 2).contiguous()

    def ours():
        out = torch.zeros(n, d, sq)
        for p in range(points):
            out.addcmul_(samples[:, :, p], weights[:, :, p])
        return out

    def points_last():
        out = torch.zeros(n, d, sq)
        for p in range(points):
            out.addcmul_(samples_last[..., p], weights_last[..., p])
        return out

    def mul_sum():
        return (samples_last * weights_last).sum(-1)

    report(
        f"MSDeformAttn reduction, one level: {n} x {d} x {sq} queries x {points} points",
        ours,
        {"points last   ": points_last, "mul + sum     ": mul_sum},
        iters,
    )


def level_mask_logits(size: int, iters: int) -> None:
    gen = torch.Generator().manual_seed(0)
    queries, channels, layers = 100, 256, 9
    features = torch.randn(1, channels, size // 4, size // 4, generator=gen)  # mask features, 1/4 resolution
    embeds = [torch.randn(1, queries, channels, generator=gen) for _ in range(layers)]  # each step's embeddings
    levels = [(size // s, size // s) for s in (32, 16, 8)]

    def resize(t: torch.Tensor, lvl: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(t, size=lvl, mode="bilinear", align_corners=False).flatten(2)

    def ours():  # the features resized once per level, then a small product per layer
        level_features = [resize(features, lvl) for lvl in levels]
        return torch.cat([torch.einsum("bqc,bcs->bqs", e, level_features[i % 3]) for i, e in enumerate(embeds)], -1)

    def full_resolution():  # a 1/4-resolution product per layer, then its logits resized
        return torch.cat(
            [resize(torch.einsum("bqc,bchw->bqhw", e, features), levels[i % 3]) for i, e in enumerate(embeds)], -1
        )

    report(
        f"Mask logits of the {layers} decoder layers, {queries} queries x {channels} channels at {size}x{size}",
        ours,
        {"full res+resize": full_resolution},
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
        level_mask_logits(args.size, args.iters)


if __name__ == "__main__":
    main()
