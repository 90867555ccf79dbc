"""Independent float64 oracles for GSP, written from the paper, not from gsp_kernels.

`paper_gsp` runs the paper's fixed-point iteration on the paper's transport plan and is
differentiated by autograd; costs come straight from the differences ‖ẑ_k − x̂_i‖ (no GEMM
expansion; only the contract's snap of near-zero costs to 0 is shared). The random test inputs
the test files share are ``gsp_kernels.testing.random_inputs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# The contract's snap threshold (docs/math.md, Forward): a constant of the function, not its code.
from gsp_kernels.contract import cost_snap

# exp(−γ c) is formed directly (the paper's way) while log s_i stays inside ±this bound,
# so t·s_i never over- or underflows in float64; otherwise the same iteration runs in u = log t.
EXP_DOMAIN_LIMIT = 250.0
# Converged when one update moves u = log t by at most this (relative), i.e. a few ulps.
CONVERGED_STEP = 4e-15


@dataclass
class OracleResult:
    pooled: Tensor  # [B, D]
    attr: Tensor  # [B, M]
    weights: Tensor  # [B, N]
    steps: int  # fixed-point updates taken (not counting the plan's extra one)


def normalize_for_cost(v: Tensor, mode: str) -> Tensor:
    """The cost's normalization of each row: lipschitz v/max(1,‖v‖), l2 v/‖v‖, or none."""
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    if mode == "lipschitz":
        return v / torch.clamp(norm, min=1.0)
    if mode == "l2":
        return v / torch.clamp(norm, min=1e-12)
    assert mode == "none", mode
    return v


def pairwise_costs(x: Tensor, prototypes: Tensor, normalize: str, cost: str) -> Tensor:
    """c[b, k, i] = ‖ẑ_k − x̂_i‖ (euclidean) or its square, from the differences: [B, M, N].

    The contract (cost_snap(dtype)) sets a cost to exactly 0 where ‖ẑ_k − x̂_i‖² ≤ snap·(‖x̂_i‖² + ‖ẑ_k‖²).
    """
    xh = normalize_for_cost(x, normalize)  # [B, N, D]
    zh = normalize_for_cost(prototypes, normalize)  # [M, D]
    diff = zh[None, :, None, :] - xh[:, None, :, :]  # [B, M, N, D]
    squared = (diff * diff).sum(-1)  # [B, M, N]
    # subgradient 0 at an exact match
    dist = torch.linalg.vector_norm(diff, dim=-1) if cost == "euclidean" else squared
    assert cost in ("euclidean", "sqeuclidean"), cost
    norms_sq = (xh * xh).sum(-1)[:, None, :] + (zh * zh).sum(-1)[None, :, None]  # [B, M, N]
    snapped = squared.detach() <= cost_snap(squared.dtype) * norms_sq.detach()
    return torch.where(snapped, torch.zeros_like(dist), dist)


def paper_gsp(
    x: Tensor,
    prototypes: Tensor,
    mu: float,
    gamma: float,
    normalize: str = "lipschitz",
    cost: str = "euclidean",
    steps: int | None = None,
    max_steps: int = 50_000,
) -> OracleResult:
    """The paper's GSP in float64: x [B, N, D] (any layout), prototypes [M, D].

    t ← μ / Σ_i p_i s_i with p_i = (1/N) / (1 + t s_i), s_i = Σ_k exp(−γ c_ki), t₀ = μ, for
    exactly `steps` updates, or (steps=None) until an update no longer moves t and then as many
    again (for the autograd derivative). The plan is
    then π_ki = p_i · t' · exp(−γ c_ki) with t' one more update, the residual mass ρ_i = p_i;
    pooled = Σ_i w_i x_i with w_i = (1/N − ρ_i)/μ, attr_k = Σ_i π_ki / μ. μ = 1 is the limit
    t → ∞: mean pooling, attr = mean over i of softmax_k(−γ c_ki).
    """
    batch, n, _ = x.shape
    log_kernel = -gamma * pairwise_costs(x, prototypes, normalize, cost)  # log exp(−γc): [B, M, N]
    if mu == 1.0:
        weights = torch.full((batch, n), 1.0 / n, dtype=x.dtype)
        attr = torch.softmax(log_kernel, dim=1).mean(-1)
        return OracleResult(x.mean(1), attr, weights, 0)
    log_s = torch.logsumexp(log_kernel, dim=1)  # log s_i: [B, N]
    exp_domain = bool(log_s.detach().abs().max() < EXP_DOMAIN_LIMIT)
    update = _exp_domain_update if exp_domain else _log_domain_update
    s = torch.exp(log_kernel).sum(1) if exp_domain else log_s  # s_i, or log s_i: [B, N]
    log_t = torch.full((batch,), math.log(mu), dtype=x.dtype)
    taken = 0
    while steps is None or taken < steps:
        new_log_t = update(log_t, s, mu, n)
        taken += 1
        if steps is None:
            moved = (new_log_t - log_t).detach().abs() <= CONVERGED_STEP * log_t.detach().abs().clamp_min(1.0)
            if bool(moved.all()):
                # The unrolled derivative contracts at the same rate as t but lags behind it;
                # as many steps again bring it to the same accuracy.
                steps = 2 * taken
            assert taken < max_steps, f"paper iteration did not converge in {max_steps} steps"
        log_t = new_log_t
    plan_log_t = update(log_t, s, mu, n)  # the paper's extra update before forming the plan
    if exp_domain:
        t, t_plan = log_t.exp(), plan_log_t.exp()
        residual = (1.0 / n) / (1.0 + t[:, None] * s)  # ρ_i = p_i: [B, N]
        plan = residual[:, None, :] * t_plan[:, None, None] * torch.exp(log_kernel)  # π: [B, M, N]
        weights = (1.0 / n - residual) / mu
    else:
        log_residual = -math.log(n) - _log1p_exp(log_t[:, None] + log_s)  # log p_i
        plan = torch.exp(log_residual[:, None, :] + plan_log_t[:, None, None] + log_kernel)
        # 1/N − p_i = (1/N)(1 − N p_i), written with expm1 so tiny transported masses keep their digits
        weights = -torch.expm1(log_residual + math.log(n)) / (n * mu)
    pooled = torch.einsum("bn,bnd->bd", weights, x)
    attr = plan.sum(-1) / mu
    return OracleResult(pooled, attr, weights, taken)


def _exp_domain_update(log_t: Tensor, s: Tensor, mu: float, n: int) -> Tensor:
    """One paper update t ← μ / Σ p_i s_i, from and to log t; s [B, N] holds s_i."""
    t = log_t.exp()
    p = (1.0 / n) / (1.0 + t[:, None] * s)  # [B, N]
    return torch.log(mu / (p * s).sum(-1))


def _log_domain_update(log_t: Tensor, log_s: Tensor, mu: float, n: int) -> Tensor:
    """The same update in logs: log p_i + log s_i = log s_i − log N − log(1 + t s_i)."""
    log_ps = log_s - math.log(n) - _log1p_exp(log_t[:, None] + log_s)  # [B, N]
    return math.log(mu) - torch.logsumexp(log_ps, dim=-1)


def _log1p_exp(v: Tensor) -> Tensor:
    """log(1 + e^v) at full precision (softplus's default threshold would drop e^-20 terms)."""
    return torch.logaddexp(v, torch.zeros_like(v))
