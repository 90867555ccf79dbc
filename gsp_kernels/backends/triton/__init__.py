"""The `triton` backend: the backend contract of ``gsp_kernels.backends``, and the choice between
its two strategies (``STRATEGIES``), made per call by ``strategy_for``:

- "fused" (``fused``): its kernels compute the cost products themselves; the forward is one
  launch, the backward two launches plus one GEMM. Its docstring holds the layout of the work and
  the precision rules of the products, which both strategies follow.
- "gemm" (``gemm``): the three big products on the vendor GEMM (cuBLAS), the same per-sample
  kernels on them (their ``PARTS`` argument).

The kernels are in ``kernels``, the @triton.jit math both strategies use in ``jit_math``, the
launches both make in ``launch``, the tuned configurations (strategy and tiles per GPU, dtype
and shape) in ``tuning``. A strategy can be forced: ``GSP_TRITON_STRATEGY=fused|gemm`` (read at
import) or ``use_strategy``. Math and symbols: docs/math.md.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ...contract import GSPOptions
from ..specs import TRITON_STRATEGIES
from . import fused, gemm, tuning
from .launch import INTERPRETED, on_device

# The solve holds ℓ of one sample in registers: N up to this.
MAX_N = 4096
STRATEGIES = TRITON_STRATEGIES


def _strategy_from_environment() -> str | None:
    """GSP_TRITON_STRATEGY: unset or empty (chosen per call), or one of STRATEGIES."""
    value = os.environ.get("GSP_TRITON_STRATEGY", "")
    if value and value not in STRATEGIES:
        raise ValueError(f"GSP_TRITON_STRATEGY must be one of {STRATEGIES} or unset, got {value!r}")
    return value or None


# Forced for every call by GSP_TRITON_STRATEGY (read at import, like GSP_TRITON_SPLIT); None:
# ``strategy_for`` chooses per call.
STRATEGY: str | None = _strategy_from_environment()
_forced_strategy: str | None = None  # use_strategy's override


@contextlib.contextmanager
def use_strategy(name: str):
    """Force the strategy of every call inside the block (forward and backward alike); the
    block gets the name."""
    global _forced_strategy
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    previous, _forced_strategy = _forced_strategy, name
    try:
        yield name
    finally:
        _forced_strategy = previous


def tuned_entry(x: torch.Tensor, prototypes: torch.Tensor, precision: str = "auto") -> dict | None:
    """The tuned configuration's entry for a call on these inputs (``tuning``: the file for this
    GPU and Triton version, by dtype, precision and shape bucket), or None."""
    batch, n, d = x.shape
    return tuning.lookup(x.device, x.dtype, prototypes.dtype, precision, batch, n, prototypes.shape[0], d)


def strategy_for(x: torch.Tensor, prototypes: torch.Tensor, precision: str = "auto") -> str:
    """The strategy of a call on these inputs: ``use_strategy``'s, else STRATEGY's, else the tuned
    entry's (``tuned_entry``) where torch lets cuBLAS run (``gemm.runs_on``: not under
    deterministic algorithms without CUBLAS_WORKSPACE_CONFIG), else "fused" (a function of the
    inputs and torch's settings, so that the backward takes the forward's)."""
    if _forced_strategy or STRATEGY:
        return _forced_strategy or STRATEGY
    entry = tuned_entry(x, prototypes, precision)
    if entry is None or (entry["strategy"] == "gemm" and not gemm.runs_on(x.device)):
        return "fused"
    return entry["strategy"]


def availability(device: torch.device) -> str | None:
    """cuda: triton imported; cpu: only through the interpreter (TRITON_INTERPRET=1 at import)."""
    if device.type == "cuda":
        if INTERPRETED:
            return "TRITON_INTERPRET=1 was set when gsp_kernels' Triton kernels were imported: they run on the CPU only"
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if INTERPRETED:
            return None
        return "triton on CPU needs TRITON_INTERPRET=1 set before gsp_kernels is imported"
    return f"triton does not run on {device.type}"


def unsupported(x: torch.Tensor, prototypes: torch.Tensor, options: GSPOptions) -> str | None:
    """float64 and N > MAX_N are not computed here (auto then uses the reference)."""
    if x.dtype == torch.float64 or prototypes.dtype == torch.float64:
        return "float64 inputs are computed by the reference backend"
    if x.shape[1] > MAX_N:
        return f"N={x.shape[1]} > {MAX_N} (the solve holds one sample's features in registers)"
    return None


def forward(x: torch.Tensor, prototypes: torch.Tensor, options: GSPOptions):
    """pooled [B, D], attr [B, M], weights [B, N] in x's dtype, u [B] float32, by the strategy
    ``strategy_for`` picks."""
    with on_device(x.device):
        if strategy_for(x, prototypes, options.precision) == "gemm":
            return gemm.forward(x, prototypes, options)
        return fused.forward(x, prototypes, options, tuned=tuned_entry(x, prototypes, options.precision))


def backward(grad_pooled, grad_attr, grad_weights, x: torch.Tensor, prototypes: torch.Tensor, u: torch.Tensor,
             options: GSPOptions):
    """grad_x (x's strides and dtype) and grad_prototypes, by the strategy ``strategy_for`` picks
    (the same as the forward's for the same inputs)."""
    with on_device(x.device):
        args = (grad_pooled.contiguous(), grad_attr.contiguous(), grad_weights.contiguous(), x, prototypes, u, options)
        if strategy_for(x, prototypes, options.precision) == "gemm":
            return gemm.backward(*args)
        return fused.backward(*args, tuned=tuned_entry(x, prototypes, options.precision))
