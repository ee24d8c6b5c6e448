"""Mask2Former: an export-friendly PyTorch implementation that loads the public checkpoints."""

from pipeline.config import Mask2FormerConfig, PreprocessConfig, ResNetConfig, SwinConfig, read_config

__all__ = [
    "Mask2FormerConfig",
    "PreprocessConfig",
    "ResNetConfig",
    "SwinConfig",
    "read_config",
    "load_model",
    "Mask2Former",
]


def __getattr__(name: str):
    # torch-dependent names load lazily so that config and processing helpers import without torch.
    if name == "load_model":
        from mask2former.weights import load_model  # lazy: torch (config and processing work without it)

        return load_model
    if name == "Mask2Former":
        from mask2former.mask2former import Mask2Former  # lazy: torch

        return Mask2Former
    raise AttributeError(name)
