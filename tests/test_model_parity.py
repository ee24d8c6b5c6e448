"""Our model against ``transformers.Mask2FormerForUniversalSegmentation`` on the same random weights.

Tolerance: max |ours - reference| <= 1e-4 x max |reference| for every compared tensor; the absolute
figure is in the failure message and printed with ``pytest -s``.

Stage by stage, each stage of ours is fed the reference's input to that stage (backbone features into
the pixel decoder, the reference's queries and attention mask into each decoder layer), so a failure
names the stage. End to end, one caveat is intrinsic: masked attention thresholds the previous mask
logits at 0, and a logit within float rounding (~1e-5) of 0 can land on either side in two correct
implementations, changing that query's attention. So the end-to-end test first checks that every place
where the two attention masks differ is such a near-zero logit; only when no mask differs do the final
logits have to agree to the tolerance (the tests choose inputs where that happens).
"""

from __future__ import annotations

import pytest
import torch

from mask2former import load_model
from mask2former.attention_mask import attention_mask, attention_mask_at_level, level_mask_logits
from mask2former.reference import TINY, architecture, compare, hf_model

pytest.importorskip("transformers")


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


def run_reference(ref, x):
    with torch.inference_mode():
        return ref(x, output_hidden_states=True, output_auxiliary_logits=True)


def reference_steps(r) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(class logits, mask logits) of the reference before layer 0 and after each layer."""
    steps = [(a["class_queries_logits"], a["masks_queries_logits"]) for a in r.auxiliary_logits]
    return steps + [(r.class_queries_logits, r.masks_queries_logits)]


def make_input(name: str, size_index: int) -> torch.Tensor:
    h, w = SIZES[name][size_index]
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(size_index))


@pytest.mark.parametrize("size_index", [0, 1])
def test_stage_by_stage_parity(models, size_index):
    name, ref, ours = models
    x = make_input(name, size_index)
    r = run_reference(ref, x)
    with torch.inference_mode():
        features = ours.backbone(x)
        for i, (a, b) in enumerate(zip(features, r.encoder_hidden_states, strict=True)):
            compare(f"backbone stage {i + 1}", a, b)

        mask_features, multi_scale = ours.pixel_decoder(list(r.encoder_hidden_states))
        compare("pixel decoder mask features", mask_features, r.pixel_decoder_last_hidden_state)
        for i, (a, b) in enumerate(zip(multi_scale, r.pixel_decoder_hidden_states, strict=True)):
            compare(f"pixel decoder level {i} (1/{32 >> i})", a, b)

        decoder = ours.decoder
        ref_mask_features = r.pixel_decoder_last_hidden_state
        memory, memory_pos, sizes = decoder.memory(list(r.pixel_decoder_hidden_states))
        ref_queries = [h.transpose(0, 1) for h in r.transformer_decoder_hidden_states]  # each (B, Q, C)
        steps = reference_steps(r)
        assert len(steps) == len(ref_queries) == ours.config.decoder_layers + 1
        shares = []
        for i, (cls_ref, mask_ref) in enumerate(steps):
            label = "queries" if i == 0 else f"decoder layer {i - 1}"
            if i > 0:  # layer i-1 on the reference's queries and attention mask
                lvl = (i - 1) % 3
                mask = attention_mask(steps[i - 1][1], sizes[lvl])
                shares.append(mask.float().mean().item())
                out = decoder.layers[i - 1](ref_queries[i - 1], decoder.query_pos, memory[lvl], memory_pos[lvl], mask)
                compare(f"{label} output queries", out, ref_queries[i])
            pred = decoder.predict(ref_queries[i], ref_mask_features)
            compare(f"{label} class logits", pred.class_logits, cls_ref)
            compare(f"{label} mask logits", pred.mask_logits, mask_ref)

    # The comparison is only meaningful if masked attention really masks: some layer must block a
    # substantial share of pixels.
    assert any(0.05 < s < 0.95 for s in shares), f"attended shares per layer {shares}: masking not exercised"


@pytest.mark.parametrize("size_index", [0, 1])
def test_end_to_end_parity(models, size_index):
    name, ref, ours = models
    x = make_input(name, size_index)
    r = run_reference(ref, x)
    with torch.inference_mode():
        out = ours(x, aux=True)
        _, multi_scale = ours.pixel_decoder(ours.backbone(x))
    ours_steps = [(p.class_logits, p.mask_logits) for p in (*out.aux, out)]
    ref_steps = reference_steps(r)
    first_flip = None  # the first layer whose attention mask differs from the reference's
    for i in range(ours.config.decoder_layers):
        size = multi_scale[i % 3].shape[-2:]
        # Ours computes the logits at the level (mask features resized, then projected); the reference
        # resizes its full-resolution logits. The two agree to the tolerance...
        compare(f"end to end step {i} level logits", out.attention_logits[i], level_mask_logits(ref_steps[i][1], size))
        # ...and the masks differ only where a logit is near 0.
        ours_mask = attention_mask_at_level(out.attention_logits[i])  # what our layer i attended with
        differ = ours_mask != attention_mask(ref_steps[i][1], size)  # (B, 1, Q, S)
        if differ.any():
            resized = torch.nn.functional.interpolate(ref_steps[i][1], size=size, mode="bilinear", align_corners=False)
            near_zero = (resized.flatten(2).abs() < 1e-4).unsqueeze(1)  # (B, 1, Q, S)
            # A flip can also open a whole row (the query became blocked everywhere); either way one of the
            # query's logits must be near zero.
            rows = differ.any(-1)  # (B, 1, Q)
            assert near_zero.any(-1)[rows].all(), f"layer {i}: attention masks differ away from a 0 logit"
            print(f"layer {i}: {int(differ.sum())} attention-mask entries flipped at |logit| < 1e-4")
            first_flip = i if first_flip is None else first_flip
    # Up to the first flip (its input prediction included) everything must match to the tolerance; after
    # it, the stage-by-stage test is what shows each layer is right.
    last = len(ref_steps) - 1 if first_flip is None else first_flip
    for i in range(last + 1):
        compare(f"end to end step {i} class logits", *(t[0] for t in (ours_steps[i], ref_steps[i])))
        compare(f"end to end step {i} mask logits", *(t[1] for t in (ours_steps[i], ref_steps[i])))
    if name == "tiny":
        assert first_flip is None, "the tiny cases are chosen flip-free, so the whole model is compared"
    h, w = x.shape[-2:]
    assert out.class_logits.shape == (2, ours.config.num_queries, ours.config.num_labels + 1)
    assert out.mask_logits.shape == (2, ours.config.num_queries, -(-h // 4), -(-w // 4))


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
