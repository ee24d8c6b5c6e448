"""Service settings: command-line flags, else ``M2F_*`` environment variables, else these defaults."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Runtime = Literal["auto", "torch", "onnxruntime"]

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
    """Every knob of ``m2f serve``; ``M2F_MAX_BATCH_SIZE=8`` sets ``max_batch_size`` and so on."""

    model_config = SettingsConfigDict(env_prefix="M2F_", extra="ignore")

    model: Path | None = Field(
        None,
        description="HF checkpoint folder or .onnx file; default: the bundled demo model (PyTorch where torch is "
        "installed, else its ONNX export weights/demo/model.onnx)",
    )
    runtime: Runtime = Field("auto", description="auto: onnxruntime for a .onnx file, torch otherwise")
    device: str = Field("cpu", description="torch runtime: cpu, cuda, cuda:1, ...")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    max_batch_size: int = Field(4, ge=1, description="images per forward pass")
    max_batch_delay_ms: float = Field(5.0, ge=0, description="how long a request waits for others to batch with")
    batch_profile: bool = Field(
        True,
        description="at start-up, time the forward pass by batch size and batch (up to max_batch_size) only "
        "where it raises throughput; while serving, check that choice against batch 1 (service.batching.BatchCheck)",
    )
    bucket_px: int = Field(128, ge=32, description="padded sizes are grouped in steps of this many pixels")
    max_queue: int = Field(32, ge=1, description="requests admitted and not yet answered; more get 503")
    request_timeout_s: float = Field(30.0, gt=0, description="a request not answered by then gets 504")
    admit_share: float = Field(
        0.7,  # measured (BENCHMARKS.md): 0.5 refused 1-2 of 8 clients of a 14 s queue, with 504s nowhere
        gt=0,
        le=1,
        description="a request is admitted only while its answer is predicted within this share of the time it "
        "has left (the rest is margin for the prediction's error); else 503 with Retry-After",
    )
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1, description="larger bodies get 413")
    # Uploads are read under their own limits, before a request takes a compute slot (max_queue).
    max_uploads: int = Field(128, ge=1, description="request bodies being read at once; more get 503")
    upload_timeout_s: float = Field(20.0, gt=0, description="a body not read in full by then gets 408")
    upload_idle_timeout_s: float = Field(5.0, gt=0, description="a body that sends nothing for this long gets 408")
    max_pixels: int = Field(40_000_000, ge=1, description="width x height over this gets 413, read before decoding")
    max_instances: int = Field(100, ge=1, description="default and upper limit of the instance task's top-k")

    threads: int | None = Field(None, ge=1, description="intra-op threads; default: the cores this process may use")
    postprocess_workers: int = Field(2, ge=1, description="threads for decoding, post-processing and RLE encoding")
    cpu_work_between_passes: bool | None = Field(
        None,
        description="decode and post-process between forward passes rather than beside them (beside one, they "
        "take cores from it and it slows more than they gain); default: yes where inference runs on the CPU "
        "with all the cores this process may use, no on a GPU or with fewer threads",
    )
    cache_dir: Path | None = Field(None, description="ONNX Runtime optimized-graph cache folder")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long accepted requests may take")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="json: one JSON object per log line")

    @model_validator(mode="after")
    def _resolve_runtime(self) -> Settings:
        if self.model is None and (
            self.runtime == "onnxruntime" or (self.runtime == "auto" and not torch_demo_available())
        ):
            self.model = demo_onnx()  # the demo without torch
        if self.runtime == "auto":
            onnx = self.model is not None and self.model.suffix == ".onnx"
            self.runtime = "onnxruntime" if onnx else "torch"
        if self.runtime == "onnxruntime" and (self.model is None or self.model.suffix != ".onnx"):
            raise ValueError("the onnxruntime runtime needs an .onnx file (export one with `m2f export onnx`)")
        return self
