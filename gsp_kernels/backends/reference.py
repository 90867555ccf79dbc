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


def _newton_start(ell: Tensor, mu: float) -> tuple[Tensor, Tensor, Tensor]:
    """The solve's start u₀ = logit μ − mean_i ℓ_i and its bracket [lo, hi] (docs/math.md, The
    scalar solve), each ``[B]``: every σ_i <= μ at lo, every σ_i >= μ at hi."""
    logit_mu = math.log(mu) - math.log1p(-mu)
    lo = logit_mu - ell.amax(-1)  # [B]
    hi = logit_mu - ell.amin(-1)  # [B]
    u = torch.minimum(torch.maximum(logit_mu - ell.mean(-1), lo), hi)  # [B]
    return u, lo, hi


def _newton_step(ell: Tensor, u: Tensor, lo: Tensor, hi: Tensor, target: float, log_target: float):
    """One bracketed log-Newton step from u ``[B]`` (ell ``[B, N]``): the bracket shrunk to the
    root's side, then the Newton step of log Σσ = log μN where it stays inside, else the midpoint
    (a NaN or infinite step is not inside). Returns (u_next, lo, hi, residual Σσ − μN), each ``[B]``."""
    s = torch.sigmoid(ell + u.unsqueeze(-1))  # [B, N]
    mass = s.sum(-1)  # [B]
    residual = mass - target  # [B]
    slope = mass - (s * s).sum(-1)  # Σ σ(1 − σ)
    above = residual > 0
    hi = torch.where(above, u, hi)
    lo = torch.where(above, lo, u)
    u_newton = u - (torch.log(mass) - log_target) * mass / slope  # Newton on log Σσ
    # inside the bracket <=> (u_newton − lo)(hi − u_newton) >= 0; False for NaN steps
    inside = (u_newton - lo) * (hi - u_newton) >= 0
    u_next = torch.where(inside, u_newton, 0.5 * (lo + hi))
    return u_next, lo, hi, residual


def _residual_open(residual: Tensor, target: float, tol: float) -> Tensor:
    """``[B]``: the residual is finite and above tol (relative); False freezes u before the step."""
    return (residual.abs() > tol * target) & torch.isfinite(residual)


def _step_open(u: Tensor, step: Tensor, lo: Tensor, hi: Tensor, tol: float) -> Tensor:
    """``[B]``: the step and the bracket are above tol (relative to u); False freezes u after the step."""
    scale = tol * u.abs().clamp_min(1.0)
    return (step > scale) & (hi - lo > scale)


def _gap_root(ell: Tensor) -> Tensor:
    """u = +∞ ``[B]``: μ = 1 is GAP, σ ≡ 1 exactly."""
    return torch.full(ell.shape[:-1], math.inf, dtype=ell.dtype, device=ell.device)


def solve_newton(ell: Tensor, mu: float, tol: float, max_iter: int) -> Tensor:
    """Root u of Σ_i σ(u + ℓ_i) = μN per sample, bracketed Newton. ell [B, N] -> u [B].

    Each iteration takes the Newton step of log Σσ = log μN (the function is nearly linear
    where the σ are small, as they all are for a small μ: one step there, where a step on Σσ
    itself moves u by at most 1), or bisects the bracket when that step leaves it or is not
    finite. The solve stops once every sample has converged: its residual or its
    step under tol (relative), or its bracket collapsed; at the latest after max_iter
    iterations. A sample is frozen at the first convergence check it passes (every
    iteration on the CPU, every third on accelerators, to save host syncs), so its result
    does not depend on the rest of the batch. Non-finite ℓ gives a NaN u, never a hang.
    """
    n = ell.shape[-1]
    target = mu * n
    if mu >= 1.0:
        return _gap_root(ell)
    log_target = math.log(target)
    u, lo, hi = _newton_start(ell, mu)
    active = torch.ones_like(u, dtype=torch.bool)  # [B]: not yet converged
    check_every = 1 if u.device.type == "cpu" else 3  # fewer host syncs on accelerators
    compiling = torch.compiler.is_compiling()
    for it in range(max_iter):
        u_next, lo, hi, residual = _newton_step(ell, u, lo, hi, target, log_target)
        checking = not compiling and (it + 1) % check_every == 0
        if checking:  # a small residual freezes u where it is, before any step
            active = active & _residual_open(residual, target, tol)
        step = (u_next - u).abs()
        u = torch.where(active, u_next, u)
        if checking:  # a vanishing step or bracket freezes u after the step
            active = active & _step_open(u, step, lo, hi, tol)
            if not bool(active.any()):
                break
    return u


def solve_unrolled(ell: Tensor, mu: float, tol: float, steps: int) -> Tensor:
    """``solve_newton`` run exactly ``steps`` times with no data-dependent control flow: the
    convergence tests of every iteration freeze a sample through ``torch.where`` and the loop
    never exits early, so that a trace (``torch.export``, ONNX) records the whole solve as
    standard tensor operations. ell [B, N] -> u [B]."""
    n = ell.shape[-1]
    target = mu * n
    if mu >= 1.0:
        return _gap_root(ell)
    log_target = math.log(target)
    u, lo, hi = _newton_start(ell, mu)
    active = torch.ones_like(u, dtype=torch.bool)  # [B]: not yet converged
    for _ in range(steps):
        u_next, lo, hi, residual = _newton_step(ell, u, lo, hi, target, log_target)
        active = active & _residual_open(residual, target, tol)
        step = (u_next - u).abs()
        u = torch.where(active, u_next, u)
        active = active & _step_open(u, step, lo, hi, tol)
    return u


def solve_fixed_point(ell: Tensor, mu: float, max_iter: int) -> Tensor:
    """The paper's iteration t ← μ / Σ p_i s_i, T = max_iter times from t₀ = μ, as u = log t.

    In the log domain one update reads u ← u + log(μN) − log Σ_i σ(u + ℓ_i). ell [B, N] -> u [B].
    """
    n = ell.shape[-1]
    if mu >= 1.0:
        return _gap_root(ell)
    log_target = math.log(mu * n)
    u = torch.full(ell.shape[:-1], math.log(mu), dtype=ell.dtype, device=ell.device)
    for _ in range(max_iter):
        log_mass = torch.logsumexp(torch.nn.functional.logsigmoid(u.unsqueeze(-1) + ell), -1)
        u = u + (log_target - log_mass)
    return u


def _plan_terms(x: Tensor, prototypes: Tensor, gamma: float, normalize: str, cost: str):
    """Normalized inputs, costs and per-feature log-partition / softmax over prototypes."""
    xh, x_div = normalize_rows(x, normalize)  # [B, N, D], [B, N, 1]
    zh, z_div = normalize_rows(prototypes, normalize)  # [M, D], [M, 1]
    c = costs_from_squared(squared_costs(xh, zh), cost)  # [B, N, M]
    logits = -gamma * c
    ell = torch.logsumexp(logits, -1)  # [B, N]
    assign = torch.softmax(logits, -1)  # [B, N, M]: A_ki laid out as [b, i, k]
    return xh, x_div, zh, z_div, c, ell, assign


def gsp_forward(
    x: Tensor,
    prototypes: Tensor,
    transport_ratio: float,
    gamma: float,
    normalize: str = "lipschitz",
    cost: str = "euclidean",
    solver: str = "newton",
    max_iter: int | None = None,
    tol: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """GSP forward in x's dtype. Returns pooled [B, D], attr [B, M], weights [B, N], u [B]."""
    mu = float(transport_ratio)
    n = x.shape[1]
    max_iter = default_max_iter(solver) if max_iter is None else max_iter
    tol = default_tol(x.dtype) if tol is None else tol
    _, _, _, _, _, ell, assign = _plan_terms(x, prototypes, gamma, normalize, cost)
    if solver == "newton":
        u = solve_newton(ell, mu, tol, max_iter)
    elif solver == "unrolled":
        u = solve_unrolled(ell, mu, tol, max_iter)
    else:
        u = solve_fixed_point(ell, mu, max_iter)
    sigma = torch.sigmoid(u.unsqueeze(-1) + ell)  # [B, N]
    weights = sigma / (n * mu)  # [B, N]
    pooled = torch.bmm(weights.unsqueeze(1), x).squeeze(1)  # [B, D]
    attr = torch.bmm(weights.unsqueeze(1), assign).squeeze(1)  # [B, M]
    if solver == "fixed_point" and mu < 1.0:
        # The paper forms its plan with one more update of t, which rescales the
        # transported mass to exactly μ: the attribute then sums to 1 (weights need not).
        attr = attr / weights.sum(-1, keepdim=True)
    return pooled, attr, weights, u


def gsp_backward(
    grad_pooled: Tensor,
    grad_attr: Tensor,
    grad_weights: Tensor,
    x: Tensor,
    prototypes: Tensor,
    u: Tensor,
    transport_ratio: float,
    gamma: float,
    normalize: str = "lipschitz",
    cost: str = "euclidean",
) -> tuple[Tensor, Tensor]:
    """Analytic backward (docs/math.md, Backward: implicit in u). Returns grad_x [B, N, D], grad_prototypes [M, D].

    grad_pooled [B, D], grad_attr [B, M] and grad_weights [B, N] are tensors (zeros where
    absent). A weights gradient enters like the pooled one: both act on L through w_i, so
    e_i = (x_i·gy + ā_i + gw_i) / (Nμ).
    """
    mu = float(transport_ratio)
    n = x.shape[1]
    xh, x_div, zh, z_div, c, ell, assign = _plan_terms(x, prototypes, gamma, normalize, cost)
    sigma = torch.sigmoid(u.unsqueeze(-1) + ell)  # [B, N]
    weights = sigma / (n * mu)
    assign_ga = torch.bmm(assign, grad_attr.unsqueeze(-1)).squeeze(-1)  # ā_i: [B, N]
    x_gy = torch.bmm(x, grad_pooled.unsqueeze(-1)).squeeze(-1)  # [B, N]
    # Nμ e_i: the 1/(Nμ) goes with σ into w below (e alone would overflow at tiny μ).
    e = x_gy + assign_ga + grad_weights  # [B, N]
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
    grad_cost = -gamma * grad_logits
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
    return grad_x, grad_z


# ----------------------------------------------------------------------------- the backend contract


def availability(device: torch.device) -> str | None:
    """The reference runs wherever PyTorch does."""
    return None


def unsupported(x: Tensor, prototypes: Tensor, options: GSPOptions) -> str | None:
    """Every option is supported (precision is ignored: the reference is always exact)."""
    return None


def forward(x: Tensor, prototypes: Tensor, options: GSPOptions):
    """Reference forward in the compute dtype; outputs cast back to x's dtype (u stays)."""
    dtype = compute_dtype(x, prototypes)
    pooled, attr, weights, u = gsp_forward(
        x.to(dtype), prototypes.to(dtype), options.transport_ratio, options.gamma, options.normalize, options.cost,
        options.solver, options.max_iter, options.tol,
    )
    return pooled.to(x.dtype), attr.to(x.dtype), weights.to(x.dtype), u


def backward(grad_pooled, grad_attr, grad_weights, x: Tensor, prototypes: Tensor, u: Tensor, options: GSPOptions):
    """Reference backward; grad_x laid out like x, each gradient in its input's dtype."""
    dtype = u.dtype
    grad_x, grad_z = gsp_backward(
        grad_pooled.to(dtype), grad_attr.to(dtype), grad_weights.to(dtype), x.to(dtype), prototypes.to(dtype), u,
        options.transport_ratio, options.gamma, options.normalize, options.cost,
    )
    if grad_x.dtype == x.dtype and grad_x.stride() == x.stride():
        return grad_x, grad_z.to(prototypes.dtype)  # already x's layout: no copy
    grad_x_out = torch.empty_like(x)
    grad_x_out.copy_(grad_x)
    return grad_x_out, grad_z.to(prototypes.dtype)
