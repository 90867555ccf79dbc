"""gsp-kernels: Generalized Sum Pooling (ICCV 2023) with fused Triton and CUDA kernels.

Public names:
    gsp_pool: the op (docs/math.md), differentiable, dispatcher-registered.
    GSP, GSPOutput, GSPNet, replace_global_pool: the pooling layer for metric learning.
    PatchTokens: a vision transformer's patch tokens with their grid (GSP input).
    load_backbone_weights: a local timm/torchvision checkpoint into a backbone (no downloads).
    ZeroShotPredictionLoss (alias ZeroShotLoss): the paper's zero-shot prediction regularizer.
    backend_status, available_backends, BackendStatus: which backends run here, and why not.
    build_info: how the native extension ``gsp_kernels._C`` was built (or why it is absent).
    load_model: a trained run's embedding model from its checkpoint or folder
        (``gsp_kernels.training.loading``; imported on first use, it needs the train extra).
"""

from .backends import BackendStatus, available_backends, backend_status
from .backends.native import build_info
from .losses import ZeroShotLoss, ZeroShotPredictionLoss
from .nn import (
    GSP,
    GSPNet,
    GSPOutput,
    PatchTokens,
    load_backbone_weights,
    replace_global_pool,
)
from .ops import gsp_pool
from .version import __version__  # noqa: F401  (the package version, gsp_kernels.__version__)

__all__ = [
    "gsp_pool",
    "GSP",
    "GSPOutput",
    "GSPNet",
    "replace_global_pool",
    "PatchTokens",
    "load_backbone_weights",
    "ZeroShotPredictionLoss",
    "ZeroShotLoss",
    "backend_status",
    "available_backends",
    "BackendStatus",
    "build_info",
    "load_model",
]


def __getattr__(name: str):
    """``load_model`` from the training package, imported when first asked for."""
    if name == "load_model":
        from .training.loading import load_model

        return load_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
