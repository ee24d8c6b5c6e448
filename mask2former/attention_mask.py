"""The masked-attention rule: where each decoder query may attend at a feature level.

A query attends the pixels where the sigmoid of its mask logits (resized bilinearly to the level) is >= 0.5;
a query blocked everywhere attends everywhere. Elementwise ops only, so it traces and exports. Used by the
decoder (:mod:`mask2former.transformer_decoder`), the fused kernel's reference
(:mod:`mask2former.masked_attention`) and the export check (:mod:`model_export.check`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_mask(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Where each query may attend at a feature level: (B, Q, H/4, W/4) -> bool (B, 1, Q, h*w).

    True means attend. Blocked pixels have sigmoid(logit) < 0.5 after bilinear resizing to ``size``;
    rows blocked everywhere are opened fully.
    """
    return attention_mask_at_level(level_mask_logits(mask_logits, size))


def attention_mask_at_level(level_logits: torch.Tensor) -> torch.Tensor:
    """The attend rule on mask logits already at the level: (B, Q, S) -> bool (B, 1, Q, S), True = attend."""
    # 0.5 as a tensor of the logits' dtype: a Python scalar makes the exporter compare in float32 even in a
    # float16 graph. The same comparison in float32.
    half = torch.full((), 0.5, dtype=level_logits.dtype, device=level_logits.device)
    attend = level_logits.sigmoid() >= half  # (B, Q, S)
    anywhere = attend.any(dim=-1, keepdim=True)  # (B, Q, 1)
    return (attend | ~anywhere).unsqueeze(1)


def level_mask_logits(mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Mask logits at a feature level: (B, Q, H/4, W/4) -> (B, Q, h*w), bilinear (align_corners=False); the
    input of :func:`attention_mask_at_level` and of the fused kernel."""
    return F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False).flatten(2)
