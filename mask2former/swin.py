"""Swin Transformer backbone (tiny/small/base/large) returning the four stage feature maps.

Tokens stay in (B, H, W, C) layout inside a stage. Any input size works: the patch embedding pads to the
patch size, each block pads to a multiple of the window, and patch merging pads odd sizes, all on the
right/bottom with zeros, as the reference does. Window and shift sizes never shrink with the input
(the detectron2 behaviour, also what HF's ``SwinBackbone`` does for Mask2Former).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import SwinConfig


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``.

    Written as ``ceil_div * multiple`` rather than ``n + (-n) % multiple`` (the same integer) so that, with
    symbolic shapes during export, divisibility of the result is evident to the shape solver.
    """
    return (n + multiple - 1) // multiple * multiple


def relative_position_index(window: int) -> torch.Tensor:
    """(window², window²) index into the (2w-1)² relative-position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    rel = rel + (window - 1)
    return rel[0] * (2 * window - 1) + rel[1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, window², C); H and W are multiples of ``window``."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // window) * (w // window), window * window, c)


def window_merge(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B, nW, window², C) -> (B, H, W, C)."""
    b, _, _, c = x.shape
    x = x.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def shifted_window_mask(
    h: int, w: int, window: int, shift: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(nW, 1, window², window²) additive mask: -100 between tokens from different shifted regions.

    Built in ``dtype`` throughout (no float32 intermediate in a float16 export).
    """

    def regions(n: int) -> torch.Tensor:
        idx = torch.arange(n, device=device)
        return (idx >= n - window).long() + (idx >= n - shift).long()

    region = (regions(h)[:, None] * 3 + regions(w)[None, :]).to(dtype)  # (H, W), values 0..8
    region = window_partition(region[None, :, :, None], window)[0, :, :, 0]  # (nW, window²)
    diff = region[:, None, :] - region[:, :, None]  # (nW, window², window²)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)[:, None]


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.patch = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.norm = nn.LayerNorm(cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/p, W/p, C)."""
        h, w = x.shape[-2:]
        x = F.pad(x, (0, round_up(w, self.patch) - w, 0, round_up(h, self.patch) - h))
        x = self.proj(x).permute(0, 2, 3, 1)  # (B, H/p, W/p, C)
        return self.norm(x)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.window = window
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("rel_index", relative_position_index(window).flatten(), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(B, nW, N, C) windows of N = window² tokens -> same shape. ``mask``: (nW, 1, N, N) or None."""
        b, nw, n, c = x.shape
        qkv = self.qkv(x).view(b * nw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B*nW, heads, N, d)
        bias = self.relative_position_bias_table[self.rel_index].view(n, n, self.heads).permute(2, 0, 1)
        bias = bias.unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:
            bias = (bias + mask).unsqueeze(0).expand(b, nw, -1, -1, -1).reshape(b * nw, -1, n, n)  # (B*nW, heads, N, N)
        # 4-D inputs: on the CPU this takes the fused flash-attention kernel; 5-D ones fall back to a
        # kernel ~7x slower (bench/ops.py).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B*nW, heads, N, d)
        out = out.transpose(1, 2).reshape(b, nw, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, cfg: SwinConfig, shift: int):
        super().__init__()
        self.window = cfg.window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = WindowAttention(dim, heads, cfg.window_size, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, shift_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C). ``shift_mask`` is used by shifted blocks only."""
        b, h, w, c = x.shape
        ws = self.window
        hp, wp = round_up(h, ws), round_up(w, ws)
        y = F.pad(self.norm1(x), (0, 0, 0, wp - w, 0, hp - h))  # (B, Hp, Wp, C)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, ws), shift_mask if self.shift else None)  # (B, nW, ws², C)
        y = window_merge(y, ws, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y[:, :h, :w]
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""
        h, w = x.shape[1], x.shape[2]
        x = F.pad(x, (0, 0, 0, round_up(w, 2) - w, 0, round_up(h, 2) - h))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, cfg: SwinConfig, downsample: bool):
        super().__init__()
        self.window = cfg.window_size
        self.shift = cfg.window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, cfg, shift=0 if i % 2 == 0 else self.shift) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, C) -> (stage output (B, H, W, C), input of the next stage)."""
        h, w = x.shape[1], x.shape[2]
        hp, wp = round_up(h, self.window), round_up(w, self.window)
        shift_mask = (
            shifted_window_mask(hp, wp, self.window, self.shift, x.device, x.dtype) if len(self.blocks) > 1 else None
        )
        for block in self.blocks:
            x = block(x, shift_mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class SwinBackbone(nn.Module):
    """Swin Transformer returning normalized feature maps at strides 4, 8, 16 and 32."""

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        n = len(cfg.depths)
        self.stages = nn.ModuleList(
            SwinStage(cfg.stage_channels[i], cfg.depths[i], cfg.num_heads[i], cfg, downsample=i < n - 1)
            for i in range(n)
        )
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in cfg.stage_channels)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, C_i, H/2^(i+2), W/2^(i+2)) for i in 0..3] (sizes rounded up)."""
        x = self.patch_embed(pixel_values)  # (B, H/4, W/4, C)
        features = []
        for stage, norm in zip(self.stages, self.out_norms):
            out, x = stage(x)
            features.append(norm(out).permute(0, 3, 1, 2).contiguous())  # (B, C_i, H_i, W_i)
        return features
