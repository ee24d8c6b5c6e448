"""Typed configuration for Mask2Former, built from (and written back to) an HF ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.labels import known_thing_ids

# ImageNet statistics in the 0..255 scale, as the public checkpoints were trained with.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


# Post-processing defaults a checkpoint may carry in its config.json (our keys; HF configs have none), besides
# ``instance_threshold`` (a number or null).
POSTPROCESS_KEYS = ("threshold", "mask_threshold", "overlap_mask_area_threshold")


@dataclass(frozen=True)
class SwinConfig:
    """Swin Transformer backbone hyper-parameters (names follow HF ``SwinConfig``)."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    in_channels: int = 3

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of the four stage outputs (1/4, 1/8, 1/16, 1/32)."""
        return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))


# Blocks per stage (res2..res5) of the ResNet depths the official Mask2Former configs use.
RESNET_DEPTHS: dict[int, tuple[int, int, int, int]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


@dataclass(frozen=True)
class ResNetConfig:
    """ResNet backbone hyper-parameters, detectron2 semantics (names follow HF ``ResNetConfig``).

    Bottleneck blocks with the stride in the 3x3 convolution and frozen batch norms; see
    :mod:`mask2former.resnet`. ``hidden_sizes`` are the output channels of res2..res5; each stage's
    bottleneck is a quarter of that (detectron2's 64 x 2^i for the standard widths). ``norm_eps`` is the
    epsilon of the checkpoint's batch norms, used when their statistics are folded at load time.
    """

    depths: tuple[int, ...] = RESNET_DEPTHS[50]
    hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    embedding_size: int = 64  # stem output channels
    in_channels: int = 3
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
        if len(self.depths) != 4 or len(self.hidden_sizes) != 4:
            raise ValueError(f"ResNet needs 4 stages, got depths {self.depths} and hidden_sizes {self.hidden_sizes}")
        if any(c % 4 for c in self.hidden_sizes):
            raise ValueError(f"ResNet hidden_sizes must be multiples of 4 (bottleneck = 1/4), got {self.hidden_sizes}")

    @classmethod
    def from_depth(cls, depth: int, **kwargs: Any) -> ResNetConfig:
        """ResNet-50 or ResNet-101 (``depth`` 50 or 101); ``kwargs`` set the other fields."""
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"unsupported ResNet depth {depth}: one of {sorted(RESNET_DEPTHS)}")
        return cls(depths=RESNET_DEPTHS[depth], **kwargs)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of the four stage outputs (1/4, 1/8, 1/16, 1/32)."""
        return tuple(self.hidden_sizes)

    @property
    def bottleneck_channels(self) -> tuple[int, ...]:
        """Width of each stage's 3x3 convolution."""
        return tuple(c // 4 for c in self.hidden_sizes)


BackboneConfig = SwinConfig | ResNetConfig


@dataclass(frozen=True)
class PreprocessConfig:
    """How images are turned into ``pixel_values`` (shortest-edge resize, normalize, pad)."""

    shortest_edge: int = 800
    longest_edge: int = 1333
    mean: tuple[float, float, float] = IMAGENET_MEAN  # 0..255 scale
    std: tuple[float, float, float] = IMAGENET_STD
    size_divisor: int = 32


@dataclass(frozen=True)
class Mask2FormerConfig:
    """Everything needed to build the model and interpret its outputs.

    ``decoder_layers`` counts masked-attention layers (9 in the paper). HF's ``config.json`` stores that
    number plus one (its ``decoder_layers`` also counts the prediction made from the learnable queries);
    :meth:`from_hf_dict` and :meth:`to_hf_dict` convert.
    """

    backbone: BackboneConfig = field(default_factory=SwinConfig)
    num_labels: int = 133
    num_queries: int = 100
    hidden_dim: int = 256
    feature_size: int = 256  # pixel decoder width
    mask_feature_size: int = 256
    encoder_layers: int = 6
    encoder_feedforward_dim: int = 1024
    decoder_layers: int = 9
    num_attention_heads: int = 8
    dim_feedforward: int = 2048
    pre_norm: bool = False
    enforce_input_projection: bool = False
    common_stride: int = 4
    feature_strides: tuple[int, ...] = (4, 8, 16, 32)
    id2label: dict[int, str] = field(default_factory=dict)
    thing_ids: frozenset[int] = frozenset()
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # Post-processing defaults (HF parameter names). ``threshold`` is panoptic's (the official
    # OBJECT_MASK_THRESHOLD); instances have their own, None: no score threshold, as the official code.
    threshold: float = 0.8
    mask_threshold: float = 0.5
    overlap_mask_area_threshold: float = 0.8
    instance_threshold: float | None = None
    name: str = "mask2former"
    # Where the labels, things and test-time resize came from when they were chosen for a checkpoint that
    # carries none (a detectron2 file): the label set and why, one line; None when given or carried.
    label_source: str | None = None

    def __post_init__(self) -> None:
        if not self.id2label:
            object.__setattr__(self, "id2label", {i: f"LABEL_{i}" for i in range(self.num_labels)})
        if len(self.id2label) != self.num_labels:
            raise ValueError(f"id2label has {len(self.id2label)} entries but num_labels is {self.num_labels}")
        if self.hidden_dim % self.num_attention_heads or self.feature_size % self.num_attention_heads:
            raise ValueError("hidden_dim and feature_size must be divisible by num_attention_heads")
        if tuple(self.feature_strides) != (4, 8, 16, 32) or self.common_stride != 4:
            raise ValueError("only feature strides (4, 8, 16, 32) with common_stride 4 are supported")

    @property
    def labels(self) -> list[str]:
        return [self.id2label[i] for i in range(self.num_labels)]

    # ------------------------------------------------------------------ task defaults
    @property
    def instance_thing_ids(self) -> frozenset[int] | None:
        """The classes instance results keep: the things for a model with thing and stuff classes, else None (all).

        The official code keeps only thing classes after its instance top-k when panoptic inference is on,
        which its configs turn on for the models that have both.
        """
        things = self.thing_ids & frozenset(range(self.num_labels))
        return things if things and len(things) < self.num_labels else None

    @property
    def semantic_at_input_size(self) -> bool:
        """Whether semantic class scores are combined at the input size, then resized (else from resized masks).

        The official semantic-only configs (no thing classes) do that (``SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE``
        false); panoptic and instance configs resize the mask logits first, as that flag is forced on for them.
        """
        return not (self.thing_ids & frozenset(range(self.num_labels)))

    def postprocess_kwargs(self, task: str) -> dict[str, Any]:
        """Keyword arguments of ``task``'s post-processing function with this checkpoint's defaults.

        For :func:`pipeline.postprocess.panoptic_segmentation` (``thing_ids``, ``threshold``,
        ``mask_threshold``, ``overlap_mask_area_threshold``), ``instance_rles`` / ``instance_segmentation``
        (``threshold``, ``thing_ids``) and ``semantic_segmentation`` (``at_input_size``). For a checkpoint with an
        official config they are the official ones.
        """
        if task == "panoptic":
            return {
                "thing_ids": self.thing_ids,
                "threshold": self.threshold,
                "mask_threshold": self.mask_threshold,
                "overlap_mask_area_threshold": self.overlap_mask_area_threshold,
            }
        if task == "instance":
            return {"threshold": self.instance_threshold, "thing_ids": self.instance_thing_ids}
        if task == "semantic":
            return {"at_input_size": self.semantic_at_input_size}
        raise ValueError(f"unknown task {task!r}: one of panoptic, instance, semantic")

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> Mask2FormerConfig:
        """Build from the dict of an HF ``Mask2FormerConfig`` (``config.json``).

        Thing/stuff flags come from a ``thing_ids`` entry when the checkpoint has one (ours write it),
        otherwise from the label names of the known datasets (COCO, Cityscapes); unknown labels are stuff.
        """
        if d.get("activation_function", "relu") != "relu":
            raise ValueError(f"unsupported decoder activation {d.get('activation_function')!r}")
        backbone = backbone_from_hf(d.get("backbone_config") or {})
        id2label = {int(k): v for k, v in (d.get("id2label") or {}).items()}
        num_labels = len(id2label) if id2label else int(d.get("num_labels", 133))
        if "thing_ids" in d:
            thing_ids = frozenset(int(i) for i in d["thing_ids"])
        else:
            thing_ids = known_thing_ids(id2label)
        return cls(
            backbone=backbone,
            num_labels=num_labels,
            num_queries=d.get("num_queries", 100),
            hidden_dim=d.get("hidden_dim", 256),
            feature_size=d.get("feature_size", 256),
            mask_feature_size=d.get("mask_feature_size", 256),
            encoder_layers=d.get("encoder_layers", 6),
            encoder_feedforward_dim=d.get("encoder_feedforward_dim", 1024),
            decoder_layers=d.get("decoder_layers", 10) - 1,
            num_attention_heads=d.get("num_attention_heads", 8),
            dim_feedforward=d.get("dim_feedforward", 2048),
            pre_norm=d.get("pre_norm", False),
            enforce_input_projection=d.get("enforce_input_projection", False),
            common_stride=d.get("common_stride", 4),
            feature_strides=tuple(d.get("feature_strides", (4, 8, 16, 32))),
            id2label=id2label,
            thing_ids=thing_ids,
            preprocess=preprocess_from_hf(preprocessor or {}),
            name=d.get("_name_or_path") or d.get("name") or "mask2former",
            **{k: float(d[k]) for k in POSTPROCESS_KEYS if k in d},
            instance_threshold=None if d.get("instance_threshold") is None else float(d["instance_threshold"]),
            label_source=d.get("label_source"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` dict for this config (plus our ``thing_ids``)."""
        return {
            "model_type": "mask2former",
            "architectures": ["Mask2FormerForUniversalSegmentation"],
            "backbone_config": backbone_to_hf(self.backbone),
            "num_queries": self.num_queries,
            "hidden_dim": self.hidden_dim,
            "feature_size": self.feature_size,
            "mask_feature_size": self.mask_feature_size,
            "encoder_layers": self.encoder_layers,
            "encoder_feedforward_dim": self.encoder_feedforward_dim,
            "decoder_layers": self.decoder_layers + 1,
            "num_attention_heads": self.num_attention_heads,
            "dim_feedforward": self.dim_feedforward,
            "pre_norm": self.pre_norm,
            "enforce_input_projection": self.enforce_input_projection,
            "common_stride": self.common_stride,
            "feature_strides": list(self.feature_strides),
            "id2label": {str(k): v for k, v in sorted(self.id2label.items())},
            "label2id": {v: k for k, v in sorted(self.id2label.items())},
            "thing_ids": sorted(self.thing_ids),
            **{k: getattr(self, k) for k in POSTPROCESS_KEYS},
            "instance_threshold": self.instance_threshold,
            **({} if self.label_source is None else {"label_source": self.label_source}),
            "dropout": 0.0,
            "activation_function": "relu",
        }

    def with_preprocess(self, **kw: Any) -> Mask2FormerConfig:
        return replace(self, preprocess=replace(self.preprocess, **kw))


STAGE_FEATURES = ["stage1", "stage2", "stage3", "stage4"]


def backbone_from_hf(bb: dict[str, Any]) -> BackboneConfig:
    """The backbone config from an HF ``backbone_config`` dict (Swin, the default, or ResNet).

    Raises:
        ValueError: for a backbone or a variant the model does not implement.
    """
    model_type = bb.get("model_type", "swin")
    if model_type not in ("swin", "resnet"):
        raise ValueError(f"unsupported backbone {model_type!r}: only Swin and ResNet are supported")
    out_features = bb.get("out_features", STAGE_FEATURES)
    if list(out_features) != STAGE_FEATURES:
        raise ValueError(f"backbone must output stage1..stage4, got {out_features}")
    if model_type == "resnet":
        return _resnet_from_hf(bb)
    if bb.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"unsupported Swin activation {bb.get('hidden_act')!r}")
    if bb.get("use_absolute_embeddings", False):
        raise ValueError("Swin absolute position embeddings are not supported")
    patch = bb.get("patch_size", 4)
    return SwinConfig(
        embed_dim=bb.get("embed_dim", 96),
        depths=tuple(bb.get("depths", (2, 2, 6, 2))),
        num_heads=tuple(bb.get("num_heads", (3, 6, 12, 24))),
        window_size=bb.get("window_size", 7),
        patch_size=patch if isinstance(patch, int) else int(patch[0]),
        mlp_ratio=float(bb.get("mlp_ratio", 4.0)),
        qkv_bias=bb.get("qkv_bias", True),
        layer_norm_eps=bb.get("layer_norm_eps", 1e-5),
        in_channels=bb.get("num_channels", 3),
    )


def _resnet_from_hf(bb: dict[str, Any]) -> ResNetConfig:
    """An HF ``ResNetConfig`` dict (defaults as in ``transformers``) with detectron2 semantics, else ValueError."""
    if bb.get("layer_type", "bottleneck") != "bottleneck":
        raise ValueError(f"unsupported ResNet layer_type {bb.get('layer_type')!r}: only 'bottleneck' (ResNet-50/101)")
    if bb.get("downsample_in_bottleneck", False):
        raise ValueError(
            "unsupported ResNet downsample_in_bottleneck=True (stride in the first 1x1 convolution, torchvision "
            "style): Mask2Former's detectron2 ResNets stride in the 3x3 convolution (STRIDE_IN_1X1 False), "
            "which is downsample_in_bottleneck=False"
        )
    if bb.get("downsample_in_first_stage", False):
        raise ValueError("unsupported ResNet downsample_in_first_stage=True: stage 1 must keep the stem's stride 4")
    if bb.get("hidden_act", "relu") != "relu":
        raise ValueError(f"unsupported ResNet activation {bb.get('hidden_act')!r}")
    return ResNetConfig(
        depths=tuple(bb.get("depths", RESNET_DEPTHS[50])),
        hidden_sizes=tuple(bb.get("hidden_sizes", (256, 512, 1024, 2048))),
        embedding_size=bb.get("embedding_size", 64),
        in_channels=bb.get("num_channels", 3),
        norm_eps=float(bb.get("norm_eps", 1e-5)),  # ours; HF's batch norms always use 1e-5
    )


def backbone_to_hf(b: BackboneConfig) -> dict[str, Any]:
    """The HF ``backbone_config`` dict of a backbone config (the inverse of :func:`backbone_from_hf`)."""
    if isinstance(b, ResNetConfig):
        return {
            "model_type": "resnet",
            "depths": list(b.depths),
            "hidden_sizes": list(b.hidden_sizes),
            "embedding_size": b.embedding_size,
            "num_channels": b.in_channels,
            "layer_type": "bottleneck",
            "hidden_act": "relu",
            "downsample_in_first_stage": False,
            "downsample_in_bottleneck": False,
            "norm_eps": b.norm_eps,
            "out_features": list(STAGE_FEATURES),
        }
    return {
        "model_type": "swin",
        "embed_dim": b.embed_dim,
        "depths": list(b.depths),
        "num_heads": list(b.num_heads),
        "window_size": b.window_size,
        "patch_size": b.patch_size,
        "mlp_ratio": b.mlp_ratio,
        "qkv_bias": b.qkv_bias,
        "layer_norm_eps": b.layer_norm_eps,
        "num_channels": b.in_channels,
        "hidden_act": "gelu",
        "drop_path_rate": 0.0,
        "out_features": list(STAGE_FEATURES),
    }


def preprocess_from_hf(p: dict[str, Any]) -> PreprocessConfig:
    """Read an HF ``preprocessor_config.json`` dict (missing keys take the COCO defaults)."""
    default = PreprocessConfig()
    size = p.get("size", {})
    if isinstance(size, int):
        shortest, longest = size, p.get("max_size", default.longest_edge)
    else:
        shortest = size.get("shortest_edge", default.shortest_edge)
        longest = size.get("longest_edge", p.get("max_size", default.longest_edge))
    mean = p.get("image_mean")
    std = p.get("image_std")
    # HF stores mean/std in the 0..1 scale (applied after rescaling by 1/255).
    scale = 255.0 if p.get("do_rescale", True) else 1.0
    return PreprocessConfig(
        shortest_edge=int(shortest),
        longest_edge=int(longest) if longest else 0,
        mean=tuple(float(m) * scale for m in mean) if mean else default.mean,
        std=tuple(float(s) * scale for s in std) if std else default.std,
        size_divisor=int(p.get("size_divisor", default.size_divisor) or default.size_divisor),
    )


def preprocess_to_hf(p: PreprocessConfig) -> dict[str, Any]:
    """The HF ``preprocessor_config.json`` dict of ``p`` (the inverse of :func:`preprocess_from_hf`)."""
    return {
        "image_processor_type": "Mask2FormerImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": p.shortest_edge, "longest_edge": p.longest_edge},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [m / 255 for m in p.mean],  # HF's 0..1 scale
        "image_std": [s / 255 for s in p.std],
        "size_divisor": p.size_divisor,
    }


def read_config(folder: str | Path) -> Mask2FormerConfig:
    """Read ``config.json`` (and ``preprocessor_config.json`` when present) from a checkpoint folder."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not an HF checkpoint folder")
    d = json.loads(cfg_path.read_text())
    pp_path = folder / "preprocessor_config.json"
    pp = json.loads(pp_path.read_text()) if pp_path.is_file() else None
    cfg = Mask2FormerConfig.from_hf_dict(d, pp)
    if cfg.name == "mask2former":
        cfg = replace(cfg, name=folder.name)
    return cfg
