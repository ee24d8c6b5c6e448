"""Loading HF Mask2Former checkpoints into :class:`~mask2former.mask2former.Mask2Former`.

:func:`convert_hf_state_dict` is a pure key mapping: it renames HF keys to ours, fuses the Swin and
decoder self-attention q/k/v projections into one weight, folds each ResNet batch norm's four statistics
into one per-channel scale and shift (:func:`mask2former.resnet.fold_batch_norm`), and raises
:class:`CheckpointMismatch` naming every missing, unused or mis-shaped key. Both HF layouts are accepted:
the one ``transformers`` 4.x wrote (the public hub checkpoints: ``attention.self.query``,
``intermediate.dense``, ...) and the 5.x one. detectron2 checkpoint files are mapped onto the 5.x layout
first (:mod:`mask2former.detectron2`) and then take the same path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from mask2former.detectron2 import read_detectron2
from mask2former.mask2former import Mask2Former
from mask2former.resnet import fold_batch_norm
from pipeline.config import Mask2FormerConfig, ResNetConfig, read_config
from pipeline.label_sets import apply_labels, resolve_labels

_PIX = r"^model\.pixel_level_module\."
_TRF = r"^model\.transformer_module\."
_BLOCK = _PIX + r"encoder\.swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_PDEC = _PIX + r"decoder\.encoder\.layers\.(\d+)\."
_TDEC = _TRF + r"decoder\.layers\.(\d+)\."
_RES_STEM = _PIX + r"encoder\.embedder\.embedder\."
_RES_BLOCK = _PIX + r"encoder\.encoder\.stages\.(\d+)\.layers\.(\d+)\."
_BN_STATS = ("weight", "bias", "running_mean", "running_var")
_BN = r"normalization\.(?P<part>weight|bias|running_mean|running_var)$"

# transformers 4.x names -> 5.x names (applied first, in order).
_LEGACY: list[tuple[str, str]] = [
    (_PIX + r"encoder\.(embeddings\.|encoder\.layers\.)", r"model.pixel_level_module.encoder.swin.\1"),
    (r"\.attention\.self\.query\.", ".attention.q_proj."),
    (r"\.attention\.self\.key\.", ".attention.k_proj."),
    (r"\.attention\.self\.value\.", ".attention.v_proj."),
    (r"\.attention\.self\.relative_position_bias_table$", ".attention.relative_position_bias.relative_position_bias_table"),
    (r"\.attention\.self\.relative_position_index$", ".attention.relative_position_index"),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"(\.blocks\.\d+)\.intermediate\.dense\.", r"\1.mlp.fc1."),
    (r"(\.blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
]  # fmt: skip

# Keys that hold no weights we use: the loss's class weights, Swin's index buffers (recomputed from the
# window size), the final norm of HF's SwinModel, whose output the backbone does not use, and the batch
# norms' step counters.
_IGNORED = [
    re.compile(r"^criterion\.empty_weight$"),
    re.compile(r"\.relative_position_index$"),
    re.compile(r"\.num_batches_tracked$"),
    re.compile(_PIX + r"encoder\.swin\.layernorm\.(weight|bias)$"),
]

Rename = tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]


def _res_block(m: re.Match[str]) -> str:
    """Our name of HF ResNet block ``encoder.stages.S.layers.L``: ``backbone.res{S+2}.L`` (detectron2's)."""
    return f"backbone.res{int(m[1]) + 2}.{m[2]}"


def _rules(table: list[tuple[str, str | Callable[[re.Match[str]], str]]]) -> list[Rename]:
    return [(re.compile(p), r) for p, r in table]


# One-to-one renames: HF 5.x key -> our key.
_RENAMES = _rules([
    (_PIX + r"encoder\.swin\.embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"backbone.patch_embed.proj.\1"),
    (_PIX + r"encoder\.swin\.embeddings\.norm\.(weight|bias)$", r"backbone.patch_embed.norm.\1"),
    (_BLOCK + r"layernorm_before\.(weight|bias)$", r"backbone.stages.\1.blocks.\2.norm1.\3"),
    (_BLOCK + r"layernorm_after\.(weight|bias)$", r"backbone.stages.\1.blocks.\2.norm2.\3"),
    (_BLOCK + r"attention\.o_proj\.(weight|bias)$", r"backbone.stages.\1.blocks.\2.attn.proj.\3"),
    (_BLOCK + r"attention\.relative_position_bias\.relative_position_bias_table$",
     r"backbone.stages.\1.blocks.\2.attn.relative_position_bias_table"),
    (_BLOCK + r"mlp\.(fc1|fc2)\.(weight|bias)$", r"backbone.stages.\1.blocks.\2.mlp.\3.\4"),
    (_PIX + r"encoder\.swin\.encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)$",
     r"backbone.stages.\1.downsample.\2.\3"),
    (_PIX + r"encoder\.hidden_states_norms\.stage(\d)\.(weight|bias)$",
     lambda m: f"backbone.out_norms.{int(m[1]) - 1}.{m[2]}"),
    (_RES_STEM + r"convolution\.weight$", "backbone.stem.conv1.weight"),
    (_RES_BLOCK + r"shortcut\.convolution\.weight$", lambda m: f"{_res_block(m)}.shortcut.weight"),
    (_RES_BLOCK + r"layer\.([012])\.convolution\.weight$", lambda m: f"{_res_block(m)}.conv{int(m[3]) + 1}.weight"),
    (_PIX + r"decoder\.level_embed$", "pixel_decoder.level_embed"),
    (_PIX + r"decoder\.input_projections\.(\d)\.([01])\.(weight|bias)$", r"pixel_decoder.input_proj.\1.\2.\3"),
    (_PDEC + r"self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)$",
     r"pixel_decoder.encoder.\1.self_attn.\2.\3"),
    (_PDEC + r"self_attn_layer_norm\.(weight|bias)$", r"pixel_decoder.encoder.\1.norm1.\2"),
    (_PDEC + r"(fc1|fc2)\.(weight|bias)$", r"pixel_decoder.encoder.\1.\2.\3"),
    (_PDEC + r"final_layer_norm\.(weight|bias)$", r"pixel_decoder.encoder.\1.norm2.\2"),
    (_PIX + r"decoder\.mask_projection\.(weight|bias)$", r"pixel_decoder.mask_proj.\1"),
    (_PIX + r"decoder\.adapter_1\.([01])\.(weight|bias)$", r"pixel_decoder.lateral.\1.\2"),
    (_PIX + r"decoder\.layer_1\.([01])\.(weight|bias)$", r"pixel_decoder.output.\1.\2"),
    (_TRF + r"queries_embedder\.weight$", "decoder.query_pos"),
    (_TRF + r"queries_features\.weight$", "decoder.query_feat"),
    (_TRF + r"level_embed\.weight$", "decoder.level_embed"),
    (_TRF + r"input_projections\.(\d)\.(weight|bias)$", r"decoder.input_proj.\1.\2"),
    (_TDEC + r"cross_attn\.in_proj_(weight|bias)$", r"decoder.layers.\1.cross_attn.in_proj_\2"),
    (_TDEC + r"(cross_attn|self_attn)\.out_proj\.(weight|bias)$", r"decoder.layers.\1.\2.out_proj.\3"),
    (_TDEC + r"cross_attn_layer_norm\.(weight|bias)$", r"decoder.layers.\1.norm_cross.\2"),
    (_TDEC + r"self_attn_layer_norm\.(weight|bias)$", r"decoder.layers.\1.norm_self.\2"),
    (_TDEC + r"final_layer_norm\.(weight|bias)$", r"decoder.layers.\1.norm_ffn.\2"),
    (_TDEC + r"(fc1|fc2)\.(weight|bias)$", r"decoder.layers.\1.\2.\3"),
    (_TRF + r"decoder\.layernorm\.(weight|bias)$", r"decoder.norm.\1"),
    (_TRF + r"decoder\.mask_predictor\.mask_embedder\.(\d)\.0\.(weight|bias)$", r"decoder.mask_head.layers.\1.\2"),
    (r"^class_predictor\.(weight|bias)$", r"decoder.class_head.\1"),
])  # fmt: skip

# Separate q/k/v projections fused into one (3C, C) weight, in q, k, v order. Group "part" is q, k or v.
_FUSES = _rules([
    (_BLOCK + r"attention\.(?P<part>[qkv])_proj\.(weight|bias)$", r"backbone.stages.\1.blocks.\2.attn.qkv.\4"),
    (_TDEC + r"self_attn\.(?P<part>[qkv])_proj\.(weight|bias)$", r"decoder.layers.\1.self_attn.in_proj_\3"),
])  # fmt: skip


# Batch norms whose four statistics fold into our ``<module>.scale`` and ``<module>.shift``; the target is our
# norm module, group "part" the statistic.
_FOLDS = _rules([
    (_RES_STEM + _BN, "backbone.stem.conv1.norm"),
    (_RES_BLOCK + r"shortcut\." + _BN, lambda m: f"{_res_block(m)}.shortcut.norm"),
    (_RES_BLOCK + r"layer\.([012])\." + _BN, lambda m: f"{_res_block(m)}.conv{int(m[3]) + 1}.norm"),
])  # fmt: skip


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model.

    The attributes list every offending key; the message is one line naming the first
    :attr:`SHOWN` of each kind.
    """

    SHOWN = 10

    def __init__(self, missing: list[str], unused: list[str], misshaped: list[str]):
        self.missing, self.unused, self.misshaped = missing, unused, misshaped
        parts = []
        for title, keys in (("missing", missing), ("unused", unused), ("mis-shaped", misshaped)):
            if keys:
                more = f", ... ({len(keys) - self.SHOWN} more)" if len(keys) > self.SHOWN else ""
                parts.append(f"{len(keys)} {title} key(s): " + ", ".join(keys[: self.SHOWN]) + more)
        super().__init__("checkpoint does not match the model config; " + "; ".join(parts))

    def renamed(self, names: Mapping[str, str]) -> CheckpointMismatch:
        """The same mismatch with every checkpoint key in ``names`` written as its value (e.g. the
        detectron2 name of an HF key)."""

        def rename(entry: str) -> str:
            return re.sub(r"[\w.]+", lambda m: names.get(m[0], m[0]), entry)

        return CheckpointMismatch(self.missing, sorted(map(rename, self.unused)), sorted(map(rename, self.misshaped)))


def _legacy_to_current(key: str) -> str:
    for pattern, repl in _LEGACY:
        key = re.sub(pattern, repl, key)
    return key


def _substitute(match: re.Match[str], repl: str | Callable[[re.Match[str]], str]) -> str:
    return repl(match) if callable(repl) else match.expand(repl)


def match_hf_key(key: str) -> tuple[str, str | None] | None:
    """Where an HF key goes in our model, or None for keys we ignore.

    Returns (our key, None) for a rename; (our fused key, "q" | "k" | "v") for a q/k/v part; (our norm
    module, "weight" | "bias" | "running_mean" | "running_var") for a batch-norm statistic folded into that
    module's ``scale`` and ``shift``. Raises KeyError for a key no rule knows.
    """
    key = _legacy_to_current(key)
    if any(p.search(key) for p in _IGNORED):
        return None
    for pattern, repl in (*_FUSES, *_FOLDS):
        if m := pattern.match(key):
            return _substitute(m, repl), m["part"]
    for pattern, repl in _RENAMES:
        if m := pattern.match(key):
            return _substitute(m, repl), None
    raise KeyError(key)


def convert_hf_state_dict(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], norm_eps: float = 1e-5
) -> dict[str, torch.Tensor]:
    """Map an HF ``Mask2FormerForUniversalSegmentation`` state dict onto our parameter names.

    Args:
        state: the checkpoint's tensors by HF key (4.x or 5.x layout).
        expected: our parameter shapes by key (``{k: v.shape for k, v in model.state_dict().items()}``).
        norm_eps: the epsilon of the checkpoint's batch norms (ResNet backbones), used to fold them.
    Returns:
        Our state dict, exactly the keys of ``expected``.
    Raises:
        CheckpointMismatch: naming every expected key not produced, checkpoint key not used, and tensor
            whose shape differs from ``expected``.
    """
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}  # our key -> HF key(s) it came from, for error messages
    fused: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    folded: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}  # our norm module -> statistic -> source
    unused: list[str] = []
    misshaped: list[str] = []
    for original, tensor in state.items():
        try:
            target = match_hf_key(original)
        except KeyError:
            unused.append(original)
            continue
        if target is None:
            continue
        key, part = target
        if part in _BN_STATS:
            folded.setdefault(key, {})[part] = (original, tensor)
        elif part is not None:
            fused.setdefault(key, {})[part] = (original, tensor)
        elif key in out:
            unused.append(f"{original} (duplicates {sources[key]})")
        else:
            out[key], sources[key] = tensor, original
    for target, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            unused.extend(f"{src} (its q/k/v siblings are missing)" for src, _ in parts.values())
            continue
        out[target] = torch.cat([parts[p][1] for p in "qkv"], dim=0)
        sources[target] = "+".join(parts[p][0] for p in "qkv")
    for module, stats in folded.items():
        if set(stats) != set(_BN_STATS):
            unused.extend(f"{src} (its batch-norm siblings are missing)" for src, _ in stats.values())
            continue
        shapes = {s: tuple(stats[s][1].shape) for s in _BN_STATS}
        if len(set(shapes.values())) != 1:  # would broadcast silently in the fold
            misshaped.append(f"{module}: batch-norm statistics of different shapes {shapes}")
            continue
        scale, shift = fold_batch_norm(*(stats[s][1] for s in _BN_STATS), eps=norm_eps)
        source = "+".join(stats[s][0] for s in _BN_STATS)
        for name, tensor in (("scale", scale), ("shift", shift)):
            out[f"{module}.{name}"], sources[f"{module}.{name}"] = tensor, source
    missing = sorted(k for k in expected if k not in out)
    unused.extend(f"{sources[k]} (-> {k}, not in the model)" for k in out if k not in expected)
    misshaped = sorted(
        misshaped
        + [
            f"{sources[k]} -> {k}: checkpoint {tuple(t.shape)}, model {tuple(expected[k])}"
            for k, t in out.items()
            if k in expected and tuple(t.shape) != tuple(expected[k])
        ]
    )
    if missing or unused or misshaped:
        raise CheckpointMismatch(missing, sorted(unused), misshaped)
    return out


def to_hf_state_dict(
    state: Mapping[str, torch.Tensor], hf_keys: list[str], norm_eps: float = 1e-5
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`convert_hf_state_dict`: our tensors under the given HF keys.

    ``hf_keys`` are the keys of an HF model of the same config (ignored keys, such as the loss's class
    weights and the batch norms' step counters, are left out of the result). Fused q/k/v weights are split
    back into thirds. A folded batch norm is written as weight = scale, bias = shift, running_mean = 0,
    running_var = 1 - ``norm_eps``: the same function, not the original statistics (folding drops them).
    """
    out = {}
    for hf_key in hf_keys:
        target = match_hf_key(hf_key)
        if target is None:
            continue
        key, part = target
        if part in ("weight", "bias"):
            out[hf_key] = state[f"{key}.{'scale' if part == 'weight' else 'shift'}"]
        elif part == "running_mean":
            out[hf_key] = torch.zeros_like(state[f"{key}.shift"])
        elif part == "running_var":
            out[hf_key] = torch.full_like(state[f"{key}.scale"], 1.0 - norm_eps)
        else:
            tensor = state[key]
            out[hf_key] = tensor if part is None else tensor.chunk(3, dim=0)["qkv".index(part)]
    return out


def read_hf_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an HF checkpoint folder: ``model.safetensors`` (sharded too) or ``pytorch_model.bin``."""
    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    binary = folder / "pytorch_model.bin"
    if binary.is_file():
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


# The bundled demo model (see weights/demo/README.md), used when no checkpoint is named.
DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "demo"


def load_model(
    path: str | Path | None = None, device: str | torch.device = "cpu", labels: str | Path | None = None
) -> Mask2Former:
    """Build the model from a checkpoint and load its weights; returned in eval mode.

    Args:
        path: an HF checkpoint folder, or a detectron2 checkpoint file (``model_final.pth``, model-zoo
            ``.pkl``; :mod:`mask2former.detectron2`). None: the bundled demo model.
        device: torch device.
        labels: a label-set name (:data:`pipeline.label_sets.LABEL_SETS`) or labels JSON file giving the
            class names, thing ids, test-time resize and panoptic threshold; a detectron2 file without it gets
            the set the file shows (:func:`mask2former.detectron2.read_detectron2`), or a one-line error when
            its class count fits several. Must have the checkpoint's class count.
    The config (labels, thing/stuff flags, preprocessing) is on ``model.config``.
    """
    path = Path(DEMO_WEIGHTS if path is None else path)
    names: dict[str, str] = {}
    if path.is_file() or path.suffix in (".pkl", ".pth"):
        cfg, hf_state, names = read_detectron2(path, labels)
    else:
        cfg = read_config(path)
        if labels is not None:
            cfg = apply_labels(cfg, resolve_labels(labels, cfg.num_labels))
        hf_state = read_hf_state_dict(path)
    return build_model(cfg, hf_state, names).to(device)


def build_model(
    cfg: Mask2FormerConfig, hf_state: Mapping[str, torch.Tensor], names: Mapping[str, str] | None = None
) -> Mask2Former:
    """The model of ``cfg`` with the weights of an HF state dict (:func:`convert_hf_state_dict`), in eval mode.

    ``names`` ({HF key: original key}) rewrites the keys in a :class:`CheckpointMismatch` into the names the
    checkpoint file uses (detectron2's).
    """
    model = Mask2Former(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    norm_eps = cfg.backbone.norm_eps if isinstance(cfg.backbone, ResNetConfig) else 1e-5
    try:
        state = convert_hf_state_dict(hf_state, expected, norm_eps=norm_eps)
    except CheckpointMismatch as e:
        raise e.renamed(names) if names else e from None
    model.load_state_dict(state, strict=True)
    return model.eval()
