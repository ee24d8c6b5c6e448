"""Multi-scale deformable-attention pixel decoder (MSDeformAttn encoder + one FPN level).

Written in pure PyTorch: the deformable sampling is ``grid_sample`` (bilinear, zero padding,
align_corners=False), which exports to ONNX ``GridSample``. Every tensor is float32, as in the reference.
Levels are ordered coarse to fine: level 0 is stride 32, level 1 stride 16, level 2 stride 8.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Mask2FormerConfig

NUM_LEVELS = 3
NUM_POINTS = 4


def sine_position_embedding(
    h: int, w: int, num_feats: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Normalized 2-D sine embedding, (2*num_feats, H, W): y features then x features.

    Channel pairs (2i, 2i+1) hold sin/cos of position / 10000^(2i/num_feats), positions scaled to (0, 2pi].
    ``h`` and ``w`` may be symbolic (export): the normalizer ``n + eps`` is taken from the float32 position
    tensor itself, so no Python float is computed from a shape (it would become a float64 in ONNX). It
    rounds to the same float32 as ``float(n) + eps`` for every n < 2^24. Computed in ``dtype`` (float32
    unless exporting a float16 graph).
    """
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=dtype, device=device)  # (H,) 1..H
    x = torch.arange(1, w + 1, dtype=dtype, device=device)  # (W,) 1..W
    y = y / (y[-1] + eps) * scale
    x = x / (x[-1] + eps) * scale
    i = torch.arange(num_feats, dtype=dtype, device=device)
    dim_t = 10000 ** (2 * torch.div(i, 2, rounding_mode="floor") / num_feats)  # (F,)

    def embed(pos: torch.Tensor) -> torch.Tensor:
        p = pos[:, None] / dim_t  # (N, F)
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)  # (N, F) interleaved

    ey = embed(y)[:, None, :].expand(h, w, num_feats)
    ex = embed(x)[None, :, :].expand(h, w, num_feats)
    return torch.cat((ey, ex), dim=2).permute(2, 0, 1)  # (2F, H, W)


def ms_deform_attn(
    value: torch.Tensor,
    shapes: list[tuple[int, int]],
    locations: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention core.

    Args:
        value: (B, S, heads, d) values of all levels, flattened and concatenated.
        shapes: (H_l, W_l) of each level.
        locations: (B, Sq, heads, L, P, 2) sampling points, (x, y) in [0, 1].
        weights: (B, Sq, heads, L, P) attention weights (softmax over L*P).
    Returns:
        (B, Sq, heads*d)
    """
    b, _, heads, d = value.shape
    _, sq, _, _, points, _ = locations.shape
    grids = 2 * locations - 1
    per_level = value.split([h * w for h, w in shapes], dim=1)
    out = torch.zeros(b * heads, d, sq, dtype=value.dtype, device=value.device)
    # One level at a time: sample with the points as the outer axis of the grid, so each point's samples are
    # one contiguous slice, then accumulate weight x sample one point at a time with a fused multiply-add.
    # Never materializes the (B*heads, d, L*P, Sq) stack of all samples, and several times faster on the CPU
    # than (samples * weights).sum(-1) (bench/ops.py).
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(b * heads, d, h, w)  # (B*heads, d, H, W)
        g = grids[:, :, :, lvl].permute(0, 2, 3, 1, 4).reshape(b * heads, points, sq, 2)  # (B*heads, P, Sq, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*heads, d, P, Sq)
        a = weights[:, :, :, lvl].permute(0, 2, 3, 1).reshape(b * heads, 1, points, sq)  # (B*heads, 1, P, Sq)
        if torch.compiler.is_exporting() and value.dtype == torch.float32:
            # In an ONNX graph the per-point slices are a Split plus a Mul and an Add per point; one Mul and
            # one ReduceSum is faster in ONNX Runtime (bench/onnxruntime_profile.py). Float32 only: the
            # exporter widens a float16 sum to float32.
            out = out + (sampled * a).sum(2)  # (B*heads, d, Sq)
            continue
        for p in range(points):
            out.addcmul_(sampled[:, :, p], a[:, :, p])  # (B*heads, d, Sq)
    return out.view(b, heads * d, sq).transpose(1, 2)  # (B, Sq, heads*d)


class MSDeformAttn(nn.Module):
    def __init__(self, dim: int, heads: int, levels: int = NUM_LEVELS, points: int = NUM_POINTS):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(
        self,
        query: torch.Tensor,
        reference: torch.Tensor,
        value: torch.Tensor,
        shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """query (B, S, C) with position added; value (B, S, C) -> (B, S, C).

        ``reference``: the query positions in [0, 1] as :meth:`broadcast_reference` gives them,
        (1, S, heads, L, P, 2).
        """
        b, s, c = query.shape
        v = self.value_proj(value).view(b, s, self.heads, c // self.heads)
        # The offsets are in pixels of each level; dividing the projection's rows by the level size (W_l or
        # H_l) gives them in [0, 1] units directly, instead of dividing every offset (a broadcast over
        # (B, S, heads, L, P, 2) that costs ONNX Runtime more than the matmul).
        normalizer = _level_sizes(shapes, query.device, query.dtype)  # (L, 2) as (W_l, H_l)
        rows = normalizer[None, :, None, :].expand(self.heads, -1, self.points, -1).reshape(-1, 1)  # (heads*L*P*2, 1)
        proj = self.sampling_offsets
        offsets = F.linear(query, proj.weight / rows, proj.bias / rows[:, 0])  # (B, S, heads*L*P*2)
        offsets = offsets.view(b, s, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(b, s, self.heads, self.levels * self.points)
        weights = weights.softmax(-1).view(b, s, self.heads, self.levels, self.points)
        locations = reference + offsets  # (B, S, heads, L, P, 2)
        return self.output_proj(ms_deform_attn(v, shapes, locations, weights))

    def broadcast_reference(self, reference: torch.Tensor) -> torch.Tensor:
        """(S, 2) -> (1, S, heads, L, P, 2), materialized. The encoder does this once for all its layers: each
        layer then adds it without broadcasting inside a row, which costs ONNX Runtime several times more."""
        s = reference.shape[0]
        return (
            reference[None, :, None, None, None, :].expand(1, s, self.heads, self.levels, self.points, 2).contiguous()
        )


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, reference: torch.Tensor, shapes) -> torch.Tensor:
        """(B, S, C) -> (B, S, C); post-norm."""
        x = self.norm1(x + self.self_attn(x + pos, reference, x, shapes))
        return self.norm2(x + self.fc2(F.relu(self.fc1(x))))


def conv_norm(cin: int, cout: int, kernel: int, bias: bool, relu: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias),
        nn.GroupNorm(32, cout),
    ]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PixelDecoder(nn.Module):
    """Backbone features -> (mask features at stride 4, [stride 32, 16, 8] features for the decoder)."""

    def __init__(self, cfg: Mask2FormerConfig):
        super().__init__()
        dim = cfg.feature_size
        channels = cfg.backbone.stage_channels  # strides 4, 8, 16, 32
        self.level_embed = nn.Parameter(torch.zeros(NUM_LEVELS, dim))
        # input_proj[l] projects level l (stride 32, 16, 8).
        self.input_proj = nn.ModuleList(conv_norm(c, dim, 1, bias=True) for c in channels[::-1][:NUM_LEVELS])
        self.encoder = nn.ModuleList(
            EncoderLayer(dim, cfg.num_attention_heads, cfg.encoder_feedforward_dim) for _ in range(cfg.encoder_layers)
        )
        # FPN from stride 8 down to the common stride 4: one lateral and one output conv.
        self.lateral = conv_norm(channels[0], dim, 1, bias=False)
        self.output = conv_norm(dim, dim, 3, bias=False, relu=True)
        self.mask_proj = nn.Conv2d(dim, cfg.mask_feature_size, 1)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """features: backbone maps at strides 4, 8, 16, 32.

        Returns mask features (B, mask_dim, H/4, W/4) and [(B, C, H/32, W/32), (.., H/16, ..), (.., H/8, ..)].
        """
        levels = features[::-1][:NUM_LEVELS]  # strides 32, 16, 8
        shapes = [(f.shape[-2], f.shape[-1]) for f in levels]  # ints, or symbolic sizes when exporting
        device = levels[0].device
        b = levels[0].shape[0]
        dim = self.level_embed.shape[1]
        x = torch.cat([proj(f).flatten(2) for proj, f in zip(self.input_proj, levels)], dim=2).transpose(1, 2)
        pos = torch.cat(
            [
                sine_position_embedding(h, w, dim // 2, device, x.dtype).flatten(1).T + self.level_embed[lvl]
                for lvl, (h, w) in enumerate(shapes)
            ]
        )[None]  # (1, S, C)
        reference = torch.cat([_reference_points(h, w, device, x.dtype) for h, w in shapes])  # (S, 2)
        reference = self.encoder[0].self_attn.broadcast_reference(reference)  # (1, S, heads, L, P, 2)
        for layer in self.encoder:
            x = layer(x, pos, reference, shapes)  # (B, S, C)
        outs = [
            t.transpose(1, 2).reshape(b, dim, h, w)
            for t, (h, w) in zip(x.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        lateral = self.lateral(features[0])  # (B, C, H/4, W/4)
        fpn = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        fpn = self.output(fpn)
        return self.mask_proj(fpn), outs


def _level_sizes(shapes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(L, 2) (W_l, H_l) per level; built with ``full``/``stack``, not ``torch.tensor``, so that symbolic
    sizes stay symbolic when exporting."""

    def scalar(n: int) -> torch.Tensor:
        return torch.full((), n, dtype=dtype, device=device)

    return torch.stack([torch.stack((scalar(w), scalar(h))) for h, w in shapes])


def _reference_points(h: int, w: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(H*W, 2) pixel centres (x, y) normalized to [0, 1]."""
    ys = (torch.arange(h, dtype=dtype, device=device) + 0.5) / h
    xs = (torch.arange(w, dtype=dtype, device=device) + 0.5) / w
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx.reshape(-1), gy.reshape(-1)), dim=1)
