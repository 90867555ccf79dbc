"""The paper's algorithm (`gsp_kernels.bench.paper.paper_gsp`): its implicit backward, and parity with the reference."""

import pytest
import torch

from gsp_kernels import gsp_pool
from gsp_kernels.bench.paper import (
    LipschitzNormalize,
    PartialTransportPlan,
    fixed_point_scale,
    paper_gsp,
    transport_plan,
)
from gsp_kernels.testing import rel_err

CONVERGED = 1000  # fixed-point steps: converged to float64 round-off for these problems


def make_problem(batch=3, n=37, d=19, m=11, scale=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(batch, n, d, generator=generator, dtype=torch.float64)).requires_grad_()
    prototypes = (scale * torch.randn(m, d, generator=generator, dtype=torch.float64)).requires_grad_()
    grad_pooled = torch.randn(batch, d, generator=generator, dtype=torch.float64)
    grad_attr = torch.randn(batch, m, generator=generator, dtype=torch.float64)
    return x, prototypes, grad_pooled, grad_attr


def unrolled_gsp(x, prototypes, transport_ratio, gamma, iterations):
    """The same algorithm with autograd through every fixed-point step (no implicit backward)."""
    n = x.shape[1]
    features = LipschitzNormalize.apply(x)
    anchors = LipschitzNormalize.apply(prototypes)
    kernel = torch.exp(-gamma * torch.cdist(anchors.unsqueeze(0).expand(x.shape[0], -1, -1), features))
    plan = transport_plan(kernel, fixed_point_scale(kernel, transport_ratio, iterations))
    pooled = torch.bmm(((1.0 - n * plan[:, 0]) / transport_ratio).unsqueeze(1), x).squeeze(1) / n
    return pooled, plan[:, 1:].sum(-1) / transport_ratio


def grads_of(fn, x, prototypes, grad_pooled, grad_attr):
    pooled, attr = fn(x, prototypes)
    grad_x, grad_z = torch.autograd.grad((pooled * grad_pooled).sum() + (attr * grad_attr).sum(), (x, prototypes))
    return pooled, attr, grad_x, grad_z


@pytest.mark.parametrize("transport_ratio,gamma", [(0.3, 4.0), (0.5, 1.0), (0.1, 10.0)])
def test_implicit_backward_matches_unrolled_autograd(transport_ratio, gamma):
    x, prototypes, grad_pooled, grad_attr = make_problem()
    implicit = grads_of(lambda a, b: paper_gsp(a, b, transport_ratio, gamma, CONVERGED), x, prototypes, grad_pooled, grad_attr)
    unrolled = grads_of(lambda a, b: unrolled_gsp(a, b, transport_ratio, gamma, CONVERGED), x, prototypes, grad_pooled, grad_attr)
    for ours, oracle in zip(implicit, unrolled):
        assert rel_err(ours, oracle) < 1e-10


def test_transport_plan_gradcheck():
    kernel = torch.rand(2, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: PartialTransportPlan.apply(k, 0.3, CONVERGED), (kernel,))


def test_lipschitz_normalize_gradcheck():
    # Rows on both sides of the unit sphere.
    v = torch.randn(6, 4, dtype=torch.float64) * torch.tensor([[0.1], [0.5], [0.9], [1.5], [3.0], [10.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(LipschitzNormalize.apply, (v.requires_grad_(),))


@pytest.mark.parametrize("gamma", [0.5, 3.0, 8.0])
def test_converged_paper_equals_reference(gamma):
    x, prototypes, grad_pooled, grad_attr = make_problem(batch=2, n=23, d=33, m=7, scale=0.4, seed=1)
    paper = grads_of(lambda a, b: paper_gsp(a, b, 0.3, gamma, CONVERGED), x, prototypes, grad_pooled, grad_attr)
    reference = grads_of(
        lambda a, b: gsp_pool(a, b, transport_ratio=0.3, gamma=gamma, backend="reference"),
        x, prototypes, grad_pooled, grad_attr,
    )
    for ours, oracle in zip(paper, reference):
        assert rel_err(ours, oracle) < 1e-10


def test_paper_default_iterations_is_close_for_usual_settings():
    """100 steps (the paper's default) have converged for mu=0.3 and a moderate gamma."""
    x, prototypes, _, _ = make_problem(seed=2)
    pooled, attr = paper_gsp(x, prototypes, 0.3, 5.0)
    ref_pooled, ref_attr = gsp_pool(x, prototypes, transport_ratio=0.3, gamma=5.0, backend="reference")
    assert rel_err(pooled, ref_pooled) < 1e-6
    assert rel_err(attr, ref_attr) < 1e-6
