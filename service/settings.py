"""Service settings: command-line flags, else ``M2F_*`` environment variables, else these defaults."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Runtime = Literal["torch", "onnxruntime", "openvino", "openvino-bf16"]
# What an .onnx model may name after its path (PATH@RUNTIME) instead of the runner its CPU class gets.
ONNX_RUNTIMES = ("onnxruntime", "openvino", "openvino-bf16")

DEMO_DIR = Path(__file__).resolve().parents[1] / "weights" / "demo"  # in a source checkout or editable install
DISTRIBUTION = "mask2former-serve"
DEFAULT_NAME = "default"  # the name of a model given without one
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # model names: safe in a URL path and a metric label
MODEL_FILES = ("*.onnx", "*.pkl", "*.pth")  # what a model repository's sub-folder may hold (or an HF checkpoint)


class ModelSource(NamedTuple):
    name: str
    path: Path | None  # None: the bundled demo checkpoint (PyTorch)
    runtime: Runtime | None = None  # named with PATH@RUNTIME; None: by the file (and the CPU class's table)


def split_runtime(text: str) -> tuple[Path, Runtime | None]:
    """``PATH[@RUNTIME]`` -> (path, runtime or None); a path that exists as written is taken whole."""
    m = re.fullmatch(r"(.+)@(" + "|".join(ONNX_RUNTIMES) + ")", text)
    if m is None or Path(text).exists():
        return Path(text), None
    path = Path(m.group(1))
    if path.suffix != ".onnx":
        raise ValueError(f"{text}: only an .onnx file can name its runtime ({', '.join(ONNX_RUNTIMES)})")
    return path, m.group(2)  # type: ignore[return-value]


def runtime_for(path: Path | None) -> Runtime:
    """onnxruntime for an .onnx file, torch for the rest."""
    return "onnxruntime" if path is not None and path.suffix == ".onnx" else "torch"


def repository_models(folder: Path) -> list[ModelSource]:
    """The models of a model repository: one per sub-folder (its name), holding an HF checkpoint (config.json) or
    one .onnx, .pkl or .pth file; the sub-folder ``default``, if any, first, the others by name."""
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not NAME.fullmatch(sub.name):
            raise ValueError(f"model repository {folder}: {sub.name!r} is not a model name ({NAME.pattern})")
        files = sorted(f for pattern in MODEL_FILES for f in sub.glob(pattern))
        if (sub / "config.json").is_file():
            found.append(ModelSource(sub.name, sub))
        elif len(files) == 1:
            found.append(ModelSource(sub.name, files[0]))
        else:
            what = "no model file" if not files else f"{len(files)} model files"
            raise ValueError(
                f"model repository {folder}: {sub.name}/ holds {what} (one .onnx/.pkl/.pth, or config.json)"
            )
    if not found:
        raise ValueError(f"model repository {folder} has no model folders")
    return sorted(found, key=lambda m: m.name != DEFAULT_NAME)


def parse_models(text: str | None) -> list[ModelSource]:
    """``--model`` / ``M2F_MODEL``: a path, ``NAME=PATH``, several of them comma-separated, or a model repository
    folder (a folder that is not itself a checkpoint). The first is the default model (``/v1/segment``). An .onnx
    path may end in ``@RUNTIME`` (:data:`ONNX_RUNTIMES`) to choose its runner."""
    if text is None:
        return [ModelSource(DEFAULT_NAME, None)]
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if len(entries) == 1 and "=" not in entries[0] and "@" not in entries[0]:
        path = Path(entries[0])
        if path.is_dir() and not (path / "config.json").is_file():
            return repository_models(path)
    sources = []
    for entry in entries:
        name, sep, path = entry.rpartition("=")
        name = name.strip() if sep else DEFAULT_NAME
        if not NAME.fullmatch(name):
            raise ValueError(f"model name {name!r}: use lowercase letters, digits, '.', '_', '-' ({NAME.pattern})")
        sources.append(ModelSource(name, *split_runtime(path.strip())))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must differ (give several as NAME=PATH): {', '.join(names)}")
    return sources


def demo_onnx() -> Path:
    """The demo model as ONNX (``weights/demo/model.onnx``): the source checkout's copy, else the copy a wheel
    install put under ``share/mask2former-serve/demo`` (pyproject's data-files), found through its RECORD."""
    local = DEMO_DIR / "model.onnx"
    if local.is_file():
        return local
    try:
        files = importlib.metadata.files(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "model.onnx" and DISTRIBUTION in f.parts:
            return Path(str(f.locate())).resolve()
    return local  # missing: the runner's error names this path


def torch_demo_available() -> bool:
    """Whether the demo can run in PyTorch here: torch is installed and the safetensors checkpoint is present.

    Finds torch without importing it: the runner sets OpenMP's wait policy before torch's first import
    (``runtimes.TorchRunner``), and a settings object should not cost a second of start-up."""
    if not (DEMO_DIR / "model.safetensors").is_file():
        return False
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a broken or stubbed install (sys.modules["torch"] = None)
        return False


class Settings(BaseSettings):
    """Every setting of ``m2f serve`` (thirteen): ``M2F_MAX_BATCH_SIZE=8`` sets ``max_batch_size`` and so on. Fixed
    bounds that are not settings are the module constants below and in :mod:`service.segment`."""

    model_config = SettingsConfigDict(env_prefix="M2F_", extra="ignore")

    model: str | None = Field(
        None,
        description="what to serve: an HF checkpoint folder, detectron2 file or .onnx file (an .onnx runs with the "
        "runner its CPU class gets, ONNX Runtime so far, or the one named as PATH@openvino, @openvino-bf16, "
        "@onnxruntime; the rest in PyTorch); NAME=PATH, several comma-separated (the first is the default); or a model "
        "repository folder (one sub-folder per model); default: the bundled demo model (PyTorch where torch is "
        "installed, else weights/demo/model.onnx)",
    )
    device: str = Field("cpu", description="PyTorch device: cpu, cuda, cuda:1, ... (ONNX Runtime: cpu)")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    threads: int | None = Field(
        None, ge=1, description="intra-op threads of the forward pass; default: the cores this process may use"
    )
    max_batch_size: int | None = Field(
        None,
        ge=1,
        description="images per forward pass at most; default: up to 4, the largest that raised throughput by a "
        "tenth in a profile at start-up (1 where it does not pay); a number given is used as it is, without a profile",
    )
    max_batch_delay_ms: float = Field(
        5.0, ge=0, description="how long an image may wait for others to fill its batch while the model is idle"
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="one deadline for the whole request (upload to answer): 504 when it passes; requests predicted "
        "to miss it are refused at once (503 + Retry-After); also how long a drain waits on SIGTERM",
    )
    memory_mb: int = Field(
        2048,
        ge=16,
        description="memory the models and the requests in progress may hold together (estimated: a model's from "
        "its load, a request's from its pixels): a model that does not fit is not loaded; an image that needs more "
        "than the models leave gets 413, one that does not fit beside the others 503 + Retry-After",
    )
    cache_dir: Path | None = Field(None, description="ONNX Runtime optimized-graph cache folder (default: none)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line")
    keys_file: Path | None = Field(
        None,
        description='API keys, a JSON file {"segment": [...], "admin": [...]}: with segment keys the segment routes '
        "need one (Authorization: Bearer KEY); the admin routes (load, reload, unload models) are on only with "
        "admin keys, and need one",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _path_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    def model_sources(self) -> list[ModelSource]:
        """The models to serve, by name; the first is the default."""
        return parse_models(self.model)

    @property
    def runtime(self) -> Runtime:
        """The default model's runtime: the one named (PATH@RUNTIME), else onnxruntime for an .onnx file (the
        runner its CPU class gets is chosen at load), torch for the rest."""
        source = self.model_sources()[0]
        return source.runtime or runtime_for(source.path)

    @property
    def drain_timeout_s(self) -> float:
        """On SIGTERM, how long accepted requests may take: their deadline."""
        return self.request_timeout_s

    @model_validator(mode="after")
    def _resolve_model(self) -> Settings:
        if self.model is None and not torch_demo_available():
            self.model = str(demo_onnx())  # the demo without torch
        self.model_sources()  # a malformed list or repository fails here, with what is wrong
        return self
