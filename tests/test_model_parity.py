"""Our model against ``transformers.Mask2FormerForUniversalSegmentation`` on the same random weights.

Compared stage by stage (backbone features, pixel decoder outputs, the prediction before and after every
decoder layer) so that a failure names the stage. Tolerance: max |ours - reference| <= 1e-4 x max |reference|
for every tensor; the absolute figure is in the failure message and printed with ``pytest -s``.
"""

from __future__ import annotations

import pytest
import torch

from mask2former import load_model
from mask2former.reference import TINY, architecture, hf_model
from mask2former.transformer_decoder import attention_mask

pytest.importorskip("transformers")

REL_TOL = 1e-4

ARCHS = {"tiny": TINY, "swin-tiny-coco-panoptic": architecture("tiny", "coco-panoptic")}
# Batch 2; square and non-square; no side a multiple of 32 (and, for the tiny config, stage-4 maps
# smaller than a window, so window padding is exercised).
SIZES = {"tiny": [(200, 200), (168, 232)], "swin-tiny-coco-panoptic": [(232, 232), (200, 296)]}


@pytest.fixture(scope="module", params=list(ARCHS))
def models(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = hf_model(ARCHS[request.param], seed=1)
    ref.save_pretrained(folder)
    return request.param, ref, load_model(folder)


def compare(stage: str, ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, f"{stage}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    print(f"{stage:28s} max|diff| {diff:.2e}  max|ref| {scale:.2f}  rel {diff / scale:.1e}")
    assert diff <= REL_TOL * scale, f"{stage}: max abs diff {diff:.3e} > {REL_TOL} x max |ref| {scale:.3e}"
    return diff


@pytest.mark.parametrize("size_index", [0, 1])
def test_stage_by_stage_parity(models, size_index):
    name, ref, ours = models
    h, w = SIZES[name][size_index]
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(size_index))
    with torch.inference_mode():
        r = ref(x, output_hidden_states=True, output_auxiliary_logits=True)
        features = ours.backbone(x)
        mask_features, multi_scale = ours.pixel_decoder(features)
        preds = ours.decoder(multi_scale, mask_features, all_layers=True)
        out = ours(x)

    for i, (a, b) in enumerate(zip(features, r.encoder_hidden_states, strict=True)):
        compare(f"backbone stage {i + 1}", a, b)
    compare("pixel decoder mask features", mask_features, r.pixel_decoder_last_hidden_state)
    for i, (a, b) in enumerate(zip(multi_scale, r.pixel_decoder_hidden_states, strict=True)):
        compare(f"pixel decoder level {i} (1/{32 >> i})", a, b)
    ref_steps = [(a["class_queries_logits"], a["masks_queries_logits"]) for a in r.auxiliary_logits]
    ref_steps.append((r.class_queries_logits, r.masks_queries_logits))
    assert len(preds) == len(ref_steps) == ours.config.decoder_layers + 1
    for i, (p, (cls_ref, mask_ref)) in enumerate(zip(preds, ref_steps, strict=True)):
        step = "queries" if i == 0 else f"decoder layer {i - 1}"
        compare(f"{step} class logits", p.class_logits, cls_ref)
        compare(f"{step} mask logits", p.mask_logits, mask_ref)
    compare("model class logits", out.class_logits, r.class_queries_logits)
    compare("model mask logits", out.mask_logits, r.masks_queries_logits)
    assert out.class_logits.shape == (2, ours.config.num_queries, ours.config.num_labels + 1)
    assert out.mask_logits.shape == (2, ours.config.num_queries, -(-h // 4), -(-w // 4))

    # The comparison is only meaningful if masked attention really masks: some layer must block a
    # substantial share of pixels.
    shares = [
        attention_mask(p.mask_logits, multi_scale[i % 3].shape[-2:]).float().mean().item()
        for i, p in enumerate(preds[:-1])
    ]
    assert any(0.05 < s < 0.95 for s in shares), f"attended shares per layer {shares}: masking not exercised"


def test_aux_outputs_match_all_layers(models):
    _, _, ours = models
    x = torch.randn(1, 3, 160, 192)
    with torch.inference_mode():
        out = ours(x, aux=True)
        plain = ours(x)
    assert out.aux is not None and len(out.aux) == ours.config.decoder_layers
    assert plain.aux is None
    torch.testing.assert_close(out.class_logits, plain.class_logits, rtol=0, atol=0)
    torch.testing.assert_close(out.mask_logits, plain.mask_logits, rtol=0, atol=0)


def test_fully_blocked_query_attends_everywhere():
    logits = torch.full((1, 3, 8, 8), -5.0)  # query 0: blocked everywhere
    logits[0, 1, :4] = 5.0  # query 1: top half open
    logits[0, 2] = 5.0  # query 2: open everywhere
    mask = attention_mask(logits, (4, 4))  # (B, 1, Q, 16)
    assert mask.shape == (1, 1, 3, 16)
    assert mask[0, 0, 0].all(), "a query blocked everywhere must attend everywhere"
    assert mask[0, 0, 1, :8].all() and not mask[0, 0, 1, 8:].any()
    assert mask[0, 0, 2].all()
