"""The ``transformers`` reference model, with random weights, for parity tests and benchmarks.

``transformers`` is a development dependency only; this module imports it lazily. Nothing here
downloads anything: architectures are built from their hyper-parameters and saved with
``save_pretrained`` into a local folder that :func:`mask2former.load_model` then reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mask2former.attention_mask import attention_mask, attention_mask_at_level, level_mask_logits

# Hyper-parameters of the public checkpoints' architectures (facebook/mask2former-swin-*).
SWIN = {
    "tiny": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7},
    "small": {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24], "window_size": 7},
    "base": {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "window_size": 12},
    "large": {"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48], "window_size": 12},
}
# detectron2's R50/R101 (the official Mask2Former ResNet configs) as HF ``ResNetConfig`` hyper-parameters.
_RESNET_WIDTHS = {"model_type": "resnet", "hidden_sizes": [256, 512, 1024, 2048], "embedding_size": 64}
RESNET = {"r50": {**_RESNET_WIDTHS, "depths": [3, 4, 6, 3]}, "r101": {**_RESNET_WIDTHS, "depths": [3, 4, 23, 3]}}
DATASETS = {"coco-panoptic": 133, "coco-instance": 80, "ade-semantic": 150, "cityscapes-semantic": 19}

# A tiny architecture for fast tests: hidden 64, 2 decoder layers, 10 queries.
TINY: dict[str, Any] = {
    "backbone": {"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4], "window_size": 4},
    "num_labels": 5,
    "num_queries": 10,
    "hidden_dim": 64,
    "feature_size": 64,
    "mask_feature_size": 64,
    "encoder_layers": 2,
    "encoder_feedforward_dim": 128,
    "decoder_layers": 3,  # HF counting: 2 masked-attention layers
    "dim_feedforward": 128,
    "num_attention_heads": 4,
}


# Tiny ResNet layouts (the block counts of R50 and R101, narrow stages) with the decoder of TINY.
TINY_R50: dict[str, Any] = {
    **TINY,
    "backbone": {
        "model_type": "resnet",
        "depths": [3, 4, 6, 3],
        "hidden_sizes": [32, 64, 96, 128],
        "embedding_size": 16,
    },
}
TINY_R101: dict[str, Any] = {**TINY_R50, "backbone": {**TINY_R50["backbone"], "depths": [3, 4, 23, 3]}}


def architecture(backbone: str = "tiny", dataset: str = "coco-panoptic") -> dict[str, Any]:
    """Hyper-parameters of a public checkpoint's architecture, in :func:`hf_model`'s format.

    ``backbone``: a Swin size (``tiny`` .. ``large``) or ``r50`` / ``r101``.
    """
    queries = 200 if backbone == "large" else 100
    bb = RESNET[backbone] if backbone in RESNET else SWIN[backbone]
    return {"backbone": bb, "num_labels": DATASETS[dataset], "num_queries": queries}


def hf_model(arch: dict[str, Any], seed: int = 0, id2label: dict[int, str] | None = None):
    """A ``Mask2FormerForUniversalSegmentation`` with the given hyper-parameters and random weights.

    The backbone is Swin, or ResNet when ``arch["backbone"]["model_type"]`` is ``"resnet"`` (bottleneck
    blocks with the stride in the 3x3 convolution: detectron2's). Every parameter is redrawn (HF's init
    leaves many at zero or one), so that parity tests exercise all of them: weights ~ N(0, 1/fan_in), norms
    around one, biases and embeddings small but non-zero; batch-norm statistics too.
    """
    from transformers import (  # lazy: transformers (a development dependency only)
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        ResNetConfig,
        SwinConfig,
    )

    arch = dict(arch)
    bb = dict(arch.pop("backbone"))
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if bb.pop("model_type", "swin") == "resnet":
        backbone = ResNetConfig(**bb, layer_type="bottleneck", downsample_in_bottleneck=False, out_features=stages)
    else:
        backbone = SwinConfig(**bb, out_features=stages)
    num_labels = arch.pop("num_labels")
    id2label = id2label or {i: f"class_{i}" for i in range(num_labels)}
    cfg = Mask2FormerConfig(
        backbone_config=backbone, id2label=id2label, label2id={v: k for k, v in id2label.items()}, **arch
    )
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(cfg).eval()
    randomize_(model, seed)
    return model


_EMBEDDINGS = ("level_embed", "level_embed.weight", "queries_embedder.weight", "queries_features.weight")


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            fan_in = 1 if name.endswith(_EMBEDDINGS) else p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # ResNet backbones; Swin models have none
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
            module.running_var.copy_(torch.empty(module.running_var.shape).uniform_(0.5, 2.0, generator=gen))
    # Centre the mask logits on zero and widen them, so that masked attention blocks a real share of
    # each query's pixels (with the draw above nearly every pixel would be open).
    pixel_decoder = model.model.pixel_level_module.decoder
    pixel_decoder.mask_projection.bias.zero_()
    pixel_decoder.mask_projection.weight.mul_(4.0)


def save_hf_checkpoint(arch: dict[str, Any], folder: str | Path, seed: int = 0) -> Path:
    """Write a random-weight HF checkpoint (``config.json`` + ``model.safetensors``) and return its folder."""
    folder = Path(folder)
    hf_model(arch, seed).save_pretrained(folder)
    return folder


def compare(stage: str, ours: torch.Tensor, ref: torch.Tensor, rel_tol: float = 1e-4) -> float:
    """Max |ours - ref| / max |ref| of one stage's output, printed; AssertionError above ``rel_tol`` (the
    parity tests' tolerance) or on a shape mismatch."""
    assert ours.shape == ref.shape, f"{stage}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    print(f"{stage:36s} max|diff| {diff:.2e}  max|ref| {scale:.2f}  rel {diff / scale:.1e}")
    assert diff <= rel_tol * scale, f"{stage}: max abs diff {diff:.3e} > {rel_tol} x max |ref| {scale:.3e}"
    return diff / scale


def compare_pixel_stages(tag: str, ours: torch.nn.Module, x: torch.Tensor, ref_out: Any) -> None:
    """Our backbone maps and pixel-decoder outputs against the reference's (``ref_out``: its output with
    ``output_hidden_states``), each with :func:`compare`; the pixel decoder runs on the reference's maps."""
    with torch.inference_mode():
        for i, (a, b) in enumerate(zip(ours.backbone(x), ref_out.encoder_hidden_states, strict=True)):
            compare(f"{tag} backbone stage {i + 1}", a, b)
        mask_features, multi_scale = ours.pixel_decoder(list(ref_out.encoder_hidden_states))
        compare(f"{tag} pixel decoder mask features", mask_features, ref_out.pixel_decoder_last_hidden_state)
        for i, (a, b) in enumerate(zip(multi_scale, ref_out.pixel_decoder_hidden_states, strict=True)):
            compare(f"{tag} pixel decoder level {i} (1/{32 >> i})", a, b)


def compare_flip_free(tag: str, ours: torch.nn.Module, x: torch.Tensor, ref_out: Any) -> tuple[Any, list[float]]:
    """Our whole model on ``x`` against the reference's output, step by step: each layer's level logits, its
    attention mask (which must equal the reference's: inputs chosen so that no logit sits within rounding
    of 0), and every prediction's class and mask logits. Returns our output (with ``aux``) and the attended
    share of each layer's mask."""
    with torch.inference_mode():
        out = ours(x, aux=True)
        _, multi_scale = ours.pixel_decoder(ours.backbone(x))
    steps = [(a["class_queries_logits"], a["masks_queries_logits"]) for a in ref_out.auxiliary_logits]
    steps.append((ref_out.class_queries_logits, ref_out.masks_queries_logits))
    shares = []
    for i in range(ours.config.decoder_layers):
        size = multi_scale[i % 3].shape[-2:]
        compare(f"{tag} step {i} level logits", out.attention_logits[i], level_mask_logits(steps[i][1], size))
        mask = attention_mask_at_level(out.attention_logits[i])
        assert torch.equal(mask, attention_mask(steps[i][1], size)), f"{tag} layer {i}: attention mask flipped"
        shares.append(mask.float().mean().item())
    for i, pred in enumerate((*out.aux, out)):
        compare(f"{tag} step {i} class logits", pred.class_logits, steps[i][0])
        compare(f"{tag} step {i} mask logits", pred.mask_logits, steps[i][1])
    return out, shares
