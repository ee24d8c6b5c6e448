"""ResNet-50/101 backbone with detectron2 semantics, returning the four stage feature maps.

What the official Mask2Former R50/R101 configs build (detectron2 ``build_resnet_backbone``): a basic stem
(7x7 stride-2 convolution, norm, ReLU, 3x3 stride-2 max-pool with padding 1), then stages res2..res5 of
bottleneck blocks (1x1 -> 3x3 -> 1x1) with the stride in the 3x3 convolution (``STRIDE_IN_1X1: False``),
no convolution biases, and a 1x1 projection shortcut (+ norm) where a block changes the channels or the
resolution (the first block of each stage). This is also ``transformers``' ``ResNetBackbone`` with
``layer_type="bottleneck"``, ``downsample_in_bottleneck=False`` and ``downsample_in_first_stage=False``.

Any input size works without padding: every strided layer pads so that its output is ``ceil(input / 2)``,
so the maps have sides ``ceil(H / 4)``, ``ceil(H / 8)``, ``ceil(H / 16)``, ``ceil(H / 32)`` (what the
Swin backbone and the reference give too).

Norms are frozen batch norms. Their statistics are folded when a checkpoint is loaded
(:func:`fold_batch_norm`), so the model holds one per-channel ``scale`` and ``shift`` per norm and computes
``x * scale + shift``: a plain affine that traces and exports as Mul/Add (ONNX Runtime folds it into the
preceding Conv). The folding is not done into the convolution weights, so each checkpoint tensor still
has one place in the model and key mapping stays a rename plus this fold.

Parameter names follow detectron2's, so that its checkpoints map one to one (conv weights) or through the
fold (norms): ``stem.conv1.weight``, ``stem.conv1.norm.{scale,shift}``, ``res2.0.conv1.weight``,
``res2.0.conv1.norm.{scale,shift}`` (``conv2``, ``conv3`` alike), ``res2.0.shortcut.weight``,
``res2.0.shortcut.norm.{scale,shift}``; detectron2 has ``*.norm.{weight,bias,running_mean,running_var}``
where we have ``*.norm.{scale,shift}``, so copying its norm tensors unfolded fails loudly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ResNetConfig


def fold_batch_norm(
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen batch-norm statistics as one per-channel affine: ``bn(x) == x * scale + shift``.

    Computed in float64 and returned in ``weight``'s dtype.

    Args:
        weight, bias, running_mean, running_var: (C,) each.
        eps: the batch norm's epsilon (1e-5 in detectron2's ``FrozenBatchNorm2d`` and torch's ``BatchNorm2d``).
    Returns:
        (scale, shift), (C,) each.
    """
    w, b, mean, var = (t.double() for t in (weight, bias, running_mean, running_var))
    scale = w * torch.rsqrt(var + eps)
    shift = b - mean * scale
    return scale.to(weight.dtype), shift.to(weight.dtype)


class FrozenBatchNorm2d(nn.Module):
    """Batch norm in eval mode with its statistics folded in: ``x * scale + shift`` per channel.

    ``scale`` and ``shift`` are buffers (nothing here trains); :func:`fold_batch_norm` computes them from a
    checkpoint's ``weight``, ``bias``, ``running_mean`` and ``running_var``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("shift", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        return x * self.scale[:, None, None] + self.shift[:, None, None]  # scale, shift: (C, 1, 1)


class Conv2dNorm(nn.Conv2d):
    """A bias-free convolution followed by a frozen batch norm (detectron2's ``Conv2d(..., norm=...)``).

    Parameters: ``weight`` (C_out, C_in, k, k) and ``norm.{scale,shift}`` (C_out,).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, bias=False
        )
        self.norm = FrozenBatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))."""
        return self.norm(super().forward(x))


class BasicStem(nn.Module):
    """7x7 stride-2 convolution, norm, ReLU, then a 3x3 stride-2 max-pool: stride 4 in all."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = Conv2dNorm(in_channels, out_channels, kernel_size=7, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, ceil(H / 4), ceil(W / 4))."""
        x = F.relu(self.conv1(x))  # (B, C, ceil(H/2), ceil(W/2))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand; residual add, then ReLU.

    The shortcut is a 1x1 projection with norm when the block changes channels or resolution, else the
    identity (``shortcut`` is then None).
    """

    def __init__(self, in_channels: int, bottleneck_channels: int, out_channels: int, stride: int):
        super().__init__()
        projects = in_channels != out_channels or stride != 1
        self.shortcut = Conv2dNorm(in_channels, out_channels, kernel_size=1, stride=stride) if projects else None
        self.conv1 = Conv2dNorm(in_channels, bottleneck_channels, kernel_size=1)
        self.conv2 = Conv2dNorm(bottleneck_channels, bottleneck_channels, kernel_size=3, stride=stride)
        self.conv3 = Conv2dNorm(bottleneck_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))."""
        y = F.relu(self.conv1(x))  # (B, C_b, H, W)
        y = F.relu(self.conv2(y))  # (B, C_b, H', W')
        y = self.conv3(y)  # (B, C_out, H', W')
        residual = x if self.shortcut is None else self.shortcut(x)
        return F.relu(y + residual)


class ResNetBackbone(nn.Module):
    """ResNet returning the outputs of res2..res5 (strides 4, 8, 16, 32).

    Submodules ``stem``, ``res2``, ``res3``, ``res4``, ``res5`` (each an ``nn.Sequential`` of
    :class:`BottleneckBlock`), named as in detectron2.
    """

    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.stem = BasicStem(cfg.in_channels, cfg.embedding_size)
        self.stage_names = tuple(f"res{i + 2}" for i in range(len(cfg.depths)))
        in_channels = cfg.embedding_size
        for i, (name, depth, out_channels) in enumerate(zip(self.stage_names, cfg.depths, cfg.hidden_sizes)):
            bottleneck = cfg.bottleneck_channels[i]
            # res2 keeps the stem's stride 4; each later stage halves the resolution in its first block.
            blocks = [BottleneckBlock(in_channels, bottleneck, out_channels, stride=1 if i == 0 else 2)]
            blocks += [BottleneckBlock(out_channels, bottleneck, out_channels, stride=1) for _ in range(depth - 1)]
            self.add_module(name, nn.Sequential(*blocks))
            in_channels = out_channels

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, C_i, H/2^(i+2), W/2^(i+2)) for i in 0..3] (sizes rounded up)."""
        x = self.stem(pixel_values)  # (B, C_stem, H/4, W/4)
        features = []
        for name in self.stage_names:
            x = getattr(self, name)(x)  # (B, C_i, H_i, W_i)
            features.append(x)
        return features
