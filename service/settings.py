"""Service settings: command-line flags, else ``M2F_*`` environment variables, else these defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Runtime = Literal["auto", "torch", "onnxruntime"]


class Settings(BaseSettings):
    """Every knob of ``m2f serve``; ``M2F_MAX_BATCH_SIZE=8`` sets ``max_batch_size`` and so on."""

    model_config = SettingsConfigDict(env_prefix="M2F_", extra="ignore")

    model: Path | None = Field(None, description="HF checkpoint folder or .onnx file; default: the bundled demo model")
    runtime: Runtime = Field("auto", description="auto: onnxruntime for a .onnx file, torch otherwise")
    device: str = Field("cpu", description="torch runtime: cpu, cuda, cuda:1, ...")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    max_batch_size: int = Field(4, ge=1, description="images per forward pass")
    max_batch_delay_ms: float = Field(5.0, ge=0, description="how long a request waits for others to batch with")
    bucket_px: int = Field(128, ge=32, description="padded sizes are grouped in steps of this many pixels")
    max_queue: int = Field(32, ge=1, description="requests admitted and not yet answered; more get 503")
    request_timeout_s: float = Field(30.0, gt=0, description="a request not answered by then gets 504")
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1, description="larger bodies get 413")
    # Uploads are read under their own limits, before a request takes a compute slot (max_queue).
    max_uploads: int = Field(128, ge=1, description="request bodies being read at once; more get 503")
    upload_timeout_s: float = Field(20.0, gt=0, description="a body not read in full by then gets 408")
    upload_idle_timeout_s: float = Field(5.0, gt=0, description="a body that sends nothing for this long gets 408")
    max_pixels: int = Field(40_000_000, ge=1, description="width x height over this gets 413, read before decoding")
    max_instances: int = Field(100, ge=1, description="default and upper limit of the instance task's top-k")

    threads: int | None = Field(None, ge=1, description="intra-op threads; default: the cores this process may use")
    postprocess_workers: int = Field(2, ge=1, description="threads for decoding, post-processing and RLE encoding")
    cache_dir: Path | None = Field(None, description="ONNX Runtime optimized-graph cache folder")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long accepted requests may take")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @model_validator(mode="after")
    def _resolve_runtime(self) -> Settings:
        if self.runtime == "auto":
            onnx = self.model is not None and self.model.suffix == ".onnx"
            self.runtime = "onnxruntime" if onnx else "torch"
        if self.runtime == "onnxruntime" and (self.model is None or self.model.suffix != ".onnx"):
            raise ValueError("the onnxruntime runtime needs an .onnx file (export one with `m2f export onnx`)")
        return self
