"""The Mask2Former model: Swin or ResNet backbone -> pixel decoder -> masked-attention transformer decoder."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from mask2former.pixel_decoder import PixelDecoder
from mask2former.resnet import ResNetBackbone
from mask2former.swin import SwinBackbone
from mask2former.transformer_decoder import Prediction, TransformerDecoder
from pipeline.config import BackboneConfig, Mask2FormerConfig, ResNetConfig


class Mask2FormerOutput(NamedTuple):
    class_logits: torch.Tensor  # (B, Q, K+1); the last class is "no object"
    mask_logits: torch.Tensor  # (B, Q, H/4, W/4)
    aux: tuple[Prediction, ...] | None = None  # earlier predictions, first to last, when asked for
    # With aux: per decoder layer, the mask logits its attention mask came from, (B, Q, S_l) at its level.
    attention_logits: tuple[torch.Tensor, ...] | None = None


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The backbone for a backbone config; ``forward(pixel_values)`` returns the maps at strides 4..32."""
    if isinstance(cfg, ResNetConfig):
        return ResNetBackbone(cfg)
    return SwinBackbone(cfg)


class Mask2Former(nn.Module):
    """Mask2Former for semantic, instance and panoptic segmentation.

    ``forward(pixel_values)`` takes normalized images (B, 3, H, W) float32 (H, W multiples of 32 for the
    intended resolution; other sizes work, each stride-s map having sides ceil(H / s), ceil(W / s)) and
    returns class and mask logits. The backbone is Swin or ResNet, after the type of ``cfg.backbone``.
    """

    def __init__(self, cfg: Mask2FormerConfig):
        super().__init__()
        self.config = cfg
        self.backbone = build_backbone(cfg.backbone)
        self.pixel_decoder = PixelDecoder(cfg)
        self.decoder = TransformerDecoder(cfg)

    def forward(self, pixel_values: torch.Tensor, aux: bool = False) -> Mask2FormerOutput:
        features = self.backbone(pixel_values)  # strides 4, 8, 16, 32
        mask_features, multi_scale = self.pixel_decoder(features)
        preds, attention_logits = self.decoder(multi_scale, mask_features, all_layers=aux)
        last = preds[-1]
        if not aux:
            return Mask2FormerOutput(last.class_logits, last.mask_logits)
        return Mask2FormerOutput(last.class_logits, last.mask_logits, tuple(preds[:-1]), tuple(attention_logits))
