"""Masked-attention transformer decoder with the class and mask prediction heads.

Layer i cross-attends level ``i % 3`` (strides 32, 16, 8) and each query may only look where its mask
from the previous prediction has sigmoid >= 0.5; a query blocked everywhere attends everywhere
(:mod:`mask2former.attention_mask`). The first mask comes from the learnable query features before layer 0.
The mask is built with elementwise ops only (no boolean indexing, no ``.item()``) so the module traces and
exports.

The mask logits each layer thresholds are computed at the layer's level, from the mask features resized
to it (see :meth:`TransformerDecoder.forward`); ``Mask2Former(..., aux=True)`` returns them.

With ``TransformerDecoder.use_fused_attention`` (off by default; the CUDA runtime turns it on) the
cross-attention gets those mask logits instead and runs the fused Triton kernel of
:mod:`mask2former.masked_attention`, which derives the mask on the fly (attend where logit >= 0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mask2former.attention_mask import attention_mask_at_level
from mask2former.pixel_decoder import NUM_LEVELS, sine_position_embedding
from pipeline.config import Mask2FormerConfig


class Prediction(NamedTuple):
    class_logits: torch.Tensor  # (B, Q, K+1)
    mask_logits: torch.Tensor  # (B, Q, H/4, W/4)


class DecoderOutput(NamedTuple):
    predictions: list[Prediction]  # the last one is the model output; earlier steps only with all_layers
    attention_logits: list[torch.Tensor]  # per layer: the mask logits it attended with, (B, Q, S_l) at its level


class MultiheadAttention(nn.Module):
    """Attention with separate query/key/value inputs and fused in-projection weights (3C, C)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query (B, Q, C), key/value (B, S, C), mask bool (B, 1, Q, S) True = attend -> (B, Q, C).

        With ``mask_logits`` (B, Q, S) instead of ``mask``, the fused masked-attention kernel derives the mask.
        """
        b, nq, c = query.shape
        w, bias = self.in_proj_weight, self.in_proj_bias
        d = c // self.heads
        if key is query:  # self-attention: one projection for q and k
            qk = F.linear(query, w[: 2 * c], bias[: 2 * c]).view(b, nq, 2, self.heads, d).permute(2, 0, 3, 1, 4)
            q, k = qk.unbind(0)  # (B, heads, Q, d)
        else:
            q = F.linear(query, w[:c], bias[:c]).view(b, nq, self.heads, d).transpose(1, 2)
            k = F.linear(key, w[c : 2 * c], bias[c : 2 * c]).view(b, -1, self.heads, d).transpose(1, 2)
        v = F.linear(value, w[2 * c :], bias[2 * c :]).view(b, -1, self.heads, d).transpose(1, 2)
        if mask_logits is not None:
            from mask2former.masked_attention import masked_attention  # lazy: triton (import fixes TRITON_INTERPRET)

            out = masked_attention(q, k, v, mask_logits)  # (B, heads, Q, d)
        else:
            if mask is not None:  # additive: a boolean mask exports as a Where on every head plus a NaN guard
                mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill(~mask, float("-inf"))  # (B, 1, Q, S)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, Q, d)
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, c))


class DecoderLayer(nn.Module):
    """Masked cross-attention, then self-attention, then FFN (post-norm unless ``pre_norm``)."""

    def __init__(self, dim: int, heads: int, ffn: int, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.cross_attn = MultiheadAttention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim)
        self.self_attn = MultiheadAttention(dim, heads)
        self.norm_self = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.norm_ffn = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_pos: torch.Tensor,
        mask: torch.Tensor | None,
        mask_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, Q, C); query_pos (Q, C); memory (B, S, C); memory_pos (S, C); mask (B, 1, Q, S).

        For the fused kernel pass ``mask`` None and ``mask_logits`` (B, Q, S).
        """
        if self.pre_norm:
            y = self.norm_cross(x)
            x = x + self.cross_attn(y + query_pos, memory + memory_pos, memory, mask, mask_logits)
            y = self.norm_self(x)
            q = y + query_pos
            x = x + self.self_attn(q, q, y)
            return x + self.fc2(F.relu(self.fc1(self.norm_ffn(x))))
        x = self.norm_cross(x + self.cross_attn(x + query_pos, memory + memory_pos, memory, mask, mask_logits))
        y = x + query_pos
        x = self.norm_self(x + self.self_attn(y, y, x))
        return self.norm_ffn(x + self.fc2(F.relu(self.fc1(x))))


class MaskHead(nn.Module):
    """3-layer MLP producing per-query mask embeddings."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, out_dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class TransformerDecoder(nn.Module):
    # Cross-attention through the fused Triton kernel (CUDA; the CPU only under TRITON_INTERPRET=1). Set by
    # callers; off keeps the SDPA path with a materialized mask, which is what traces and exports.
    use_fused_attention: bool = False

    def __init__(self, cfg: Mask2FormerConfig):
        super().__init__()
        dim = cfg.hidden_dim
        self.query_feat = nn.Parameter(torch.zeros(cfg.num_queries, dim))
        self.query_pos = nn.Parameter(torch.zeros(cfg.num_queries, dim))
        self.level_embed = nn.Parameter(torch.zeros(NUM_LEVELS, dim))
        project = cfg.feature_size != dim or cfg.enforce_input_projection
        self.input_proj = nn.ModuleList(
            nn.Conv2d(cfg.feature_size, dim, 1) if project else nn.Identity() for _ in range(NUM_LEVELS)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(dim, cfg.num_attention_heads, cfg.dim_feedforward, cfg.pre_norm)
            for _ in range(cfg.decoder_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, cfg.num_labels + 1)
        self.mask_head = MaskHead(dim, cfg.mask_feature_size)

    def predict(self, x: torch.Tensor, mask_features: torch.Tensor) -> Prediction:
        """Class and mask logits from queries (B, Q, C) and mask features (B, C_m, H/4, W/4)."""
        x = self.norm(x)
        embed = self.mask_head(x)  # (B, Q, C_m)
        masks = torch.einsum("bqc,bchw->bqhw", embed, mask_features)  # (B, Q, H/4, W/4)
        return Prediction(self.class_head(x), masks)

    def memory(
        self, multi_scale: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
        """Per level: keys/values (B, S, C) with the level embedding, positions (S, C), and (h, w)."""
        sizes = [(f.shape[-2], f.shape[-1]) for f in multi_scale]  # ints, or symbolic sizes when exporting
        dim = self.query_feat.shape[1]
        memory, memory_pos = [], []
        for lvl, f in enumerate(multi_scale):
            memory.append(self.input_proj[lvl](f).flatten(2).transpose(1, 2) + self.level_embed[lvl])  # (B, S, C)
            memory_pos.append(sine_position_embedding(*sizes[lvl], dim // 2, f.device, f.dtype).flatten(1).T)  # (S, C)
        return memory, memory_pos, sizes

    def forward(
        self, multi_scale: list[torch.Tensor], mask_features: torch.Tensor, all_layers: bool = False
    ) -> DecoderOutput:
        """multi_scale: [(B, C, h_l, w_l)] for strides 32, 16, 8.

        Returns the final prediction, or with ``all_layers`` one prediction per step (the first from the
        learnable queries, then one after each layer; the last is the model output), and the mask logits
        each layer attended with, at its level.

        Those mask logits are computed at the level directly: ``mask_features`` is resized to each level once
        and each step's mask embeddings are projected onto it. Bilinear resizing is linear and acts on each
        channel alone, so this equals resizing the full-resolution mask logits (what the reference does) up to
        float rounding, and skips a full-resolution mask product per layer (bench/ops.py).
        """
        b = mask_features.shape[0]
        memory, memory_pos, sizes = self.memory(multi_scale)
        level_features = [  # (B, C_m, S_l)
            F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False).flatten(2) for size in sizes
        ]
        x = self.query_feat.unsqueeze(0).expand(b, -1, -1)  # (B, Q, C)
        preds, attention_logits = [], []
        for i, layer in enumerate(self.layers):
            lvl = i % NUM_LEVELS
            if all_layers:
                preds.append(self.predict(x, mask_features))
            logits = torch.einsum("bqc,bcs->bqs", self.mask_head(self.norm(x)), level_features[lvl])  # (B, Q, S)
            attention_logits.append(logits)
            if self.use_fused_attention:
                x = layer(x, self.query_pos, memory[lvl], memory_pos[lvl], None, logits)
            else:
                x = layer(x, self.query_pos, memory[lvl], memory_pos[lvl], attention_mask_at_level(logits))
        preds.append(self.predict(x, mask_features))
        return DecoderOutput(preds, attention_logits)
