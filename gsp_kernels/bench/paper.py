"""The paper's GSP algorithm as its authors formulated it: the kernel benchmark's eager baseline.

Generalized Sum Pooling (Gurbuz, Sener, Alatan, ICCV 2023) in its original form: Lipschitz
normalization, ``torch.cdist`` costs, the kernel Kb = exp(−γ c), and a plain (not
log-domain) fixed-point iteration over the whole [B, M, N] kernel, run a fixed number of
times. The transport plan's gradient comes from the implicit-function theorem applied to
the converged constraint (``PartialTransportPlan``), not from unrolling the loop.

This module is a baseline and a parity oracle; it is not the library's op (see ``ops.gsp_pool``).
It underflows for large γ·c in float32, as the original does (docs/math.md, The paper's transport plan).
"""

from __future__ import annotations

import torch
from torch import Tensor


class LipschitzNormalize(torch.autograd.Function):
    """v / max(1, ‖v‖) over the last dim; rows inside the unit ball pass through."""

    @staticmethod
    def forward(ctx, v: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)  # [..., 1]
        divisor = norm.clamp_min(1.0)
        normalized = v / divisor
        ctx.save_for_backward(normalized, divisor)
        return normalized

    @staticmethod
    def backward(ctx, grad_normalized: Tensor) -> Tensor:
        normalized, divisor = ctx.saved_tensors
        # Outside the ball the map is a projection onto the sphere: drop the radial part.
        radial = (normalized * grad_normalized).sum(-1, keepdim=True) * normalized
        projected = (grad_normalized - radial) / divisor
        return torch.where(divisor > 1.0, projected, grad_normalized)


def fixed_point_scale(kernel: Tensor, transport_ratio: float, iterations: int) -> Tensor:
    """The paper's loop for the dual scale t. kernel [B, M, N] -> t [B, 1, 1].

    t₀ = μ; repeat: p = (1/N) / (1 + t·Σ_k Kb); t = μ / Σ_i p·Σ_k Kb; then once more.
    """
    n = kernel.shape[-1]
    t = torch.full((kernel.shape[0], 1, 1), transport_ratio, dtype=kernel.dtype, device=kernel.device)
    for _ in range(iterations + 1):
        kernel_mass = kernel.sum(1, keepdim=True)  # Σ_k Kb: [B, 1, N]
        residual = (1.0 / n) / (1.0 + t * kernel_mass)  # p: [B, 1, N]
        t = transport_ratio / (residual * kernel_mass).sum(-1, keepdim=True)  # [B, 1, 1]
    return t


def transport_plan(kernel: Tensor, t: Tensor) -> Tensor:
    """Plan X = [p ; t·Kb·p] from the kernel [B, M, N] and the scale t [B, 1, 1] -> [B, M+1, N]."""
    n = kernel.shape[-1]
    residual = (1.0 / n) / (1.0 + t * kernel.sum(1, keepdim=True))  # p: [B, 1, N]
    return torch.cat([residual, t * kernel * residual], dim=1)


class PartialTransportPlan(torch.autograd.Function):
    """Kb [B, M, N] -> plan X [B, M+1, N] (row 0: residual mass p; rows 1..M: transported).

    Backward, with s_i = Σ_k Kb_ki and q_i = 1 / (1 + t s_i), so that p_i = q_i / N and
    X_ki = t Kb_ki q_i / N. At the fixed point t solves G(t, s) = Σ_i t s_i q_i − μN = 0, so
    dt/ds_i = −(∂G/∂s_i)/(∂G/∂t) = −t q_i² / Σ_j s_j q_j². Given g0 = ∂L/∂p, gK = ∂L/∂X[1:]:
      ∂L/∂t (t held)   = Σ_i q_i² (Σ_k gK_ki Kb_ki − s_i g0_i) / N
      ∂L/∂s_i (t held) = −t q_i² (g0_i + t Σ_k gK_ki Kb_ki) / N
      ∂L/∂Kb_ki        = t q_i gK_ki / N + ∂L/∂s_i + ∂L/∂t · dt/ds_i
    """

    @staticmethod
    def forward(ctx, kernel: Tensor, transport_ratio: float, iterations: int) -> Tensor:
        t = fixed_point_scale(kernel, transport_ratio, iterations)
        ctx.save_for_backward(kernel, t)
        return transport_plan(kernel, t)

    @staticmethod
    def backward(ctx, grad_plan: Tensor):
        kernel, t = ctx.saved_tensors  # [B, M, N], [B, 1, 1]
        n = kernel.shape[-1]
        kernel_mass = kernel.sum(1, keepdim=True)  # s: [B, 1, N]
        q = 1.0 / (1.0 + t * kernel_mass)  # [B, 1, N]
        grad_residual = grad_plan[:, :1]  # g0: [B, 1, N]
        grad_transported = grad_plan[:, 1:]  # gK: [B, M, N]
        weighted = (grad_transported * kernel).sum(1, keepdim=True)  # Σ_k gK Kb: [B, 1, N]
        grad_t = (q * q * (weighted - kernel_mass * grad_residual)).sum(-1, keepdim=True) / n  # [B, 1, 1]
        dt_ds = -t * q * q / (kernel_mass * q * q).sum(-1, keepdim=True)  # [B, 1, N]
        grad_mass = -t * q * q * (grad_residual + t * weighted) / n + grad_t * dt_ds  # [B, 1, N]
        grad_kernel = t * q * grad_transported / n + grad_mass  # [B, M, N]
        return grad_kernel, None, None


def paper_gsp(
    x: Tensor, prototypes: Tensor, transport_ratio: float, gamma: float, iterations: int = 100
) -> tuple[Tensor, Tensor]:
    """The paper's GSP. x [B, N, D], prototypes [M, D] -> pooled [B, D], attr [B, M].

    pooled = Σ_i ((1 − N p_i) / μ) x_i / N and attr_k = Σ_i X_ki / μ, with the plan X of
    ``iterations`` fixed-point steps (100 in the paper's code).
    """
    batch, n, _ = x.shape
    features = LipschitzNormalize.apply(x)  # [B, N, D]
    anchors = LipschitzNormalize.apply(prototypes)  # [M, D]
    costs = torch.cdist(anchors.unsqueeze(0).expand(batch, -1, -1), features)  # [B, M, N]
    kernel = torch.exp(-gamma * costs)  # Kb: [B, M, N]
    plan = PartialTransportPlan.apply(kernel, transport_ratio, iterations)  # [B, M+1, N]
    mixing = (1.0 - n * plan[:, 0]) / transport_ratio  # [B, N]
    pooled = torch.bmm(mixing.unsqueeze(1), x).squeeze(1) / n  # [B, D]
    attr = plan[:, 1:].sum(-1) / transport_ratio  # [B, M]
    return pooled, attr
