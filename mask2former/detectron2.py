"""detectron2 Mask2Former checkpoints: read them safely, derive the architecture, map the keys.

Two file formats (the official code's):

- ``model_final.pth``: ``torch.save`` of ``{"model": state_dict, "trainer": ..., "iteration": ...}`` (older
  files: ``optimizer``, ``scheduler``), read with ``torch.load(weights_only=True)``; a bare state dict
  works too, and a ``module.`` prefix (DistributedDataParallel) is stripped.
- model-zoo ``.pkl``: a pickle (``encoding="latin1"``) of ``{"model": {name: numpy array}, "__author__",
  "matching_heuristics"}``, read by :class:`RestrictedUnpickler`, which rebuilds numpy arrays and refuses
  every other global, so a malicious file cannot run code.

A d2 checkpoint has no config: :func:`infer_config` derives everything the tensors determine (backbone
kind and depth, Swin width, depths, heads and window from the relative-position tables, queries, classes,
layers, widths, heads of the deformable attention); labels, thing ids and the test-time resize come from a
label set (:mod:`pipeline.label_sets`).

Keys map onto ``transformers``' (5.x) layout by one pure rule table, :func:`match_d2_key`; from there
:func:`mask2former.weights.convert_hf_state_dict` maps them onto our modules (folding batch norms, fusing
q/k/v) and fails loudly. So a d2 file loads through exactly the path an HF checkpoint takes, and ``m2f
convert`` writes the intermediate HF state dict as an HF checkpoint folder.
"""

from __future__ import annotations

import importlib
import json
import logging
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline.config import Mask2FormerConfig, ResNetConfig, SwinConfig, preprocess_to_hf
from pipeline.label_sets import SETS_BY_COUNT, apply_labels, detect_label_set, resolve_labels

log = logging.getLogger(__name__)

_PIX = "model.pixel_level_module."
_TRF = "model.transformer_module."
_SWIN = _PIX + "encoder.swin."
_RES = _PIX + "encoder.encoder.stages."
_BN_PART = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_PD = r"^sem_seg_head\.pixel_decoder\."
_ENC = _PD + r"transformer\.encoder\.layers\.(\d+)\."
_PR = r"^sem_seg_head\.predictor\."
_SA = _PR + r"transformer_self_attention_layers\.(\d+)\."
_CA = _PR + r"transformer_cross_attention_layers\.(\d+)\."
_FFN = _PR + r"transformer_ffn_layers\.(\d+)\."
_BLOCK = r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\."


def _stage(m: re.Match[str]) -> str:
    """HF's ResNet stage and block for detectron2's ``res{S}.{B}``: ``S-2`` and ``B``."""
    return f"{_RES}{int(m[1]) - 2}.layers.{m[2]}"


# detectron2 key -> HF 5.x key. A replacement with "{part}" splits the tensor into q, k, v thirds (dim 0).
_RULES: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(p), r)
    for p, r in [
        # ResNet (FrozenBN: 4 statistics; SyncBN adds num_batches_tracked)
        (r"^backbone\.stem\.conv1\.weight$", _PIX + "encoder.embedder.embedder.convolution.weight"),
        (r"^backbone\.stem\.conv1\.norm\." + _BN_PART + "$", _PIX + r"encoder.embedder.embedder.normalization.\1"),
        (r"^backbone\.res([2-5])\.(\d+)\.shortcut\.weight$", lambda m: f"{_stage(m)}.shortcut.convolution.weight"),
        (r"^backbone\.res([2-5])\.(\d+)\.shortcut\.norm\." + _BN_PART + "$",
         lambda m: f"{_stage(m)}.shortcut.normalization.{m[3]}"),
        (r"^backbone\.res([2-5])\.(\d+)\.conv([123])\.weight$",
         lambda m: f"{_stage(m)}.layer.{int(m[3]) - 1}.convolution.weight"),
        (r"^backbone\.res([2-5])\.(\d+)\.conv([123])\.norm\." + _BN_PART + "$",
         lambda m: f"{_stage(m)}.layer.{int(m[3]) - 1}.normalization.{m[4]}"),
        # Swin (D2SwinTransformer)
        (r"^backbone\.patch_embed\.proj\.(weight|bias)$", _SWIN + r"embeddings.patch_embeddings.projection.\1"),
        (r"^backbone\.patch_embed\.norm\.(weight|bias)$", _SWIN + r"embeddings.norm.\1"),
        (_BLOCK + r"norm1\.(weight|bias)$", _SWIN + r"encoder.layers.\1.blocks.\2.layernorm_before.\3"),
        (_BLOCK + r"norm2\.(weight|bias)$", _SWIN + r"encoder.layers.\1.blocks.\2.layernorm_after.\3"),
        (_BLOCK + r"attn\.qkv\.(weight|bias)$", _SWIN + r"encoder.layers.\1.blocks.\2.attention.{part}_proj.\3"),
        (_BLOCK + r"attn\.proj\.(weight|bias)$", _SWIN + r"encoder.layers.\1.blocks.\2.attention.o_proj.\3"),
        (_BLOCK + r"attn\.relative_position_bias_table$",
         _SWIN + r"encoder.layers.\1.blocks.\2.attention.relative_position_bias.relative_position_bias_table"),
        (_BLOCK + r"mlp\.(fc1|fc2)\.(weight|bias)$", _SWIN + r"encoder.layers.\1.blocks.\2.mlp.\3.\4"),
        (r"^backbone\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)$",
         _SWIN + r"encoder.layers.\1.downsample.\2.\3"),
        (r"^backbone\.norm(\d)\.(weight|bias)$", lambda m: f"{_PIX}encoder.hidden_states_norms.stage{int(m[1]) + 1}.{m[2]}"),
        # MSDeformAttn pixel decoder; input_proj.0 is res5 in both
        (_PD + r"input_proj\.(\d)\.([01])\.(weight|bias)$", _PIX + r"decoder.input_projections.\1.\2.\3"),
        (_PD + r"transformer\.level_embed$", _PIX + "decoder.level_embed"),
        (_ENC + r"self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)$",
         _PIX + r"decoder.encoder.layers.\1.self_attn.\2.\3"),
        (_ENC + r"norm1\.(weight|bias)$", _PIX + r"decoder.encoder.layers.\1.self_attn_layer_norm.\2"),
        (_ENC + r"linear1\.(weight|bias)$", _PIX + r"decoder.encoder.layers.\1.fc1.\2"),
        (_ENC + r"linear2\.(weight|bias)$", _PIX + r"decoder.encoder.layers.\1.fc2.\2"),
        (_ENC + r"norm2\.(weight|bias)$", _PIX + r"decoder.encoder.layers.\1.final_layer_norm.\2"),
        (_PD + r"mask_features\.(weight|bias)$", _PIX + r"decoder.mask_projection.\1"),
        (_PD + r"(adapter_1|layer_1)\.weight$", _PIX + r"decoder.\1.0.weight"),  # no conv bias
        (_PD + r"(adapter_1|layer_1)\.norm\.(weight|bias)$", _PIX + r"decoder.\1.1.\2"),
        # masked-attention transformer decoder; in_proj is q/k/v fused
        (_SA + r"self_attn\.in_proj_(weight|bias)$", _TRF + r"decoder.layers.\1.self_attn.{part}_proj.\2"),
        (_SA + r"self_attn\.out_proj\.(weight|bias)$", _TRF + r"decoder.layers.\1.self_attn.out_proj.\2"),
        (_SA + r"norm\.(weight|bias)$", _TRF + r"decoder.layers.\1.self_attn_layer_norm.\2"),
        (_CA + r"multihead_attn\.in_proj_(weight|bias)$", _TRF + r"decoder.layers.\1.cross_attn.in_proj_\2"),
        (_CA + r"multihead_attn\.out_proj\.(weight|bias)$", _TRF + r"decoder.layers.\1.cross_attn.out_proj.\2"),
        (_CA + r"norm\.(weight|bias)$", _TRF + r"decoder.layers.\1.cross_attn_layer_norm.\2"),
        (_FFN + r"(linear1|linear2)\.(weight|bias)$",
         lambda m: f"{_TRF}decoder.layers.{m[1]}.fc{m[2][-1]}.{m[3]}"),
        (_FFN + r"norm\.(weight|bias)$", _TRF + r"decoder.layers.\1.final_layer_norm.\2"),
        (_PR + r"decoder_norm\.(weight|bias)$", _TRF + r"decoder.layernorm.\1"),
        (_PR + r"query_feat\.weight$", _TRF + "queries_features.weight"),
        (_PR + r"query_embed\.weight$", _TRF + "queries_embedder.weight"),
        (_PR + r"level_embed\.weight$", _TRF + "level_embed.weight"),
        (_PR + r"input_proj\.(\d)\.(weight|bias)$", _TRF + r"input_projections.\1.\2"),
        (_PR + r"class_embed\.(weight|bias)$", r"class_predictor.\1"),
        (_PR + r"mask_embed\.layers\.(\d)\.(weight|bias)$", _TRF + r"decoder.mask_predictor.mask_embedder.\1.0.\2"),
    ]
]  # fmt: skip

# Keys that hold no weights: the loss's class weights, Swin's index buffers (recomputed from the window), and
# the input normalization some older files carry (:func:`infer_config` reads it into the preprocessing).
_IGNORED = re.compile(r"^criterion\.empty_weight$|\.relative_position_index$|^pixel_(mean|std)$")


class UnsafeCheckpointError(ValueError):
    """A pickle asked for a global outside the numpy-array allow-list; nothing of it was executed."""


class CheckpointReadError(ValueError):
    """A file that is not a readable detectron2 checkpoint (truncated, not a pickle, no state dict, ...)."""


def match_d2_key(key: str) -> str | list[str] | None:
    """The HF key of a detectron2 key; a list of the q, k, v keys for a fused tensor; None for ignored keys.

    Raises:
        KeyError: a key no rule knows.
    """
    if _IGNORED.search(key):
        return None
    for pattern, repl in _RULES:
        if m := pattern.match(key):
            name = repl(m) if callable(repl) else m.expand(repl)
            return [name.format(part=p) for p in "qkv"] if "{part}" in name else name
    raise KeyError(key)


def to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Map a detectron2 state dict onto ``transformers``' key layout.

    Fused q/k/v tensors are split into thirds (copies, so each can be saved alone). Keys no rule knows are
    kept under their own name, so that :func:`mask2former.weights.convert_hf_state_dict` reports them as
    unused.

    Returns:
        (the HF state dict, {HF key: the detectron2 key it came from}) for error messages.
    """
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for key, tensor in state.items():
        try:
            target = match_d2_key(key)
        except KeyError:
            target = key
        if target is None:
            continue
        if isinstance(target, list):
            if tensor.shape[0] % 3:
                target, parts = key, [tensor]  # not q/k/v thirds: reported as unused under its own name
            else:
                parts = [t.clone() for t in tensor.chunk(3, dim=0)]  # (3C, ...) -> 3 x (C, ...)
            for name, part in zip(target if isinstance(target, list) else [target], parts):
                out[name], sources[name] = part, key
        else:
            out[target], sources[target] = tensor, key
    return out, sources


# ---------------------------------------------------------------------------------------------- reading
# The globals a pickle of numpy arrays needs (numpy 1.x writes numpy.core.*, 2.x numpy._core.*).
_NUMPY_GLOBALS = frozenset(
    {("collections", "OrderedDict"), ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype")}
    | {(f"{ns}.multiarray", n) for ns in ("numpy.core", "numpy._core") for n in ("_reconstruct", "scalar")}
    | {(f"{ns}.numeric", "_frombuffer") for ns in ("numpy.core", "numpy._core")}
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes, scalars and plain containers; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise UnsafeCheckpointError(
                f"refusing to unpickle global {module}.{name}: a detectron2 .pkl holds numpy arrays only "
                "(nothing from the file was run)"
            )
        if module.startswith("numpy.core.") or module.startswith("numpy._core."):
            sub = module.split(".", 2)[2]
            for ns in ("numpy._core", "numpy.core"):  # whichever this numpy has, without deprecated aliases
                try:
                    return getattr(importlib.import_module(f"{ns}.{sub}"), name)
                except ImportError:
                    continue
        return super().find_class(module, name)


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    unsupported = [line for line in lines if "Unsupported global" in line]
    return (unsupported or lines or [type(e).__name__])[0]


def read_detectron2_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a ``model_final.pth`` or model-zoo ``.pkl`` file (``module.`` prefix stripped).

    Raises:
        UnsafeCheckpointError: a pickle that needs a global outside the numpy allow-list.
        CheckpointReadError: a file that cannot be read as either format (one line).
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        if zipfile.is_zipfile(path) or path.suffix != ".pkl":
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            with open(path, "rb") as f:
                obj = RestrictedUnpickler(f, encoding="latin1").load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated or foreign files raise many kinds; all become one line
        raise CheckpointReadError(f"cannot read {path} as a detectron2 checkpoint: {_one_line(e)}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointReadError(f"{path} holds no state dict (expected {{'model': {{name: tensor}}}})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, (torch.Tensor, np.ndarray))]
    if bad:
        raise CheckpointReadError(f"{path}: not a state dict: {len(bad)} entries are not tensors, e.g. {bad[0]!r}")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return {k: v if isinstance(v, torch.Tensor) else _tensor(v) for k, v in obj.items()}


def _tensor(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


# ---------------------------------------------------------------------------------------------- architecture
def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    """How many consecutive indices ``i`` (from 0) have a key matching ``pattern`` with ``(\\d+)`` = i."""
    found = {int(m[1]) for k in state if (m := re.match(pattern, k))}
    n = 0
    while n in found:
        n += 1
    return n


def _require(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointReadError(f"not a detectron2 Mask2Former state dict: no {key}")
    return state[key]


def _backbone(state: Mapping[str, torch.Tensor]) -> SwinConfig | ResNetConfig:
    if "backbone.stem.conv1.weight" in state:
        stem = state["backbone.stem.conv1.weight"]  # (C_stem, 3, 7, 7)
        depths = tuple(_count(state, rf"^backbone\.res{s}\.(\d+)\.") for s in range(2, 6))
        widths = tuple(_require(state, f"backbone.res{s}.0.conv3.weight").shape[0] for s in range(2, 6))
        return ResNetConfig(depths=depths, hidden_sizes=widths, embedding_size=stem.shape[0], in_channels=stem.shape[1])
    if "backbone.patch_embed.proj.weight" in state:
        proj = state["backbone.patch_embed.proj.weight"]  # (C, 3, p, p)
        stages = _count(state, r"^backbone\.layers\.(\d+)\.blocks\.0\.")
        depths = tuple(_count(state, rf"^backbone\.layers\.{i}\.blocks\.(\d+)\.") for i in range(stages))
        # (2w-1)^2 rows, one column per head
        tables = [
            _require(state, f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table") for i in range(stages)
        ]
        side = round(tables[0].shape[0] ** 0.5)
        if side * side != tables[0].shape[0] or side % 2 == 0:
            raise CheckpointReadError(f"Swin relative-position table of {tables[0].shape[0]} rows: not (2w-1)^2")
        fc1 = _require(state, "backbone.layers.0.blocks.0.mlp.fc1.weight")  # (C * mlp_ratio, C)
        return SwinConfig(
            embed_dim=proj.shape[0],
            depths=depths,
            num_heads=tuple(t.shape[1] for t in tables),
            window_size=(side + 1) // 2,
            patch_size=proj.shape[-1],
            mlp_ratio=fc1.shape[0] / fc1.shape[1],
            qkv_bias="backbone.layers.0.blocks.0.attn.qkv.bias" in state,
            in_channels=proj.shape[1],
        )
    raise CheckpointReadError("not a detectron2 Mask2Former state dict: no ResNet or Swin backbone keys")


def infer_config(state: Mapping[str, torch.Tensor], name: str = "mask2former") -> Mask2FormerConfig:
    """The architecture a detectron2 state dict determines, with generic labels and COCO's resize.

    Heads: the deformable attention's (its sampling offsets have heads x 3 levels x 4 points x 2 rows);
    the official configs use the same number (8) in the decoder, whose weights do not show it.

    Raises:
        CheckpointReadError: a state dict without the keys that determine the architecture (one line).
    """
    pd, pr = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
    level_embed = _require(state, pd + "transformer.level_embed")  # (3, C_pixel)
    offsets = _require(state, pd + "transformer.encoder.layers.0.self_attn.sampling_offsets.weight")
    query_feat = _require(state, pr + "query_feat.weight")  # (Q, C)
    class_embed = _require(state, pr + "class_embed.weight")  # (K + 1, C)
    feature_size, hidden = level_embed.shape[1], query_feat.shape[1]
    kw: dict[str, Any] = {}
    if "pixel_mean" in state and "pixel_std" in state:  # older files carry the input normalization
        kw["mean"] = tuple(float(v) for v in state["pixel_mean"].flatten())
        kw["std"] = tuple(float(v) for v in state["pixel_std"].flatten())
    cfg = Mask2FormerConfig(
        backbone=_backbone(state),
        num_labels=class_embed.shape[0] - 1,
        num_queries=query_feat.shape[0],
        hidden_dim=hidden,
        feature_size=feature_size,
        mask_feature_size=_require(state, pd + "mask_features.weight").shape[0],
        encoder_layers=_count(state, r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\."),
        encoder_feedforward_dim=_require(state, pd + "transformer.encoder.layers.0.linear1.weight").shape[0],
        decoder_layers=_count(state, r"^sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\."),
        num_attention_heads=offsets.shape[0] // (3 * 4 * 2),
        dim_feedforward=_require(state, pr + "transformer_ffn_layers.0.linear1.weight").shape[0],
        enforce_input_projection=feature_size == hidden and pr + "input_proj.0.weight" in state,
        name=name,
    )
    return cfg.with_preprocess(**kw) if kw else cfg


def read_detectron2(
    path: str | Path, labels: str | Path | None = None
) -> tuple[Mask2FormerConfig, dict[str, torch.Tensor], dict[str, str]]:
    """Read a detectron2 checkpoint file: its config, its tensors under HF keys, and their d2 names.

    Args:
        path: a ``model_final.pth`` or model-zoo ``.pkl`` file.
        labels: a label-set name (:data:`pipeline.label_sets.LABEL_SETS`) or a labels JSON file; by
            default the set the file shows (:func:`pipeline.label_sets.detect_label_set`: the class count,
            and where semantic and panoptic sets share it, an official model-zoo file name or 200 queries),
            else generic names. The config's ``label_source`` says which set was chosen and why; it is logged.
    Returns:
        (config, HF state dict, {HF key: detectron2 key}).
    Raises:
        ValueError: unreadable or unsafe file, missing architecture keys, labels of another class count, a class
            count several label sets share without anything in the file that decides (``LabelSetUnknown``).
    """
    path = Path(path)
    state = read_detectron2_file(path)
    cfg = infer_config(state, name=path.parent.name if path.stem == "model_final" else path.stem)
    if labels is not None:
        cfg = apply_labels(cfg, resolve_labels(labels, cfg.num_labels))
    else:
        label_set, why = detect_label_set(cfg.num_labels, cfg.num_queries, path.name)
        shared = cfg.num_labels in SETS_BY_COUNT  # chosen among several sets: said where it is always seen
        log.log(
            logging.WARNING if shared else logging.INFO, "%s: labels, things and test-time resize: %s", path.name, why
        )
        cfg = apply_labels(cfg, label_set, source=why)
    hf_state, sources = to_hf_state_dict(state)
    return cfg, hf_state, sources


def write_hf_checkpoint(cfg: Mask2FormerConfig, hf_state: Mapping[str, torch.Tensor], folder: str | Path) -> Path:
    """Write ``config.json`` (with ``thing_ids``), ``preprocessor_config.json`` and ``model.safetensors``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_name_or_path": cfg.name, **cfg.to_hf_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    preprocessor = preprocess_to_hf(cfg.preprocess)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in hf_state.items()}, folder / "model.safetensors")
    return folder
