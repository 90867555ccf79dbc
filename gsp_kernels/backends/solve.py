"""The reference's scalar solve (docs/math.md, The scalar solve): Σ_i σ(u + ℓ_i) = μ n per sample,
by bracketed Newton, its unrolled form, or the paper's fixed point.

ell ``[B, N]`` holds ℓ_i, −inf at padded positions (docs/math.md, Masks), whose σ is then exactly 0.
``count`` is the number of features per sample: N (an int) without a mask, else the valid counts
``[B]`` (at least 1; a sample with none gets its u from the caller). μ is a float, or a ``[B]``
tensor of per-sample values (docs/math.md, Learned μ and γ), whose samples at μ = 1 get u = +∞.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _log(value):
    """log of a float or of a tensor."""
    return torch.log(value) if isinstance(value, Tensor) else math.log(value)


def _logit(mu):
    """log μ − log(1 − μ) of a float or of a tensor."""
    return torch.logit(mu) if isinstance(mu, Tensor) else math.log(mu) - math.log1p(-mu)


def _mean_logit(ell: Tensor, count) -> Tensor:
    """mean_i ℓ_i over the valid positions ``[B]`` (padding holds −inf)."""
    if isinstance(count, int):
        return ell.mean(-1)
    return torch.where(torch.isneginf(ell), 0.0, ell).sum(-1) / count


def _newton_start(ell: Tensor, mu, count) -> tuple[Tensor, Tensor, Tensor]:
    """The solve's start u₀ = logit μ − mean_i ℓ_i and its bracket [lo, hi] (docs/math.md, The
    scalar solve), each ``[B]``: every σ_i <= μ at lo, every σ_i >= μ at hi. Padded positions
    (ℓ = −inf) take no part: amax ignores them, amin is taken with them at +inf."""
    logit_mu = _logit(mu)
    lo = logit_mu - ell.amax(-1)  # [B]
    smallest = ell.amin(-1) if isinstance(count, int) else torch.where(torch.isneginf(ell), math.inf, ell).amin(-1)
    hi = logit_mu - smallest  # [B]
    u = torch.minimum(torch.maximum(logit_mu - _mean_logit(ell, count), lo), hi)  # [B]
    return u, lo, hi


def _newton_step(ell: Tensor, u: Tensor, lo: Tensor, hi: Tensor, target, log_target):
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


def _residual_open(residual: Tensor, target, tol: float) -> Tensor:
    """``[B]``: the residual is finite and above tol (relative); False freezes u before the step."""
    return (residual.abs() > tol * target) & torch.isfinite(residual)


def _step_open(u: Tensor, step: Tensor, lo: Tensor, hi: Tensor, tol: float) -> Tensor:
    """``[B]``: the step and the bracket are above tol (relative to u); False freezes u after the step."""
    scale = tol * u.abs().clamp_min(1.0)
    return (step > scale) & (hi - lo > scale)


def _gap_root(ell: Tensor) -> Tensor:
    """u = +∞ ``[B]``: μ = 1 is GAP, σ ≡ 1 exactly."""
    return torch.full(ell.shape[:-1], math.inf, dtype=ell.dtype, device=ell.device)


def _solvable(mu):
    """μ for the iteration: per-sample μ = 1 (GAP, set to u = +∞ afterwards by ``_with_gap``) replaced
    by 1/2, so that no inf enters the iteration."""
    return torch.where(mu >= 1.0, 0.5, mu) if isinstance(mu, Tensor) else mu


def _with_gap(u: Tensor, mu) -> Tensor:
    """u = +∞ for the samples at μ = 1 of a per-sample μ."""
    return torch.where(mu >= 1.0, math.inf, u) if isinstance(mu, Tensor) else u


def solve_newton(ell: Tensor, mu, tol: float, max_iter: int, count=None) -> Tensor:
    """Root u of Σ_i σ(u + ℓ_i) = μ n per sample, bracketed Newton. ell [B, N] -> u [B].

    Each iteration takes the Newton step of log Σσ = log μN (the function is nearly linear
    where the σ are small, as they all are for a small μ: one step there, where a step on Σσ
    itself moves u by at most 1), or bisects the bracket when that step leaves it or is not
    finite. The solve stops once every sample has converged: its residual or its
    step under tol (relative), or its bracket collapsed; at the latest after max_iter
    iterations. A sample is frozen at the first convergence check it passes (every
    iteration on the CPU, every third on accelerators, to save host syncs), so its result
    does not depend on the rest of the batch. Non-finite ℓ gives a NaN u, never a hang.
    """
    count = ell.shape[-1] if count is None else count
    if not isinstance(mu, Tensor) and mu >= 1.0:
        return _gap_root(ell)
    mu_solve = _solvable(mu)
    target = mu_solve * count
    log_target = _log(target)
    u, lo, hi = _newton_start(ell, mu_solve, count)
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
    return _with_gap(u, mu)


def solve_unrolled(ell: Tensor, mu, tol: float, steps: int, count=None) -> Tensor:
    """``solve_newton`` run exactly ``steps`` times with no data-dependent control flow: the
    convergence tests of every iteration freeze a sample through ``torch.where`` and the loop
    never exits early, so that a trace (``torch.export``, ONNX) records the whole solve as
    standard tensor operations. ell [B, N] -> u [B]."""
    count = ell.shape[-1] if count is None else count
    if not isinstance(mu, Tensor) and mu >= 1.0:
        return _gap_root(ell)
    mu_solve = _solvable(mu)
    target = mu_solve * count
    log_target = _log(target)
    u, lo, hi = _newton_start(ell, mu_solve, count)
    active = torch.ones_like(u, dtype=torch.bool)  # [B]: not yet converged
    for _ in range(steps):
        u_next, lo, hi, residual = _newton_step(ell, u, lo, hi, target, log_target)
        active = active & _residual_open(residual, target, tol)
        step = (u_next - u).abs()
        u = torch.where(active, u_next, u)
        active = active & _step_open(u, step, lo, hi, tol)
    return _with_gap(u, mu)


def solve_fixed_point(ell: Tensor, mu, max_iter: int, count=None) -> Tensor:
    """The paper's iteration t ← μ / Σ p_i s_i, T = max_iter times from t₀ = μ, as u = log t.

    In the log domain one update reads u ← u + log(μN) − log Σ_i σ(u + ℓ_i). ell [B, N] -> u [B].
    """
    count = ell.shape[-1] if count is None else count
    if not isinstance(mu, Tensor) and mu >= 1.0:
        return _gap_root(ell)
    mu_solve = _solvable(mu)
    log_target = _log(mu_solve * count)
    if isinstance(mu_solve, Tensor):
        u = torch.log(mu_solve)  # [B]
    else:
        u = torch.full(ell.shape[:-1], math.log(mu), dtype=ell.dtype, device=ell.device)
    for _ in range(max_iter):
        log_mass = torch.logsumexp(torch.nn.functional.logsigmoid(u.unsqueeze(-1) + ell), -1)
        u = u + (log_target - log_mass)
    return _with_gap(u, mu)
