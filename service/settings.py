"""Service settings: command-line flags, else ``M2F_*`` environment variables, else these defaults."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Runtime = Literal["torch", "onnxruntime"]

DEMO_DIR = Path(__file__).resolve().parents[1] / "weights" / "demo"  # in a source checkout or editable install
DISTRIBUTION = "mask2former-serve"


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
    """Every setting of ``m2f serve`` (twelve): ``M2F_MAX_BATCH_SIZE=8`` sets ``max_batch_size`` and so on. Fixed
    bounds that are not settings are the module constants below and in :mod:`service.segment`."""

    model_config = SettingsConfigDict(env_prefix="M2F_", extra="ignore")

    model: Path | None = Field(
        None,
        description="HF checkpoint folder, detectron2 file or .onnx file (an .onnx runs in ONNX Runtime, the rest in "
        "PyTorch); default: the bundled demo model (PyTorch where torch is installed, else weights/demo/model.onnx)",
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
        description="memory the requests in progress may hold (estimated from their pixels; the model's own is "
        "apart): an image that needs more gets 413, one that does not fit beside the others 503 + Retry-After",
    )
    cache_dir: Path | None = Field(None, description="ONNX Runtime optimized-graph cache folder (default: none)")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line")

    @property
    def runtime(self) -> Runtime:
        """onnxruntime for an .onnx file, torch for the rest."""
        return "onnxruntime" if self.model is not None and self.model.suffix == ".onnx" else "torch"

    @property
    def drain_timeout_s(self) -> float:
        """On SIGTERM, how long accepted requests may take: their deadline."""
        return self.request_timeout_s

    @model_validator(mode="after")
    def _resolve_model(self) -> Settings:
        if self.model is None and not torch_demo_available():
            self.model = demo_onnx()  # the demo without torch
        return self
