"""The PyTorch runtime: our model behind the runner interface (:mod:`runtimes.runner`).

Importing this module does not import torch; opening a :class:`TorchRunner` does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Mask2FormerConfig
from runtimes.runner import InputSpec


class TorchRunner:
    """Our PyTorch model behind the runner interface; float32 numpy in and out.

    Args:
        path: HF checkpoint folder (default: the bundled demo model).
        device: torch device string.
        threads: intra-op threads for CPU inference (default: torch's choice).
    """

    name = "torch"

    def __init__(self, path: str | Path | None = None, device: str = "cpu", threads: int | None = None):
        # OpenMP threads that wait passively: torch's default, spinning, starves (and is starved by) the
        # service's decode/post-processing threads on the same cores. Alone, passive is slower: a trade-off
        # for serving under load (bench/spin_wait.py, BENCHMARKS.md). Read when torch first loads OpenMP, so
        # it holds where this runner is the first to import torch.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch  # lazy: torch, optional (the ONNX Runtime path runs without it); after OMP_WAIT_POLICY is set

        from mask2former.weights import DEMO_WEIGHTS, load_model  # lazy: torch (mask2former.weights imports it)

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        self.path = Path(path) if path is not None else DEMO_WEIGHTS
        self.device = torch.device(device)
        self.model = load_model(self.path, device=self.device)
        self.config: Mask2FormerConfig = self.model.config
        self.input = InputSpec("pixel_values", ("batch", 3, "height", "width"), np.dtype(np.float32))

    def run(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) normalized, padded images -> class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4)."""
        torch = self._torch
        x = np.asarray(pixel_values)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {x.shape}")
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device))
            return out.class_logits.float().cpu().numpy(), out.mask_logits.float().cpu().numpy()

    def warmup(self, height: int | None = None, width: int | None = None) -> None:
        self.run(self.input.warmup_batch(self.config, height, width))

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "model": self.config.name,
            "device": str(self.device),
            "threads": self._torch.get_num_threads(),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }
