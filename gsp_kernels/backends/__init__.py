"""The backends of ``gsp_pool``: which implementations exist, which run here, and why the others do
not; and the backend specs of the check and the benchmarks ("triton:fused").

A backend is a module of this package with four functions (the contract every backend
implements; ``options`` is a ``contract.GSPOptions`` as ``check_options`` gives it for the call:
checked, with ``max_iter`` and ``tol`` set):

- ``availability(device: torch.device) -> str | None``: None if it can run on that device,
  else the reason it cannot (missing package, not built with CUDA, no GPU...).
- ``unsupported(x, prototypes, options) -> str | None``: None if it computes this case, else why
  not (``auto`` then falls back to the reference).
- ``forward(x, prototypes, options) -> (pooled [B, D], attr [B, M], weights [B, N], u [B])``:
  pooled, attr and weights in x's dtype; u in the compute dtype (float32, or float64 when an
  input is float64).
- ``backward(grad_pooled, grad_attr, grad_weights, x, prototypes, u, options)
  -> (grad_x, grad_prototypes)``: each gradient in its own input's dtype; grad_x with x's
  strides (``torch.empty_like(x)``). It reads the options that define the function
  (``contract.backward_options``: transport_ratio, gamma, normalize, cost, precision).

Two inputs are taken only by a backend that says so (both absent means False; ``resolve_backend``
refuses the others, so that ``auto`` takes the reference and a backend named explicitly is a
ValueError saying why):

- ``TAKES_MASK = True``: ``forward(x, prototypes, options, mask)`` and
  ``backward(..., options, mask, parameter_grads)`` take the ``[B, N]`` bool mask (or None), True at
  valid positions (docs/math.md, Masks).
- ``TAKES_TENSOR_PARAMETERS = True``: ``options.transport_ratio`` and ``options.gamma`` may be 0-d
  or ``[B]`` tensors; with ``parameter_grads`` the backward returns their per-sample gradients
  ``[B]`` (in u's dtype) after the other two (docs/math.md, Learned μ and γ).

Backends: ``reference`` (pure PyTorch, the oracle), ``triton`` (two strategies, ``triton/``) and
``cuda`` (the native module of csrc/, ``native``).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from types import ModuleType

import torch

from ..contract import GSPOptions
from .specs import (
    BACKENDS,
    TRITON_STRATEGIES,
    check_backend_name,
    expand_specs,
    parse_spec,
    split_spec,
)

__all__ = [
    "BACKENDS", "TRITON_STRATEGIES", "BackendStatus", "available_backends", "backend_status", "check_backend_name",
    "expand_specs",
    "forcing_strategy", "get_backend", "parse_spec", "resolve_backend", "split_spec", "triton_tuned_config",
]
# `auto` tries these in order on a GPU (on the CPU it takes the reference), by the H200
# measurements in bench/NOTES.md: float32 features go to cuda first (fwd+bwd 1.65 ms vs
# triton 1.93 ms at B=256, N=196, D=512, M=128); half features, as under autocast, to triton
# first (1.42-1.53 ms vs 1.81 ms; +0% vs +4.7% on a ResNet-50 training step).
_GPU_PREFERENCE = ("cuda", "triton")
_GPU_PREFERENCE_HALF = ("triton", "cuda")

_MODULES = {
    "reference": "gsp_kernels.backends.reference",
    "triton": "gsp_kernels.backends.triton",
    "cuda": "gsp_kernels.backends.cuda",
}
_loaded: dict[str, ModuleType | str] = {}


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend runs on a device, and if not, why."""

    name: str
    available: bool
    reason: str


def _module(name: str) -> ModuleType | str:
    """The backend's module, or the import error's text (cached either way)."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except ImportError as exc:  # e.g. triton not installed
            _loaded[name] = f"import failed: {exc}"
    return _loaded[name]


def backend_status(device: torch.device | str | None = None) -> dict[str, BackendStatus]:
    """Status of every backend on `device` (default: the current CUDA device if any, else CPU)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    statuses = {}
    for name in BACKENDS:
        module = _module(name)
        reason = module if isinstance(module, str) else module.availability(device)
        statuses[name] = BackendStatus(name, reason is None, reason or "available")
    return statuses


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that run on `device`, fastest last-resort last (reference)."""
    status = backend_status(device)
    order = [*_GPU_PREFERENCE, "reference"]
    return [name for name in order if status[name].available]


def get_backend(name: str) -> ModuleType:
    """The module implementing backend `name` (must be importable)."""
    module = _module(name)
    if isinstance(module, str):
        raise ValueError(f"backend={name!r} is not available: {module}")
    return module


def _extension_reason(module: ModuleType, options: GSPOptions, mask: torch.Tensor | None) -> str | None:
    """Why a backend cannot take this call's mask or tensor μ, γ (see the module docstring), or None."""
    if mask is not None and not getattr(module, "TAKES_MASK", False):
        return "it does not take a mask yet (the reference backend does; backend='auto' takes it for masked calls)"
    if (isinstance(options.transport_ratio, torch.Tensor) or isinstance(options.gamma, torch.Tensor)) and not getattr(
        module, "TAKES_TENSOR_PARAMETERS", False
    ):
        return ("it does not take transport_ratio or gamma as tensors yet (the reference backend does; "
                "backend='auto' takes it for such calls)")
    return None


def resolve_backend(name: str, x: torch.Tensor, prototypes: torch.Tensor, options: GSPOptions,
                    mask: torch.Tensor | None = None) -> str:
    """Concrete backend for this call. `auto` picks the fastest that applies, else the reference.

    A backend named explicitly must apply, or a ValueError says why it does not. ``mask`` is the
    call's ``[B, N]`` mask or None.
    """
    check_backend_name(name)
    if name == "auto":
        if x.device.type != "cuda":
            candidates = ()
        elif x.dtype in (torch.bfloat16, torch.float16):
            candidates = _GPU_PREFERENCE_HALF
        else:
            candidates = _GPU_PREFERENCE
        for candidate in candidates:
            module = _module(candidate)
            if isinstance(module, str) or module.availability(x.device) is not None:
                continue
            if _extension_reason(module, options, mask) is None and module.unsupported(x, prototypes, options) is None:
                return candidate
        return "reference"
    module = get_backend(name)
    reason = module.availability(x.device) or _extension_reason(module, options, mask)
    if reason is None:
        reason = module.unsupported(x, prototypes, options)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run this call: {reason}")
    return name


def forcing_strategy(strategy: str | None):
    """A context forcing the Triton backend's strategy (its ``use_strategy``); nothing for None."""
    if strategy is None:
        return contextlib.nullcontext()
    return get_backend("triton").use_strategy(strategy)


def triton_tuned_config(device: torch.device | str) -> str:
    """Which tuned Triton configuration is in force on ``device`` (the Triton backend's
    ``tuning.describe``), or why there is none to speak of (Triton not importable)."""
    module = _module("triton")
    if isinstance(module, str):
        return f"none: the triton backend is not available ({module})"
    return module.tuning.describe(device)


# Import every backend now, not on first use: an import while torch.compile traces a call
# would break the graph.
for _name in BACKENDS:
    _module(_name)
