"""The float64 reference backend against independent oracles (the paper's iteration, gradcheck)."""

from __future__ import annotations

import pytest
import torch
from oracles import paper_gsp

from gsp_kernels import gsp_pool
from gsp_kernels.backends import reference as _reference
from gsp_kernels.testing import random_inputs

# Forward outputs and gradients of the reference vs the converged paper iteration.
ORACLE_TOL = 1e-9


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str, floor: float = 1e-12) -> None:
    """‖out − ref‖ ≤ tol·‖ref‖ + floor: relative, with an absolute floor of float64 rounding on
    O(1) terms for values that cancel to (almost) nothing (a single prototype, a single feature)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    out64, ref64 = out.detach().double(), ref.detach().double()
    scale = ref64.norm().item()
    err = (out64 - ref64).norm().item()
    bound = tol * scale + floor
    assert err <= bound, f"{what}: error {err:.3e} vs norm {scale:.3e}"


def upstream_grads(pooled, attr, weights, seed=0):
    """Random cotangents for the three outputs (float64)."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in (pooled, attr, weights))


def loss_of(outputs, cotangents) -> torch.Tensor:
    return sum((out * cot).sum() for out, cot in zip(outputs, cotangents))


def check_reference_vs_paper(x, prototypes, mu, gamma, normalize="lipschitz", cost="euclidean"):
    """gsp_pool(backend="reference") vs paper_gsp in float64: outputs and x / prototype gradients.

    x may be [B, N, D] or a channels-first map [B, D, H, W]; the oracle reads the latter as
    its [B, H*W, D] view. Returns the reference's outputs for further checks.
    """
    x = x.detach().requires_grad_()
    prototypes = prototypes.detach().requires_grad_()
    outputs = gsp_pool(
        x,
        prototypes,
        transport_ratio=mu,
        gamma=gamma,
        normalize=normalize,
        cost=cost,
        backend="reference",
        return_weights=True,
    )
    pooled, attr, weights = outputs
    cotangents = upstream_grads(pooled, attr, weights.reshape(weights.shape[0], -1))
    grad_x, grad_z = torch.autograd.grad(loss_of((pooled, attr, weights.flatten(1)), cotangents), (x, prototypes))

    x_oracle = x.detach().clone().requires_grad_()
    z_oracle = prototypes.detach().clone().requires_grad_()
    features = x_oracle if x.dim() == 3 else x_oracle.flatten(2).transpose(1, 2)  # [B, N, D]
    oracle = paper_gsp(features, z_oracle, mu, gamma, normalize, cost)
    oracle_outputs = (oracle.pooled, oracle.attr, oracle.weights)
    oracle_gx, oracle_gz = torch.autograd.grad(loss_of(oracle_outputs, cotangents), (x_oracle, z_oracle))

    assert_close(pooled, oracle.pooled, ORACLE_TOL, "pooled")
    assert_close(attr, oracle.attr, ORACLE_TOL, "attr")
    assert_close(weights.flatten(1), oracle.weights, ORACLE_TOL, "weights")
    assert_close(grad_x, oracle_gx, ORACLE_TOL, "grad x")
    assert_close(grad_z, oracle_gz, ORACLE_TOL, "grad prototypes")
    return pooled, attr, weights, grad_x, grad_z


@pytest.mark.parametrize("mu", [0.05, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("gamma", [0.1, 5.0, 20.0, 100.0])
def test_gamma_mu_grid(gamma, mu):
    x, prototypes = random_inputs(2, 7, 5, 11, seed=1)
    check_reference_vs_paper(x, prototypes, mu, gamma)


@pytest.mark.parametrize("cost", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("normalize", ["lipschitz", "l2", "none"])
@pytest.mark.parametrize(("gamma", "mu"), [(5.0, 0.3), (100.0, 0.9)])
def test_options(normalize, cost, gamma, mu):
    x, prototypes = random_inputs(3, 13, 17, 3, seed=2)
    check_reference_vs_paper(x, prototypes, mu, gamma, normalize, cost)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 7, 5, 11), (3, 13, 17, 3), (4, 31, 7, 64), (2, 2, 1, 2)])
@pytest.mark.parametrize("normalize", ["lipschitz", "l2", "none"])
def test_shapes(shape, normalize):
    x, prototypes = random_inputs(*shape, seed=3)
    check_reference_vs_paper(x, prototypes, 0.3, 20.0, normalize)


@pytest.mark.parametrize(("batch", "d", "h", "w"), [(2, 11, 3, 5), (1, 3, 1, 1), (3, 64, 7, 7)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channels_first_map(batch, d, h, w, channels_last):
    """A [B, D, H, W] map is pooled over its H*W positions; weights [B, H, W]; gradient [B, D, H, W]."""
    features, prototypes = random_inputs(batch, h * w, 5, d, seed=4)
    x = features.transpose(1, 2).reshape(batch, d, h, w)  # [B, D, H, W], contiguous NCHW
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    pooled, attr, weights, grad_x, _ = check_reference_vs_paper(x, prototypes, 0.3, 5.0)
    assert pooled.shape == (batch, d) and attr.shape == (batch, 5)
    assert weights.shape == (batch, h, w)
    assert grad_x.shape == x.shape


@pytest.mark.parametrize("cost", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("normalize", ["lipschitz", "l2", "none"])
@pytest.mark.parametrize("gamma", [5.0, 100.0])
def test_feature_equal_to_prototype(normalize, cost, gamma):
    """Exact feature/prototype matches cost exactly 0; gradients are finite and match the oracle."""
    x, prototypes = random_inputs(2, 7, 5, 11, seed=5)
    matches = [(0, 0, 0), (0, 3, 2), (1, 6, 4)]  # (sample, feature, prototype)
    for b, i, k in matches:
        x[b, i] = prototypes[k]
    xh, _ = _reference.normalize_rows(x, normalize)
    zh, _ = _reference.normalize_rows(prototypes, normalize)
    squared = _reference.squared_costs(xh, zh)  # [B, N, M]
    for b, i, k in matches:
        assert squared[b, i, k].item() == 0.0
    assert (squared > 0).sum().item() == squared.numel() - len(matches)
    check_reference_vs_paper(x, prototypes, 0.3, gamma, normalize, cost)


@pytest.mark.parametrize("steps", [5, 100])
@pytest.mark.parametrize(("gamma", "mu"), [(5.0, 0.3), (20.0, 0.9), (100.0, 0.05), (5.0, 1.0)])
@pytest.mark.parametrize("normalize", ["lipschitz", "none"])
def test_fixed_point_matches_paper_steps(steps, gamma, mu, normalize):
    """solver="fixed_point", max_iter=T is the paper's T-step algorithm, unconverged or not."""
    x, prototypes = random_inputs(3, 13, 7, 6, seed=6)
    pooled, attr, weights = gsp_pool(
        x,
        prototypes,
        transport_ratio=mu,
        gamma=gamma,
        normalize=normalize,
        solver="fixed_point",
        max_iter=steps,
        backend="reference",
        return_weights=True,
    )
    oracle = paper_gsp(x, prototypes, mu, gamma, normalize, steps=steps)
    assert oracle.steps == (steps if mu < 1.0 else 0)  # mu = 1 is closed-form mean pooling
    assert_close(pooled, oracle.pooled, 1e-12, "pooled")
    assert_close(attr, oracle.attr, 1e-12, "attr")
    assert_close(weights, oracle.weights, 1e-12, "weights")
    # The plan is formed after one more update: its attribute sums to 1 whatever T is.
    torch.testing.assert_close(attr.sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-14)


def test_fixed_point_short_run_differs_from_newton():
    """At mu=0.9 five paper steps are far from the root: the two solvers must disagree there."""
    x, prototypes = random_inputs(2, 7, 5, 11, seed=7)
    kwargs = dict(transport_ratio=0.9, gamma=5.0, backend="reference", return_weights=True)
    _, _, weights_fp = gsp_pool(x, prototypes, solver="fixed_point", max_iter=5, **kwargs)
    _, _, weights_newton = gsp_pool(x, prototypes, solver="newton", **kwargs)
    assert (weights_fp.sum(-1) - 1).abs().max() > 1e-3
    torch.testing.assert_close(weights_newton.sum(-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cost", ["euclidean", "sqeuclidean"])
@pytest.mark.parametrize("normalize", ["lipschitz", "l2", "none"])
@pytest.mark.parametrize("mu", [0.3, 1.0])
def test_gradcheck(normalize, cost, mu):
    """Finite differences of the whole float64 op (solver included) vs its analytic backward."""
    x, prototypes = random_inputs(2, 4, 3, 5, seed=8)
    x.requires_grad_()
    prototypes.requires_grad_()

    def op(x, prototypes):
        return gsp_pool(
            x,
            prototypes,
            transport_ratio=mu,
            gamma=4.0,
            normalize=normalize,
            cost=cost,
            backend="reference",
            return_weights=True,
        )

    assert torch.autograd.gradcheck(op, (x, prototypes), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_channels_first_map():
    x, prototypes = random_inputs(2, 6, 3, 4, seed=9)
    x = x.transpose(1, 2).reshape(2, 4, 2, 3).requires_grad_()  # [B, D, H, W]
    prototypes.requires_grad_()

    def op(x, prototypes):
        return gsp_pool(x, prototypes, transport_ratio=0.5, gamma=3.0, backend="reference", return_weights=True)

    assert torch.autograd.gradcheck(op, (x, prototypes), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize(("gamma", "mu"), [(5.0, 0.3), (100.0, 0.9), (20.0, 1.0)])
def test_reference_on_gpu_matches_paper(gamma, mu):
    """The reference backend on a CUDA device (float64) against the CPU oracle."""
    x, prototypes = random_inputs(3, 13, 17, 3, seed=10)
    oracle = paper_gsp(x, prototypes, mu, gamma)
    pooled, attr, weights = gsp_pool(
        x.cuda(), prototypes.cuda(), transport_ratio=mu, gamma=gamma, backend="reference", return_weights=True
    )
    assert pooled.device.type == "cuda"
    assert_close(pooled.cpu(), oracle.pooled, ORACLE_TOL, "pooled")
    assert_close(attr.cpu(), oracle.attr, ORACLE_TOL, "attr")
    assert_close(weights.cpu(), oracle.weights, ORACLE_TOL, "weights")
