"""What an exported Mask2Former graph carries about itself, as ONNX ``metadata_props``.

A runtime serves from the ``.onnx`` file alone: label names, thing/stuff flags, preprocessing, default
post-processing thresholds, the input/output contract and where the weights came from all travel inside
it. The schema is one JSON document under the key ``mask2former`` (everything), plus a few flat keys
that generic tools (Netron, ``onnx`` scripts, model registries) show without parsing JSON.

No torch here (and ``onnx`` only where a proto is read or written): the ONNX Runtime serving path imports
this module and reads the metadata with :func:`read_metadata` before it opens a session (ONNX Runtime
hands the same key/value map over as ``session.get_modelmeta().custom_metadata_map``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import Mask2FormerConfig, PreprocessConfig


def file_sha256(path: str | Path) -> str:
    """A file's sha256 hex digest (what ``sha256sum`` prints), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The files that define an HF checkpoint: configs and weights (shards included); a detectron2
    checkpoint is its one file."""
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    names = ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names += ["model.safetensors.index.json", *json.loads(index.read_text())["weight_map"].values()]
    return sorted({folder / n for n in names if (folder / n).is_file()})


def checkpoint_sha256(folder: str | Path) -> tuple[str, dict[str, str]]:
    """(combined hash, {file name: sha256}) of a checkpoint folder.

    Each file's hash is what ``sha256sum`` prints; the combined one hashes the sorted ``name  hash`` lines.
    """
    files = {p.name: file_sha256(p) for p in checkpoint_files(folder)}
    lines = "".join(f"{name}  {digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest(), files


METADATA_KEY = "mask2former"
SCHEMA_VERSION = 1
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("class_logits", "mask_logits")
# Flat keys written next to the JSON document (all values are strings, as ONNX requires).
FLAT_KEYS = ("m2f.schema_version", "m2f.model", "m2f.num_labels", "m2f.source_sha256", "m2f.dtype")

Dim = int | str  # a fixed size, or the name of a dynamic axis


@dataclass(frozen=True)
class ExportMetadata:
    """Everything a runtime needs besides the graph.

    ``config`` is the HF ``config.json`` dict of the model (:meth:`Mask2FormerConfig.to_hf_dict`: label
    names, ``thing_ids``, default thresholds, architecture); ``preprocess`` the resize/normalize/pad
    settings; ``input_shape`` the (B, 3, H, W) contract, with axis names where dynamic.
    """

    name: str
    config: dict[str, Any]
    preprocess: dict[str, Any]
    input_shape: tuple[Dim, ...]
    dtype: str = "float32"  # of the input, the outputs and every float tensor in the graph
    source: str = ""  # the checkpoint folder (or "<module>") the graph was exported from
    source_sha256: str = ""  # of the checkpoint's files, see checkpoint_sha256
    source_files: dict[str, str] = field(default_factory=dict)  # file name -> sha256 (as sha256sum prints)
    opset: int = 0
    exporter: dict[str, str] = field(default_factory=dict)  # tool versions
    check: dict[str, Any] = field(default_factory=dict)  # the parity check's figures, if one ran
    quantization: str = ""  # "" (none) or "int8-dynamic": int8 weights, activations quantized at run time
    # How the int8 weights are stored and why (model_format.int8.INFO); {} in files written before it existed,
    # whose weights are int8 (exact only on CPUs with VNNI).
    quantization_info: dict[str, Any] = field(default_factory=dict)
    input_name: str = INPUT_NAME
    output_names: tuple[str, ...] = OUTPUT_NAMES
    schema_version: int = SCHEMA_VERSION

    # ------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, cfg: Mask2FormerConfig, **kw: Any) -> ExportMetadata:
        return cls(name=cfg.name, config=cfg.to_hf_dict(), preprocess=asdict(cfg.preprocess), **kw)

    @property
    def int8_weights(self) -> str:
        """The element type the int8 graph's MatMul weights are stored as ("uint8", "int8"); "" if not int8."""
        if not self.quantization:
            return ""
        return self.quantization_info.get("weights", "int8")

    def to_config(self) -> Mask2FormerConfig:
        """The model config (labels, ``thing_ids``, thresholds, preprocessing) for post-processing."""
        cfg = Mask2FormerConfig.from_hf_dict(self.config)
        pre = dict(self.preprocess)
        pre["mean"], pre["std"] = tuple(pre["mean"]), tuple(pre["std"])
        return replace(cfg, preprocess=PreprocessConfig(**pre), name=self.name)

    # ------------------------------------------------------------------ ONNX metadata_props
    def to_props(self) -> dict[str, str]:
        doc = asdict(self)
        doc["input_shape"] = list(self.input_shape)
        doc["output_names"] = list(self.output_names)
        return {
            METADATA_KEY: json.dumps(doc, sort_keys=True),
            "m2f.schema_version": str(self.schema_version),
            "m2f.model": self.name,
            "m2f.num_labels": str(len(self.config.get("id2label", {}))),
            "m2f.source_sha256": self.source_sha256,
            "m2f.dtype": self.dtype,
        }

    @classmethod
    def from_props(cls, props: dict[str, str]) -> ExportMetadata:
        """Parse the ``metadata_props`` map; raises ``ValueError`` when it was not written by this exporter."""
        if METADATA_KEY not in props:
            raise ValueError(f"no {METADATA_KEY!r} metadata: not a graph exported by `m2f export onnx`")
        doc = json.loads(props[METADATA_KEY])
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"metadata schema version {version} is not supported (expected {SCHEMA_VERSION})")
        doc["input_shape"] = tuple(doc["input_shape"])
        doc["output_names"] = tuple(doc["output_names"])
        doc.setdefault("quantization", "")  # written before the field existed
        doc.setdefault("quantization_info", {})
        return cls(**doc)


def write_metadata(model: Any, meta: ExportMetadata) -> None:
    """Set ``meta`` on an ``onnx.ModelProto`` (replacing earlier keys of ours; other keys are kept)."""
    props = meta.to_props()
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for key, value in [*keep, *props.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = f"Mask2Former {meta.name}: {meta.input_name} -> {', '.join(meta.output_names)}"


def read_metadata(path: str | Path) -> ExportMetadata:
    """Read the metadata of an ``.onnx`` file (weights are not loaded)."""
    import onnx  # lazy: onnx (only where a proto is read or written)

    model = onnx.load(str(path), load_external_data=False)
    return ExportMetadata.from_props({p.key: p.value for p in model.metadata_props})
