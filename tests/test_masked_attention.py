"""The fused masked-attention kernel against ``masked_attention_reference`` (materialized mask + SDPA).

On the CPU the Triton kernel runs in Triton's interpreter. Triton fixes that mode when it is first
imported, so this module sets ``TRITON_INTERPRET=1`` before anything imports triton (torch does not), on a
machine without CUDA; if triton was already imported in compiled mode the ``cpu`` cases skip, saying so.
Sizes are tiny and blocks small (16/32) because the interpreter runs numpy per block and Python per tile.
The ``cuda`` cases run the same checks compiled, behind the ``gpu`` marker (``pytest -m gpu``, on a GPU
machine without ``TRITON_INTERPRET``); one process runs either the ``cpu`` or the ``cuda`` cases.

Inputs are fresh per case (seeded), with rows blocked everywhere, rows never blocked, rows opened only by
their last key or by exact zeros, and S, Q that are not multiples of the block sizes.

Tolerance: max |kernel - ideal| <= TOL[dtype] x max |ideal|, where ideal is the reference on the same
inputs upcast to float32 (the same mask logits): float32 1e-5; float16 2e-3 and bfloat16 1.6e-2, four unit
roundoffs of the dtype (2**-11, 2**-8): the kernel rounds the probabilities to the input dtype before P @ V,
as tensor cores take them, and the output. Measured on the CPU cases: float32 2e-7 to 6e-7; float16 3e-4
and bfloat16 4.7e-3, against 2.3e-4 and 2.0e-3 for the reference computed in the input dtype.

Under the interpreter float16 behaves as on a GPU (tl.dot multiplies exactly and accumulates in float32);
its tl.dot mis-reads bfloat16 (as integers), so in the interpreter the kernel upcasts bfloat16 tiles to
float32 before tl.dot, which is exact and the same arithmetic.
"""

from __future__ import annotations

import math
import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of triton, just below

import pytest  # noqa: E402

from mask2former import masked_attention as ma  # noqa: E402
from mask2former.attention_mask import attention_mask, attention_mask_at_level  # noqa: E402
from mask2former.masked_attention import (  # noqa: E402
    SIGMOID_HALF_BAND_F32,
    KernelConfig,
    masked_attention,
    masked_attention_reference,
)
from mask2former.transformer_decoder import DecoderLayer  # noqa: E402

needs_triton = pytest.mark.skipif(not ma.triton_available(), reason="triton is not installed (pip install triton)")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    if ma.triton_available():
        if request.param == "cpu" and not ma.interpreting():
            pytest.skip("triton runs compiled here (CUDA machine?); TRITON_INTERPRET=1 in the environment runs these")
        if request.param == "cuda" and ma.interpreting():
            pytest.skip("TRITON_INTERPRET=1: this would test Triton's interpreter, not the compiled kernel")
    return torch.device(request.param)


def make_logits(b: int, nq: int, s: int, pattern: str, gen: torch.Generator) -> torch.Tensor:
    """Mask logits (B, Q, S) float32, none within 0.01 of zero except exact zeros.

    ``mixed``: row 0 blocked everywhere, row 1 never blocked, row 2 attends only its last key (it opens in
    the last tile), row 3 only its first key, row 4 only at exact zeros (+0.0 and -0.0); other rows random
    with about 40 % attended. ``all_blocked``: every row blocked (plain attention). ``none_blocked``: no key
    blocked (plain attention).
    """
    logits = torch.randn(b, nq, s, generator=gen) - 0.25
    logits = torch.where(logits.abs() < 0.01, torch.full_like(logits, 0.01).copysign(logits), logits)
    if pattern == "all_blocked":
        return -logits.abs()
    if pattern == "none_blocked":
        return logits.abs()
    neg = -logits.abs()
    for i, row in enumerate([neg, logits.abs(), neg, neg, neg][:nq]):
        logits[:, i] = row[:, i]
    if nq > 2:
        logits[:, 2, -1] = 1.5
    if nq > 3:
        logits[:, 3, 0] = 0.7
    if nq > 4:
        logits[:, 4, s // 3] = 0.0
        logits[:, 4, s // 2] = -0.0
    return logits


def make_inputs(b, h, nq, s, d, dtype, pattern, seed, device, logit_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for n in (nq, s, s))
    logits = make_logits(b, nq, s, pattern, gen).to(logit_dtype)
    return [t.to(device) for t in (q.to(dtype), k.to(dtype), v.to(dtype), logits)]


def check(out: torch.Tensor, q, k, v, logits, scale=None) -> float:
    """Kernel output against the float32 reference; returns max |diff| / max |ideal|."""
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    ideal = masked_attention_reference(q.float(), k.float(), v.float(), logits, scale)
    rel = ((out.float() - ideal).abs().max() / ideal.abs().max()).item()
    assert rel <= TOL[q.dtype], f"{q.dtype}: max |kernel - reference| = {rel:.2e} x max |reference| > {TOL[q.dtype]}"
    if q.dtype == torch.float32:  # and the reference as the model calls it, in the inputs' dtype
        torch.testing.assert_close(out, masked_attention_reference(q, k, v, logits, scale), rtol=0, atol=1e-5)
    return rel


def run(q, k, v, logits, config: KernelConfig, scale=None) -> list[torch.Tensor]:
    """The kernel with the test's small blocks, and on CUDA also with the default (auto-split) launch."""
    outs = [masked_attention(q, k, v, logits, scale, config)]
    if q.device.type == "cuda":
        outs.append(masked_attention(q, k, v, logits, scale))
    return outs


# (B, H, Q, S, d, dtype, pattern, KernelConfig): S and Q are not multiples of the blocks; splits > 1 runs the
# split-S path and its combine kernel.
CASES = {
    "f32-mixed-S37": (1, 2, 10, 37, 16, torch.float32, "mixed", KernelConfig(16, 16, 1)),
    "f32-mixed-S100-d32": (2, 4, 7, 100, 32, torch.float32, "mixed", KernelConfig(16, 32, 1)),
    "f32-mixed-S129-split3": (2, 3, 10, 129, 16, torch.float32, "mixed", KernelConfig(16, 16, 3)),
    "f32-mixed-Q20-2qblocks": (2, 2, 20, 37, 32, torch.float32, "mixed", KernelConfig(16, 16, 1)),
    "f32-all-blocked-split2": (1, 2, 10, 37, 16, torch.float32, "all_blocked", KernelConfig(16, 16, 2)),
    "f32-none-blocked": (1, 2, 7, 100, 16, torch.float32, "none_blocked", KernelConfig(16, 32, 1)),
    "f16-mixed-S100-d32": (2, 4, 7, 100, 32, torch.float16, "mixed", KernelConfig(16, 32, 1)),
    "f16-mixed-S129-split3": (1, 2, 10, 129, 16, torch.float16, "mixed", KernelConfig(16, 16, 3)),
    "bf16-mixed-S100-d32": (2, 4, 7, 100, 32, torch.bfloat16, "mixed", KernelConfig(16, 32, 1)),
    "bf16-mixed-S129-split3": (1, 2, 10, 129, 16, torch.bfloat16, "mixed", KernelConfig(16, 16, 3)),
}


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, device):
    b, h, nq, s, d, dtype, pattern, config = CASES[case]
    q, k, v, logits = make_inputs(b, h, nq, s, d, dtype, pattern, seed=list(CASES).index(case), device=device)
    for out in run(q, k, v, logits, config):
        check(out, q, k, v, logits)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs(dtype, device):
    """Strided views as the decoder passes them: heads split from channels, logits from a transpose."""
    b, h, nq, s, d = 2, 2, 7, 37, 16
    gen = torch.Generator().manual_seed(11)
    query = torch.randn(b, nq, h * d, generator=gen).to(dtype)
    memory = torch.randn(b, s, 2 * h * d, generator=gen).to(dtype)  # keys and values interleaved in channels
    q = query.view(b, nq, h, d).transpose(1, 2)  # (B, H, Q, d)
    k = memory[..., : h * d].view(b, s, h, d).transpose(1, 2)  # (B, H, S, d)
    v = memory[..., h * d :].view(b, s, h, d).transpose(1, 2)
    logits = make_logits(b, nq, s, "mixed", gen).transpose(1, 2).contiguous().transpose(1, 2)  # (B, Q, S)
    q, k, v, logits = (t.to(device) for t in (q, k, v, logits))
    assert not any(t.is_contiguous() for t in (q, k, v, logits))
    for out in run(q, k, v, logits, KernelConfig(16, 16, 2)):
        check(out, q, k, v, logits)


@needs_triton
def test_scale_and_half_precision_logits(device):
    """A given softmax scale, and float16 mask logits with float16 inputs (the fp16 model's case)."""
    q, k, v, logits = make_inputs(1, 2, 10, 37, 32, torch.float16, "mixed", 5, device, logit_dtype=torch.float16)
    for out in run(q, k, v, logits, KernelConfig(16, 16, 1), scale=0.3):
        check(out, q, k, v, logits, scale=0.3)


@needs_triton
def test_late_opening_drops_blocked_state(device):
    """A row whose only attended key comes in the last tile of the last split, after blocked keys with large
    scores: everything it accumulated before must be dropped, not merely down-weighted."""
    b, h, nq, s, d = 1, 2, 3, 70, 16
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(b, h, nq, d, generator=gen)
    k = torch.randn(b, h, s, d, generator=gen)
    k[..., : s - 1, :] += 3 * q[:, :, :1]  # blocked keys score high against row 0
    v = torch.randn(b, h, s, d, generator=gen)
    logits = -torch.rand(b, nq, s, generator=gen) - 0.1
    logits[:, 0, -1] = 2.0  # row 0 opens at its last key; row 1 is blocked everywhere; row 2 opens at key 0
    logits[:, 2, 0] = 2.0
    q, k, v, logits = (t.to(device) for t in (q, k, v, logits))
    for config in (KernelConfig(16, 16, 1), KernelConfig(16, 16, 3)):
        for out in run(q, k, v, logits, config):
            check(out, q, k, v, logits)
            # one attended key: the output is that key's value, exactly up to rounding
            torch.testing.assert_close(out[:, :, 0], v[:, :, -1], rtol=0, atol=1e-6)
            torch.testing.assert_close(out[:, :, 2], v[:, :, 0], rtol=0, atol=1e-6)


@needs_triton
def test_sigmoid_band_is_where_the_rules_differ(device):
    """Logits in [-SIGMOID_HALF_BAND_F32, 0): the reference (sigmoid >= 0.5, the model's rule) attends, the
    kernel (logit >= 0) blocks, as documented. Just below the band both block. The reference runs on the CPU,
    whose sigmoid the band was measured on (see test_cuda_sigmoid_band_edge for CUDA's)."""
    q, k, v, _ = make_inputs(1, 2, 4, 37, 16, torch.float32, "mixed", 8, device)
    edge = torch.tensor(-SIGMOID_HALF_BAND_F32)
    below = torch.nextafter(edge, torch.tensor(-1.0))
    logits = torch.full((1, 4, 37), -1.0)
    logits[:, :, ::3] = 1.0  # every row attends a third of the keys by both rules
    band = logits.clone()
    band[:, :2, 1::3] = edge  # rows 0, 1: more keys in the band
    band[:, 2:, 1::3] = below  # rows 2, 3: more keys just below it
    out = masked_attention(q, k, v, band.to(device), config=KernelConfig(16, 16, 1)).cpu()
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    # The kernel ignores the band keys: it matches the reference on logits with them moved to -1.
    torch.testing.assert_close(out, masked_attention_reference(q, k, v, logits), rtol=0, atol=1e-5)
    ref = masked_attention_reference(q, k, v, band)
    assert (ref[:, :, :2] - out[:, :, :2]).abs().max() > 1e-2, "the reference should attend the band keys"
    torch.testing.assert_close(out[:, :, 2:], ref[:, :, 2:], rtol=0, atol=1e-5)


def test_float32_sigmoid_band_edge():
    """The documented edge: torch's float32 sigmoid gives 0.5 for logits in [-1.7881390e-07, 0) and below 0.5
    from the next float32 down; checked for the whole top binade of the band and every power of two below."""
    edge = torch.tensor(-SIGMOID_HALF_BAND_F32)
    assert edge.view(torch.int32).item() == -0x4BC00002  # bits 0xb43ffffe
    assert edge.sigmoid().item() == 0.5
    assert torch.nextafter(edge, torch.tensor(-1.0)).sigmoid().item() < 0.5
    lo = torch.tensor(2.0**-23).view(torch.int32).item()
    top_binade = -torch.arange(lo, edge.neg().view(torch.int32).item() + 1, dtype=torch.int32).view(torch.float32)
    assert (top_binade.sigmoid() == 0.5).all()  # 2**22 floats from -2**-23 down to the edge
    tiny = -(2.0 ** -torch.arange(24, 150, dtype=torch.float64)).float()
    assert (tiny.sigmoid() == 0.5).all()
    assert not math.isclose(SIGMOID_HALF_BAND_F32, 2.0**-24, rel_tol=0.5)  # not the 6e-8 folklore


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sigmoid_band_edge():
    """Where CUDA's float32 sigmoid stops rounding negative logits to 0.5 (the CPU's edge is
    SIGMOID_HALF_BAND_F32). Printed with -s; it must be the same order, between 2**-24 and 2**-22."""
    lo, hi = (torch.tensor(x).view(torch.int32).item() for x in (2.0**-25, 2.0**-21))
    x = -torch.arange(lo, hi, dtype=torch.int32, device="cuda").view(torch.float32)  # every float32 in between
    edge = x[x.sigmoid() == 0.5].abs().max().item()
    assert (x[x.abs() > edge].sigmoid() < 0.5).all(), "CUDA's sigmoid is not monotone around 0.5"
    print(f"CUDA float32 sigmoid gives 0.5 down to {-edge!r} (CPU: {-SIGMOID_HALF_BAND_F32!r})")
    assert 2.0**-24 <= edge < 2.0**-22


def test_reference_matches_model_mask():
    """The reference's mask is the model's ``attention_mask`` at the same level (no resize needed)."""
    gen = torch.Generator().manual_seed(2)
    b, h, nq, hh, ww, d = 2, 2, 7, 5, 9, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for n in (nq, hh * ww, hh * ww))
    logits = make_logits(b, nq, hh * ww, "mixed", gen)  # (B, Q, S)
    mask = attention_mask(logits.view(b, nq, hh, ww), (hh, ww))  # (B, 1, Q, S)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(masked_attention_reference(q, k, v, logits), expected, rtol=0, atol=0)


@needs_triton
def test_decoder_layer_fused(device):
    """A decoder layer with the kernel (mask logits in) against the same layer with the boolean mask, on the
    strided q/k/v views the layer's attention makes; rows blocked everywhere included."""
    torch.manual_seed(0)
    layer = DecoderLayer(dim=64, heads=4, ffn=128, pre_norm=False).eval().to(device)
    gen = torch.Generator().manual_seed(4)
    b, nq, hh, ww = 2, 7, 6, 9
    x = torch.randn(b, nq, 64, generator=gen)
    query_pos = torch.randn(nq, 64, generator=gen)
    memory = torch.randn(b, hh * ww, 64, generator=gen)
    memory_pos = torch.randn(hh * ww, 64, generator=gen)
    logits = make_logits(b, nq, hh * ww, "mixed", gen)  # (B, Q, S)
    x, query_pos, memory, memory_pos, logits = (t.to(device) for t in (x, query_pos, memory, memory_pos, logits))
    with torch.inference_mode():
        off = layer(x, query_pos, memory, memory_pos, attention_mask(logits.view(b, nq, hh, ww), (hh, ww)))
        on = layer(x, query_pos, memory, memory_pos, None, logits)
    torch.testing.assert_close(on, off, rtol=0, atol=1e-5)


def tiny_model():
    pytest.importorskip("transformers")  # the tiny checkpoint is written from the reference implementation
    import tempfile

    from mask2former import load_model
    from mask2former.reference import TINY, save_hf_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        return load_model(save_hf_checkpoint(TINY, folder, seed=1))


@needs_triton
def test_tiny_model_fused_matches_unfused(device):
    """The tiny Mask2Former with ``use_fused_attention`` on against off: every step's class and mask logits
    within 1e-5 x max |off|. The rules differ only for logits in the sigmoid band (see
    ``masked_attention_reference``); a generic input has none there, which the test checks first."""
    model = tiny_model().to(device)
    x = torch.randn(2, 3, 168, 232, generator=torch.Generator().manual_seed(1)).to(device)
    decoder = model.decoder
    with torch.inference_mode():
        model.decoder.use_fused_attention = False
        off = model(x, aux=True)
        decoder.use_fused_attention = True
        on = model(x, aux=True)
    off_steps, on_steps = (*off.aux, off), (*on.aux, on)
    for i in range(model.config.decoder_layers):  # the masks each layer attends with, by both rules
        resized = off.attention_logits[i]  # (B, Q, S), what the kernel gets
        sigmoid_rule = attention_mask_at_level(resized)  # (B, 1, Q, S)
        sign_rule = resized >= 0
        sign_rule = (sign_rule | ~sign_rule.any(-1, keepdim=True)).unsqueeze(1)
        near = resized.abs().le(SIGMOID_HALF_BAND_F32).sum().item()
        assert torch.equal(sigmoid_rule, sign_rule), f"layer {i}: {near} logits in the sigmoid band flip the mask"
    for i, (a, b) in enumerate(zip(off_steps, on_steps, strict=True)):
        for name, ta, tb in (("class", a.class_logits, b.class_logits), ("mask", a.mask_logits, b.mask_logits)):
            diff, scale = (ta - tb).abs().max().item(), ta.abs().max().item()
            assert diff <= 1e-5 * scale, f"step {i} {name} logits: max |on - off| {diff:.2e} > 1e-5 x {scale:.2f}"


def test_errors(monkeypatch):
    q, k, v, logits = make_inputs(1, 2, 4, 20, 16, torch.float32, "mixed", 0, "cpu")
    with pytest.raises(ValueError, match="share one of"):
        ma._check_inputs(q.double(), k.double(), v.double(), logits)
    with pytest.raises(ValueError, match="head size"):
        ma._check_inputs(q[..., :12], k[..., :12], v[..., :12], logits)
    with pytest.raises(ValueError, match="shape mismatch"):
        ma._check_inputs(q, k[:, :, :10], v, logits)
    with pytest.raises(ValueError, match="floating point"):
        ma._check_inputs(q, k, v, logits > 0)
    with pytest.raises(ValueError, match="forward only"):
        ma._check_inputs(q.requires_grad_(), k, v, logits)
    monkeypatch.setattr(ma, "triton", None)
    with pytest.raises(RuntimeError, match="needs Triton"):
        masked_attention(q.detach(), k, v, logits)


@needs_triton
def test_cpu_needs_the_interpreter(monkeypatch):
    q, k, v, logits = make_inputs(1, 2, 4, 20, 16, torch.float32, "mixed", 0, "cpu")
    monkeypatch.setattr(ma, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        masked_attention(q, k, v, logits)
    monkeypatch.setattr(ma, "interpreting", lambda: True)
    with pytest.raises(ValueError, match="power of two"):  # checked before anything is launched
        masked_attention(q, k, v, logits, config=KernelConfig(block_q=24))
