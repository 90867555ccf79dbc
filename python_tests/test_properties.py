"""Properties of GSP that hold for every input (hypothesis, float64 reference backend)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from oracles import pairwise_costs

from gsp_kernels import gsp_pool
from gsp_kernels.testing import random_inputs

PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)

shapes = st.tuples(
    st.integers(1, 3),  # B
    st.integers(1, 9),  # N
    st.integers(1, 6),  # M
    st.integers(1, 8),  # D
)
transport_ratios = st.sampled_from([0.05, 0.3, 0.5, 0.9, 1.0]) | st.floats(0.01, 1.0)
gammas = st.sampled_from([0.1, 5.0, 20.0, 100.0]) | st.floats(0.05, 200.0)
normalizes = st.sampled_from(["lipschitz", "l2", "none"])
costs = st.sampled_from(["euclidean", "sqeuclidean"])
seeds = st.integers(0, 2**31 - 1)


def outside_snap_zone(x, prototypes) -> bool:
    """No feature/prototype pair is close enough for COST_SNAP to zero its cost. The snap radius,
    sqrt(COST_SNAP·(‖x‖² + ‖z‖²)), is not translation invariant, so translation checks need this."""
    return bool((pairwise_costs(x, prototypes, "none", "sqeuclidean") > 0).all())


def pool(x, prototypes, mu, gamma, normalize="lipschitz", cost="euclidean"):
    """(pooled [B, D], attr [B, M], weights [B, N]) from the reference backend."""
    return gsp_pool(
        x,
        prototypes,
        transport_ratio=mu,
        gamma=gamma,
        normalize=normalize,
        cost=cost,
        backend="reference",
        return_weights=True,
    )


@PROPERTY_SETTINGS
@given(shape=shapes, mu=transport_ratios, gamma=gammas, normalize=normalizes, cost=costs, seed=seeds)
def test_weights_and_attr_are_distributions(shape, mu, gamma, normalize, cost, seed):
    x, prototypes = random_inputs(*shape, seed=seed)
    pooled, attr, weights = pool(x, prototypes, mu, gamma, normalize, cost)
    batch = shape[0]
    assert (weights >= 0).all() and (attr >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(batch, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(attr.sum(-1), torch.ones(batch, dtype=torch.float64), rtol=0, atol=1e-10)
    # Each weight is σ_i/(Nμ) <= 1/(Nμ): no feature carries more than its share of the transported mass.
    assert (weights <= 1.0 / (shape[1] * mu) * (1 + 1e-12)).all()
    # pooled is a convex combination of the features: inside their per-coordinate range.
    assert (pooled <= x.amax(1) + 1e-12).all() and (pooled >= x.amin(1) - 1e-12).all()


@PROPERTY_SETTINGS
@given(shape=shapes, mu=transport_ratios, gamma=gammas, normalize=normalizes, cost=costs, seed=seeds)
def test_permuting_features_permutes_weights(shape, mu, gamma, normalize, cost, seed):
    x, prototypes = random_inputs(*shape, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(shape[1], generator=generator)
    pooled, attr, weights = pool(x, prototypes, mu, gamma, normalize, cost)
    pooled_p, attr_p, weights_p = pool(x[:, order], prototypes, mu, gamma, normalize, cost)
    torch.testing.assert_close(weights_p, weights[:, order], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(pooled_p, pooled, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(attr_p, attr, rtol=1e-10, atol=1e-13)


@PROPERTY_SETTINGS
@given(shape=shapes, mu=transport_ratios, gamma=gammas, normalize=normalizes, cost=costs, seed=seeds)
def test_permuting_prototypes_permutes_attr(shape, mu, gamma, normalize, cost, seed):
    x, prototypes = random_inputs(*shape, seed=seed)
    order = torch.randperm(shape[2], generator=torch.Generator().manual_seed(seed))
    pooled, attr, weights = pool(x, prototypes, mu, gamma, normalize, cost)
    pooled_p, attr_p, weights_p = pool(x, prototypes[order], mu, gamma, normalize, cost)
    torch.testing.assert_close(attr_p, attr[:, order], rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(weights_p, weights, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(pooled_p, pooled, rtol=1e-10, atol=1e-13)


@PROPERTY_SETTINGS
@given(shape=shapes, gamma=gammas, normalize=normalizes, cost=costs, seed=seeds)
def test_full_transport_is_mean_pooling(shape, gamma, normalize, cost, seed):
    """mu = 1 transports every feature whole: GAP, with finite gradients through attr too."""
    x, prototypes = random_inputs(*shape, seed=seed)
    x.requires_grad_()
    prototypes.requires_grad_()
    pooled, attr, weights = pool(x, prototypes, 1.0, gamma, normalize, cost)
    assert torch.equal(weights, torch.full_like(weights, 1.0 / shape[1]))
    torch.testing.assert_close(pooled, x.mean(1), rtol=1e-14, atol=1e-15)
    grad_x, grad_z = torch.autograd.grad(pooled.sum() + attr.square().sum(), (x, prototypes))
    assert torch.isfinite(grad_x).all() and torch.isfinite(grad_z).all()


@PROPERTY_SETTINGS
@given(
    shape=shapes,
    mu=transport_ratios,
    gamma=gammas,
    cost=costs,
    seed=seeds,
    factor=st.floats(0.01, 100.0),
    data=st.data(),
)
def test_l2_ignores_feature_norms(shape, mu, gamma, cost, seed, factor, data):
    """normalize="l2": the plan sees directions only; scaling x_i by c > 0 leaves weights and attr
    unchanged and moves pooled by (c − 1) w_i x_i."""
    x, prototypes = random_inputs(*shape, seed=seed)
    b = data.draw(st.integers(0, shape[0] - 1), label="sample")
    i = data.draw(st.integers(0, shape[1] - 1), label="feature")
    pooled, attr, weights = pool(x, prototypes, mu, gamma, "l2", cost)
    scaled = x.clone()
    scaled[b, i] *= factor
    pooled_s, attr_s, weights_s = pool(scaled, prototypes, mu, gamma, "l2", cost)
    torch.testing.assert_close(weights_s, weights, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(attr_s, attr, rtol=1e-9, atol=1e-13)
    expected = pooled.clone()
    expected[b] += (factor - 1.0) * weights[b, i] * x[b, i]
    torch.testing.assert_close(pooled_s, expected, rtol=1e-9, atol=1e-12)
    # ... and the prototypes' norms do not matter either.
    pooled_z, attr_z, weights_z = pool(x, prototypes * factor, mu, gamma, "l2", cost)
    torch.testing.assert_close(weights_z, weights, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(attr_z, attr, rtol=1e-9, atol=1e-13)


@PROPERTY_SETTINGS
@given(shape=shapes, mu=transport_ratios, gamma=gammas, cost=costs, seed=seeds, shift_seed=seeds)
def test_unnormalized_translation_equivariance(shape, mu, gamma, cost, seed, shift_seed):
    """normalize="none": costs depend on differences only, so translating features and prototypes
    together leaves weights and attr unchanged and translates pooled (the weights sum to 1)."""
    x, prototypes = random_inputs(*shape, seed=seed)
    shift = torch.randn(shape[3], generator=torch.Generator().manual_seed(shift_seed), dtype=torch.float64)
    assume(outside_snap_zone(x, prototypes) and outside_snap_zone(x + shift, prototypes + shift))
    pooled, attr, weights = pool(x, prototypes, mu, gamma, "none", cost)
    pooled_t, attr_t, weights_t = pool(x + shift, prototypes + shift, mu, gamma, "none", cost)
    torch.testing.assert_close(weights_t, weights, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(attr_t, attr, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(pooled_t, pooled + shift, rtol=1e-8, atol=1e-11)


@PROPERTY_SETTINGS
@given(shape=shapes, mu=transport_ratios, gamma=st.floats(0.1, 50.0), cost=costs, seed=seeds, scale=st.floats(0.1, 10.0))
def test_unnormalized_scale_and_temperature(shape, mu, gamma, cost, seed, scale):
    """normalize="none": scaling x and prototypes by s multiplies costs by s (euclidean) or s²
    (sqeuclidean); dividing gamma by the same leaves the plan unchanged and scales pooled by s."""
    x, prototypes = random_inputs(*shape, seed=seed)
    gamma_scaled = gamma / (scale if cost == "euclidean" else scale**2)
    pooled, attr, weights = pool(x, prototypes, mu, gamma, "none", cost)
    pooled_s, attr_s, weights_s = pool(x * scale, prototypes * scale, mu, gamma_scaled, "none", cost)
    torch.testing.assert_close(weights_s, weights, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(attr_s, attr, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(pooled_s, pooled * scale, rtol=1e-8, atol=1e-11)


@PROPERTY_SETTINGS
@given(shape=shapes, seed=seeds, gamma=gammas, normalize=normalizes, cost=costs)
def test_more_transport_raises_every_share(shape, seed, gamma, normalize, cost):
    """σ_i = Nμ·w_i, the transported share of feature i, lies in [0, 1] and grows with mu:
    the root u of Σ σ(u + ℓ_i) = μN increases with mu, and σ is monotone."""
    x, prototypes = random_inputs(*shape, seed=seed)
    ratios = [0.1, 0.4, 0.8, 1.0]
    shares = []
    for mu in ratios:
        _, _, weights = pool(x, prototypes, mu, gamma, normalize, cost)
        sigmas = weights * shape[1] * mu  # σ_i: [B, N]
        shares.append(sigmas)
        assert (sigmas <= 1 + 1e-12).all()
    for smaller, larger in zip(shares, shares[1:]):
        assert (larger >= smaller - 1e-12).all(), "σ_i must grow with mu"


@pytest.mark.gpu
@settings(max_examples=15, deadline=None)
@given(shape=shapes, mu=transport_ratios, gamma=gammas, normalize=normalizes, cost=costs, seed=seeds)
def test_gpu_reference_matches_cpu(shape, mu, gamma, normalize, cost, seed):
    x, prototypes = random_inputs(*shape, seed=seed)
    on_cpu = pool(x, prototypes, mu, gamma, normalize, cost)
    on_gpu = pool(x.cuda(), prototypes.cuda(), mu, gamma, normalize, cost)
    for cpu_out, gpu_out in zip(on_cpu, on_gpu):
        torch.testing.assert_close(gpu_out.cpu(), cpu_out, rtol=1e-9, atol=1e-12)
