"""Backend names and the backend specs of the check, the benchmarks and the CLI:
``backend[:strategy][@precision]``, e.g. "cuda", "cuda@tf32x3", "triton:gemm@ieee".

A strategy is one of the Triton backend's two designs (``TRITON_STRATEGIES``: "fused" computes
the cost products in its own kernels, "gemm" takes them from the vendor GEMM), forced for that
spec; without one the backend chooses per call. Nothing here imports a backend, so specs parse
where Triton is not installed.
"""

from __future__ import annotations

from ..contract import PRECISIONS

BACKENDS = ("reference", "triton", "cuda")
TRITON_STRATEGIES = ("fused", "gemm")


def check_backend_name(backend) -> None:
    """TypeError unless ``backend`` is a string, ValueError unless it is "auto" or a backend's name."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto', *BACKENDS)}, got {backend!r}")


def split_spec(spec: str) -> tuple[str, str | None]:
    """'triton:gemm' -> ('triton', 'gemm'); 'cuda' -> ('cuda', None). Only triton takes a strategy."""
    backend, _, strategy = spec.partition(":")
    if strategy and (backend != "triton" or strategy not in TRITON_STRATEGIES):
        raise ValueError(f"backend spec {spec!r}: only triton takes a strategy, one of {TRITON_STRATEGIES}")
    return backend, strategy or None


def parse_spec(spec: str) -> tuple[str, str | None, str]:
    """'backend[:strategy][@precision]' -> (backend, strategy or None, precision):
    'cuda' -> ('cuda', None, 'auto'); 'cuda@tf32x3' -> ('cuda', None, 'tf32x3');
    'triton:gemm@ieee' -> ('triton', 'gemm', 'ieee')."""
    name, _, precision = spec.partition("@")
    precision = precision or "auto"
    if precision not in PRECISIONS:
        raise ValueError(f"precision in backend spec {spec!r} must be one of {PRECISIONS}")
    return (*split_spec(name), precision)


def expand_specs(backends: list[str]) -> list[str]:
    """Backends as checked: plain 'triton' becomes one spec per strategy."""
    return [spec for name in backends
            for spec in ([f"triton:{s}" for s in TRITON_STRATEGIES] if name == "triton" else [name])]
