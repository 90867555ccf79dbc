"""gsp-kernels: Generalized Sum Pooling (ICCV 2023) with fused Triton and CUDA kernels.

Public names:
    gsp_pool: the op (SPEC.md), differentiable, dispatcher-registered.
    backend_status, available_backends: which backends run here, and why the others do not.
    build_info: how the native extension ``gsp_kernels._C`` was built (or why it is absent).
"""

from ._build import build_info
from .backends import BackendStatus, available_backends, backend_status
from .ops import gsp_pool

__all__ = ["gsp_pool", "backend_status", "available_backends", "BackendStatus", "build_info"]
__version__ = "0.1.0"
