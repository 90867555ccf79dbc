"""The `reference` backend: ``_reference`` behind the backend contract of ``backends.py``."""

from __future__ import annotations

import contextlib

import torch

from . import _reference


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half types are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def autocast_off(device_type: str):
    """torch.autocast disabled inside, where it is on. The op computes in ``compute_dtype`` by its
    own policy, but its body runs under the caller's autocast (a custom op without an autocast
    kernel falls through it, and so does an autograd.Function), which would cast every matmul
    inside to half precision."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def availability(device: torch.device) -> str | None:
    """The reference runs wherever PyTorch does."""
    return None


def unsupported(x, prototypes, solver, normalize, cost, precision) -> str | None:
    """Every option is supported (precision is ignored: the reference is always exact)."""
    return None


def forward(x, prototypes, mu, gamma, normalize, cost, solver, max_iter, tol, precision="auto"):
    """Reference forward in the compute dtype; outputs cast back to x's dtype (u stays)."""
    dtype = compute_dtype(x, prototypes)
    pooled, attr, weights, u = _reference.gsp_forward(
        x.to(dtype), prototypes.to(dtype), mu, gamma, normalize, cost, solver, max_iter, tol
    )
    return pooled.to(x.dtype), attr.to(x.dtype), weights.to(x.dtype), u


def backward(grad_pooled, grad_attr, grad_weights, x, prototypes, u, mu, gamma, normalize, cost, precision="auto"):
    """Reference backward; grad_x laid out like x, each gradient in its input's dtype."""
    dtype = u.dtype
    grad_x, grad_z = _reference.gsp_backward(
        grad_pooled.to(dtype),
        grad_attr.to(dtype),
        grad_weights.to(dtype),
        x.to(dtype),
        prototypes.to(dtype),
        u,
        mu,
        gamma,
        normalize,
        cost,
    )
    if grad_x.dtype == x.dtype and grad_x.stride() == x.stride():
        return grad_x, grad_z.to(prototypes.dtype)  # already x's layout: no copy
    grad_x_out = torch.empty_like(x)
    grad_x_out.copy_(grad_x)
    return grad_x_out, grad_z.to(prototypes.dtype)
