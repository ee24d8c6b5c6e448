"""Train the bundled demo model: a tiny Mask2Former on the synthetic panoptic data of ``m2f synth``.

    python weights/train_demo.py --out weights/demo              # the committed checkpoint (about 45 min, 2 cores)
    python weights/train_demo.py --out /tmp/try --minutes 5      # a quick run

Trains our own model (``mask2former.Mask2Former``) from scratch on the CPU with the Hungarian-matching
loss of ``transformers`` (``Mask2FormerLoss``: class cross-entropy with a down-weighted "no object",
point-sampled sigmoid-BCE and dice on the masks, on the final and every auxiliary prediction). Samples are
generated on the fly from ``m2f.synth`` with the training seed, so no image repeats. The result is
written as an HF checkpoint folder (``config.json`` with ``thing_ids``, ``preprocessor_config.json``,
``model.safetensors``) that ``load_model`` and ``transformers`` both read, plus ``training.json``.

Reproducible: the same arguments give the same weights on the same machine and torch build (the step
count is fixed up front by ``--steps``; ``--minutes`` instead stops at a wall-clock budget, which is not
reproducible, and is for trying things out).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2f import synth  # noqa: E402
from mask2former.mask2former import Mask2Former  # noqa: E402
from mask2former.pixel_decoder import MSDeformAttn  # noqa: E402
from mask2former.weights import load_model, to_hf_state_dict  # noqa: E402
from pipeline.config import (  # noqa: E402
    POSTPROCESS_KEYS,
    Mask2FormerConfig,
    PreprocessConfig,
    SwinConfig,
    preprocess_to_hf,
)
from pipeline.processing import preprocess  # noqa: E402

IMAGE_SIZE = (160, 160)
LOSS_WEIGHTS = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}  # the paper's


def demo_config() -> Mask2FormerConfig:
    """The demo architecture: a 4-stage Swin (32..256 channels, depths 2-2-2-1, window 5 for the 160 px
    training size), a 128-wide pixel decoder with 3 MSDeformAttn layers, 6 masked-attention layers with
    a 256-wide FFN, 20 queries."""
    labels = {c["id"]: c["name"] for c in synth.CATEGORIES}
    return Mask2FormerConfig(
        backbone=SwinConfig(embed_dim=32, depths=(2, 2, 2, 1), num_heads=(1, 2, 4, 8), window_size=5),
        num_labels=len(labels),
        num_queries=20,
        hidden_dim=128,
        feature_size=128,
        mask_feature_size=128,
        encoder_layers=3,
        encoder_feedforward_dim=256,
        decoder_layers=6,
        num_attention_heads=4,
        dim_feedforward=256,
        id2label=labels,
        thing_ids=frozenset(c["id"] for c in synth.CATEGORIES if c["isthing"]),
        preprocess=PreprocessConfig(shortest_edge=IMAGE_SIZE[0], longest_edge=4 * IMAGE_SIZE[0]),
        threshold=0.5,
        name="mask2former-demo-synth",
    )


def hf_config(cfg: Mask2FormerConfig):
    """The ``transformers`` config of the same architecture, with the loss settings used here."""
    from transformers import Mask2FormerConfig as HFConfig  # lazy: transformers (a development dependency)

    d = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("thing_ids", *POSTPROCESS_KEYS)}
    points = (IMAGE_SIZE[0] // 4) * (IMAGE_SIZE[1] // 4)  # every mask-logit pixel, on average
    return HFConfig.from_dict(d | {"train_num_points": points, "no_object_weight": 0.1})


def make_batch(seed: int, start: int, size: int, cfg: Mask2FormerConfig):
    """Samples start..start+size-1: pixel values (B, 3, H, W), per-image mask (N, H, W) and class (N,) targets."""
    samples = [synth.make_sample(seed, start + i, IMAGE_SIZE) for i in range(size)]
    batch = preprocess([s.image for s in samples], cfg.preprocess)
    masks, classes = [], []
    for s in samples:
        ids = [seg["id"] for seg in s.segments]
        masks.append(torch.from_numpy(np.stack([s.panoptic == i for i in ids])).float())
        classes.append(torch.tensor([seg["category_id"] for seg in s.segments], dtype=torch.long))
    return torch.from_numpy(batch.pixel_values), masks, classes


class Batches(torch.utils.data.Dataset):
    """Training batch ``step`` = samples first+step*B .. first+step*B+B-1 of the training seed (made in a
    worker process while the model trains; the content depends on the step only)."""

    def __init__(self, seed: int, batch_size: int, steps: int, cfg: Mask2FormerConfig, first: int = 0):
        self.seed, self.batch_size, self.steps, self.cfg, self.first = seed, batch_size, steps, cfg, first

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        return make_batch(self.seed, self.first + step * self.batch_size, self.batch_size, self.cfg)


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def save_checkpoint(model: Mask2Former, out: Path, info: dict) -> None:
    """Write ``model`` as an HF checkpoint folder and check that ``load_model`` reads back the same model."""
    from transformers import Mask2FormerForUniversalSegmentation  # lazy: transformers (a development dependency)

    cfg = model.config
    hf = Mask2FormerForUniversalSegmentation(hf_config(cfg)).eval()
    state = to_hf_state_dict(model.state_dict(), list(hf.state_dict()))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # Left at their init: the loss's class weights and Swin's unused final norm.
    assert not unexpected and all("criterion" in k or "swin.layernorm" in k for k in missing), (missing, unexpected)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["thing_ids"] = sorted(cfg.thing_ids)
    config |= {k: getattr(cfg, k) for k in POSTPROCESS_KEYS}
    config["_name_or_path"] = cfg.name
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    preprocessor = preprocess_to_hf(cfg.preprocess)
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    reloaded = load_model(out)
    x = torch.randn(1, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(x).mask_logits, model.eval()(x).mask_logits, rtol=0, atol=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--minutes", type=float, help="stop at this wall-clock budget instead (not reproducible)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the training samples")
    parser.add_argument(
        "--init",
        type=Path,
        help="start from this checkpoint's weights (a second, fine-tuning stage) instead of random ones",
    )
    parser.add_argument(
        "--first-sample",
        type=int,
        default=0,
        help="index of the first training sample (a later stage continues the stream)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--save-every", type=int, default=1000, help="also write the checkpoint every N steps")
    args = parser.parse_args(argv)

    from transformers.models.mask2former.modeling_mask2former import (  # lazy: transformers (development)
        Mask2FormerLoss,
    )

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = demo_config()
    if args.init is not None:
        model = load_model(args.init)

        def architecture(c: Mask2FormerConfig) -> dict:
            return {k: v for k, v in c.to_hf_dict().items() if k not in POSTPROCESS_KEYS}

        if architecture(model.config) != architecture(cfg):
            raise SystemExit(f"{args.init} is not the demo architecture")
        model.config = cfg
    else:
        model = Mask2Former(cfg)
        _init_weights(model)
    criterion = Mask2FormerLoss(hf_config(cfg), weight_dict=LOSS_WEIGHTS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{cfg.name}: {params / 1e6:.2f}M parameters, {cfg.num_labels} classes, {args.steps} steps of {args.batch_size}"
    )

    info = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "parameters": params}
    info |= {"torch": torch.__version__, "image_size": list(IMAGE_SIZE), "loss_weights": LOSS_WEIGHTS}
    start, running = time.perf_counter(), None
    batches = torch.utils.data.DataLoader(
        Batches(args.seed, args.batch_size, args.steps, cfg, args.first_sample),
        batch_size=None,
        num_workers=1,
        prefetch_factor=4,
    )
    for step, (x, masks, classes) in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        model.train()
        out = model(x, aux=True)
        aux = [{"masks_queries_logits": p.mask_logits, "class_queries_logits": p.class_logits} for p in out.aux]
        losses = criterion(out.mask_logits, out.class_logits, masks, classes, aux)
        loss = sum(LOSS_WEIGHTS[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] * v for k, v in losses.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        elapsed = time.perf_counter() - start
        if (step + 1) % args.log_every == 0:
            final = {k: round(v.item(), 3) for k, v in losses.items() if not k[-1].isdigit()}
            print(
                f"step {step + 1:6d}  loss {running:7.3f}  {final}  lr {optimizer.param_groups[0]['lr']:.2e}  {elapsed / 60:5.1f} min",
                flush=True,
            )
        done = args.minutes is not None and elapsed > args.minutes * 60
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or done:
            info |= {"steps_done": step + 1, "final_loss_ema": running, "minutes": elapsed / 60}
            save_checkpoint(model, args.out, info)
            print(f"saved {args.out} at step {step + 1}", flush=True)
        if done:
            break
    return 0


@torch.no_grad()
def _init_weights(model: Mask2Former) -> None:
    """Truncated-normal linear weights (std 0.02), as Swin and DETR-style decoders are initialized; the
    learnable queries and level embeddings from N(0, 1); MSDeformAttn as in Deformable DETR."""
    for name, p in model.named_parameters():
        if name.endswith(("query_feat", "query_pos", "level_embed")):
            torch.nn.init.normal_(p)
        elif name.endswith("relative_position_bias_table"):
            torch.nn.init.trunc_normal_(p, std=0.02)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, MSDeformAttn):
            # Deformable DETR's start: each head samples along its own ray, point i at distance i + 1,
            # with uniform attention over the points.
            torch.nn.init.zeros_(m.sampling_offsets.weight)
            theta = torch.arange(m.heads) * (2 * math.pi / m.heads)
            ray = torch.stack([theta.cos(), theta.sin()], -1)
            ray = ray / ray.abs().max(-1, keepdim=True).values  # (heads, 2)
            grid = ray[:, None, None, :] * torch.arange(1, m.points + 1)[None, None, :, None]  # (heads, 1, P, 2)
            m.sampling_offsets.bias.copy_(grid.expand(m.heads, m.levels, m.points, 2).reshape(-1))
            torch.nn.init.zeros_(m.attention_weights.weight)
            torch.nn.init.zeros_(m.attention_weights.bias)


if __name__ == "__main__":
    sys.exit(main())
