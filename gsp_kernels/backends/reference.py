"""The `reference` backend: pure-PyTorch GSP, the oracle every kernel backend is tested against
(docs/math.md), behind the backend contract of ``gsp_kernels.backends``.

Any device, float32 or float64. Batched over samples; the scalar solve is a bracketed Newton
iteration vectorized over the batch. The math functions (``gsp_forward``, ``gsp_backward`` and
their parts) take and return tensors in the compute dtype (float32 or float64); the backend
functions (``forward``, ``backward``) apply the op's dtype policy (``contract.compute_dtype``)
around them.

Shapes: x ``[B, N, D]`` (any strides), prototypes ``[M, D]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..contract import (
    L2_EPS,
    GSPOptions,
    compute_dtype,
    cost_snap,
    default_max_iter,
    default_tol,
)
from .solve import solve_fixed_point, solve_newton, solve_unrolled

__all__ = [
    "availability", "backward", "costs_from_squared", "forward", "gsp_backward", "gsp_forward", "normalize_rows",
    "normalize_rows_backward", "row_norms", "solve_fixed_point", "solve_newton", "solve_unrolled", "squared_costs",
    "unsupported",
]


def row_norms(v: Tensor) -> Tensor:
    """‖v‖ over the last dim, ``[..., 1]``, for any finite v whose norm the dtype holds: each row is
    divided by its largest magnitude before the squares are summed (their sum would overflow for
    rows longer than √max, 1.8e19 in float32, and underflow below √tiny), and the norm scaled back."""
    largest = v.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)  # [..., 1]
    return torch.linalg.vector_norm(v / largest, dim=-1, keepdim=True) * largest


def normalize_rows(v: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Normalize the last dim for the cost. Returns (v̂, divisor) with v̂ = v / divisor."""
    norm = row_norms(v)  # [..., 1]
    if mode == "lipschitz":
        divisor = norm.clamp_min(1.0)
    elif mode == "l2":
        divisor = norm.clamp_min(L2_EPS)
    else:
        divisor = torch.ones_like(norm)
    return v / divisor, divisor


def normalize_rows_backward(grad_vh: Tensor, vh: Tensor, divisor: Tensor, mode: str) -> Tensor:
    """Gradient through normalize_rows: (g − (v̂·g) v̂) / |v| where the divisor is the norm.

    One pass over the rows: the radial coefficient is per row, zero where v passes through.
    """
    if mode == "none":
        return grad_vh
    if mode == "lipschitz":
        projects = divisor > 1.0  # [..., 1]: normalized rows; the others pass through
    else:
        projects = divisor > L2_EPS
    radial = (vh * grad_vh).sum(-1, keepdim=True)  # [..., 1]: v̂·g
    radial = torch.where(projects, radial, torch.zeros_like(radial))
    return torch.addcmul(grad_vh, vh, radial, value=-1.0).div_(divisor)


def squared_costs(xh: Tensor, zh: Tensor) -> Tensor:
    """Snapped squared distances ‖x̂_i − ẑ_k‖² via one GEMM: [B, N, D], [M, D] -> [B, N, M]."""
    xx = (xh * xh).sum(-1, keepdim=True)  # [B, N, 1]
    zz = (zh * zh).sum(-1)  # [M]
    sq = xx + zz - 2.0 * torch.matmul(xh, zh.t())  # [B, N, M]
    snapped = sq <= cost_snap(sq.dtype) * (xx + zz)
    return torch.where(snapped, torch.zeros_like(sq), sq)  # NaN stays NaN


def costs_from_squared(sq: Tensor, cost: str) -> Tensor:
    """Cost c_ki from the snapped squared distance."""
    return sq.sqrt() if cost == "euclidean" else sq


def _plan_terms(x: Tensor, prototypes: Tensor, gamma, normalize: str, cost: str, mask: Tensor | None = None):
    """Normalized inputs, costs and per-feature log-partition / softmax over prototypes. With a mask
    ``[B, N]`` the padded positions get c = 0, ℓ = −inf (σ = 0) and A = 0, whatever their
    (finite) features (docs/math.md, Masks). gamma: a float or ``[B]``."""
    xh, x_div = normalize_rows(x, normalize)  # [B, N, D], [B, N, 1]
    zh, z_div = normalize_rows(prototypes, normalize)  # [M, D], [M, 1]
    c = costs_from_squared(squared_costs(xh, zh), cost)  # [B, N, M]
    if mask is not None:
        c = torch.where(mask.unsqueeze(-1), c, 0.0)
    logits = -_per_sample_column(gamma, 2) * c
    ell = torch.logsumexp(logits, -1)  # [B, N]
    assign = torch.softmax(logits, -1)  # [B, N, M]: A_ki laid out as [b, i, k]
    if mask is not None:
        ell = torch.where(mask, ell, -math.inf)
        assign = torch.where(mask.unsqueeze(-1), assign, 0.0)
    return xh, x_div, zh, z_div, c, ell, assign


def _per_sample_column(value, dims: int):
    """A float as is; a per-sample ``[B]`` tensor with ``dims`` trailing axes, to broadcast."""
    return value[(...,) + (None,) * dims] if isinstance(value, Tensor) else value


def _feature_counts(x: Tensor, mask: Tensor | None):
    """N (an int) without a mask, else the valid positions per sample ``[B]`` in x's dtype."""
    return x.shape[1] if mask is None else mask.sum(-1).to(x.dtype)


def _mass(counts, mu):
    """n μ, the divisor of the weights: a float, or ``[B, 1]`` (n at least 1: a sample with no valid
    position has weights 0)."""
    if isinstance(counts, Tensor):
        counts = counts.clamp_min(1.0)
    mass = counts * mu
    return mass.unsqueeze(-1) if isinstance(mass, Tensor) else mass


def _sigma(u: Tensor, ell: Tensor, mask: Tensor | None) -> Tensor:
    """σ(u + ℓ_i) ``[B, N]``, exactly 0 at padding (also where u = +∞, μ = 1)."""
    sigma = torch.sigmoid(u.unsqueeze(-1) + ell)
    return sigma if mask is None else torch.where(mask, sigma, 0.0)


def gsp_forward(
    x: Tensor,
    prototypes: Tensor,
    transport_ratio,
    gamma,
    normalize: str = "lipschitz",
    cost: str = "euclidean",
    solver: str = "newton",
    max_iter: int | None = None,
    tol: float | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GSP forward in x's dtype. Returns pooled [B, D], attr [B, M], weights [B, N], u [B].

    transport_ratio and gamma: floats, or per-sample ``[B]`` tensors in x's dtype. mask ``[B, N]``
    bool, True at valid positions: the padding's features must be finite and take no part; a sample
    with no valid position gets pooled, attr and weights 0 and u = 0 (docs/math.md, Masks).
    """
    mu = transport_ratio if isinstance(transport_ratio, Tensor) else float(transport_ratio)
    counts = _feature_counts(x, mask)
    max_iter = default_max_iter(solver) if max_iter is None else max_iter
    tol = default_tol(x.dtype) if tol is None else tol
    _, _, _, _, _, ell, assign = _plan_terms(x, prototypes, gamma, normalize, cost, mask)
    solve_counts = None if mask is None else counts.clamp_min(1.0)
    if solver == "newton":
        u = solve_newton(ell, mu, tol, max_iter, solve_counts)
    elif solver == "unrolled":
        u = solve_unrolled(ell, mu, tol, max_iter, solve_counts)
    else:
        u = solve_fixed_point(ell, mu, max_iter, solve_counts)
    if mask is not None:
        u = torch.where(counts > 0, u, 0.0)  # no valid position: a finite u, all σ = 0
    sigma = _sigma(u, ell, mask)  # [B, N]
    weights = sigma / _mass(counts, mu)  # [B, N]
    pooled = torch.bmm(weights.unsqueeze(1), x).squeeze(1)  # [B, D]
    attr = torch.bmm(weights.unsqueeze(1), assign).squeeze(1)  # [B, M]
    if solver == "fixed_point" and (isinstance(mu, Tensor) or mu < 1.0):
        # The paper forms its plan with one more update of t, which rescales the
        # transported mass to exactly μ: the attribute then sums to 1 (weights need not).
        total = weights.sum(-1, keepdim=True)  # [B, 1]
        if mask is not None:
            total = torch.where(total > 0, total, 1.0)  # no valid position: attr stays 0
        rescaled = attr / total
        attr = torch.where(_per_sample_column(mu, 1) < 1.0, rescaled, attr) if isinstance(mu, Tensor) else rescaled
    return pooled, attr, weights, u


def gsp_backward(
    grad_pooled: Tensor,
    grad_attr: Tensor,
    grad_weights: Tensor,
    x: Tensor,
    prototypes: Tensor,
    u: Tensor,
    transport_ratio,
    gamma,
    normalize: str = "lipschitz",
    cost: str = "euclidean",
    mask: Tensor | None = None,
    parameter_grads: bool = False,
) -> tuple[Tensor, ...]:
    """Analytic backward (docs/math.md, Backward: implicit in u). Returns grad_x [B, N, D],
    grad_prototypes [M, D], and with ``parameter_grads`` the per-sample gradients of μ and γ
    ``[B]`` (docs/math.md, Learned μ and γ).

    grad_pooled [B, D], grad_attr [B, M] and grad_weights [B, N] are tensors (zeros where
    absent). A weights gradient enters like the pooled one: both act on L through w_i, so
    e_i = (x_i·gy + ā_i + gw_i) / (Nμ). transport_ratio, gamma and mask as in ``gsp_forward``;
    padded positions get gradient 0 exactly.
    """
    mu = transport_ratio if isinstance(transport_ratio, Tensor) else float(transport_ratio)
    counts = _feature_counts(x, mask)
    xh, x_div, zh, z_div, c, ell, assign = _plan_terms(x, prototypes, gamma, normalize, cost, mask)
    sigma = _sigma(u, ell, mask)  # [B, N]
    weights = sigma / _mass(counts, mu)
    assign_ga = torch.bmm(assign, grad_attr.unsqueeze(-1)).squeeze(-1)  # ā_i: [B, N]
    x_gy = torch.bmm(x, grad_pooled.unsqueeze(-1)).squeeze(-1)  # [B, N]
    # Nμ e_i: the 1/(Nμ) goes with σ into w below (e alone would overflow at tiny μ).
    e = x_gy + assign_ga + grad_weights  # [B, N]
    if mask is not None:
        e = torch.where(mask, e, 0.0)  # padding: any finite x·gy, any gw, no part in ē
    h = sigma * (1.0 - sigma)  # [B, N]
    h_sum = h.sum(-1, keepdim=True)  # [B, 1]
    h_sum_safe = h_sum.clamp_min(torch.finfo(h.dtype).tiny)
    # e − ē in two passes: the second removes the rounding of the first mean, so that the
    # difference keeps its digits where the e_i share a large common part (features with a large
    # mean, or one feature alone, where it is exactly 0).
    centered = e - torch.where(h_sum > 0, (h * e).sum(-1, keepdim=True) / h_sum_safe, 0.0)  # [B, N]
    centered = centered - torch.where(h_sum > 0, (h * centered).sum(-1, keepdim=True) / h_sum_safe, 0.0)
    grad_ell = weights * (1.0 - sigma) * centered  # h (e − ē) / (Nμ): [B, N]
    grad_logits = assign * (
        grad_ell.unsqueeze(-1) + weights.unsqueeze(-1) * (grad_attr.unsqueeze(1) - assign_ga.unsqueeze(-1))
    )  # [B, N, M]
    grad_cost = -_per_sample_column(gamma, 2) * grad_logits
    if cost == "euclidean":
        coef = torch.where(c > 0, grad_cost / torch.where(c > 0, c, 1.0), 0.0)  # W: [B, N, M]
    else:
        coef = 2.0 * grad_cost
    # In-place updates of fresh GEMM outputs: each [B, N, D] pass is a full memory sweep.
    grad_xh = torch.matmul(coef, zh).neg_().addcmul_(xh, coef.sum(-1, keepdim=True))  # [B, N, D]
    coef_flat = coef.reshape(-1, coef.shape[-1])  # [B*N, M]
    grad_zh = torch.addmm(
        zh * coef_flat.sum(0).unsqueeze(-1), coef_flat.t(), xh.reshape(-1, xh.shape[-1]), alpha=-1.0
    )  # [M, D]
    grad_x = normalize_rows_backward(grad_xh, xh, x_div, normalize)
    grad_x.baddbmm_(weights.unsqueeze(-1), grad_pooled.unsqueeze(1))  # + w_i gy: [B, N, D]
    grad_z = normalize_rows_backward(grad_zh, zh, z_div, normalize)
    if not parameter_grads:
        return grad_x, grad_z
    grad_mu = _transport_ratio_grad(u, ell, mu, weights, centered, mask)
    grad_gamma = -(grad_logits * c).sum((1, 2))  # γ enters only through the logits −γc: [B]
    if mask is not None:
        empty = counts == 0
        grad_mu, grad_gamma = torch.where(empty, 0.0, grad_mu), torch.where(empty, 0.0, grad_gamma)
    return grad_x, grad_z, grad_mu, grad_gamma


def _transport_ratio_grad(u: Tensor, ell: Tensor, mu, weights: Tensor, centered: Tensor, mask: Tensor | None) -> Tensor:
    """dL/dμ ``[B]`` = (1/μ) Σ_i (p_i − w_i)(e_i − ē), p_i = h_i / Σ h (docs/math.md, Learned μ and
    γ). p comes from log h = log σ(t) + log σ(−t), t = u + ℓ, which does not underflow where σ
    saturates; at μ = 1 (u = +∞) it is the limit from below, softmax(−ℓ) (the left derivative)."""
    t = u.unsqueeze(-1) + ell  # [B, N]
    log_h = torch.nn.functional.logsigmoid(t) + torch.nn.functional.logsigmoid(-t)
    if isinstance(mu, Tensor):
        log_h = torch.where((mu >= 1.0).unsqueeze(-1), -ell, log_h)
    elif mu >= 1.0:
        log_h = -ell
    if mask is not None:
        log_h = torch.where(mask, log_h, -math.inf)
    p = torch.softmax(log_h, -1)  # [B, N]
    return ((p - weights) * centered).sum(-1) / mu


# ----------------------------------------------------------------------------- the backend contract

TAKES_MASK = True  # forward and backward take ``mask`` (backends/__init__)
TAKES_TENSOR_PARAMETERS = True  # options may hold μ and γ as tensors, backward gives their gradients


def availability(device: torch.device) -> str | None:
    """The reference runs wherever PyTorch does."""
    return None


def unsupported(x: Tensor, prototypes: Tensor, options: GSPOptions) -> str | None:
    """Every option is supported (precision is ignored: the reference is always exact)."""
    return None


def _parameter(value, dtype: torch.dtype, batch: int):
    """μ or γ for the math: a float as is, a 0-d or ``[B]`` tensor as ``[B]`` in the compute dtype."""
    return value.to(dtype).expand(batch) if isinstance(value, Tensor) else value


def forward(x: Tensor, prototypes: Tensor, options: GSPOptions, mask: Tensor | None = None):
    """Reference forward in the compute dtype; outputs cast back to x's dtype (u stays)."""
    dtype = compute_dtype(x, prototypes)
    batch = x.shape[0]
    pooled, attr, weights, u = gsp_forward(
        x.to(dtype), prototypes.to(dtype), _parameter(options.transport_ratio, dtype, batch),
        _parameter(options.gamma, dtype, batch), options.normalize, options.cost, options.solver, options.max_iter,
        options.tol, mask,
    )
    return pooled.to(x.dtype), attr.to(x.dtype), weights.to(x.dtype), u


def backward(grad_pooled, grad_attr, grad_weights, x: Tensor, prototypes: Tensor, u: Tensor, options: GSPOptions,
             mask: Tensor | None = None, parameter_grads: bool = False):
    """Reference backward; grad_x laid out like x, each gradient in its input's dtype. With
    ``parameter_grads`` also the per-sample gradients of μ and γ ``[B]`` in the compute dtype."""
    dtype = u.dtype
    batch = x.shape[0]
    grad_x, grad_z, *parameter = gsp_backward(
        grad_pooled.to(dtype), grad_attr.to(dtype), grad_weights.to(dtype), x.to(dtype), prototypes.to(dtype), u,
        _parameter(options.transport_ratio, dtype, batch), _parameter(options.gamma, dtype, batch), options.normalize,
        options.cost, mask, parameter_grads,
    )
    if grad_x.dtype == x.dtype and grad_x.stride() == x.stride():
        return grad_x, grad_z.to(prototypes.dtype), *parameter  # already x's layout: no copy
    grad_x_out = torch.empty_like(x)
    grad_x_out.copy_(grad_x)
    return grad_x_out, grad_z.to(prototypes.dtype), *parameter
