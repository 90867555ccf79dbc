"""solver="unrolled": the bracketed log-Newton of solver="newton", run exactly max_iter times with no
data-dependent control flow (docs/math.md, The scalar solve), against the float64 reference: a
solve with a closed form (one feature, equal features, μ = 1), awkward sizes, tiny μ, μ near 1 and
γ at its accepted maximum within the float32 tolerance of docs/math.md, Accuracy, at the default
step count; a trace of the solve as plain tensor operations; and the kernel backends, which run
their own Newton for it."""

import math
from types import SimpleNamespace

import pytest
import torch

from gsp_kernels import backends, contract, gsp_pool
from gsp_kernels.backends import reference
from gsp_kernels.nn import GSP
from gsp_kernels.testing import random_inputs, rel_err, tolerance

pytestmark = pytest.mark.usefixtures("single_thread")

FLOAT32_EPS = torch.finfo(torch.float32).eps
# γ at the largest check_options accepts in float32: eps·γ·c_max = LOGIT_RESOLUTION (c_max = 2)
LARGEST_GAMMA = contract.LOGIT_RESOLUTION / (FLOAT32_EPS * 2.0) * (1 - 1e-6)
SMALLEST_MU = 1.2e-38  # just above float32's smallest normal, the smallest μ accepted


def outputs(x, prototypes, **options):
    """pooled, attr, weights and both gradients (a fixed cotangent) of one reference call."""
    x = x.detach().requires_grad_()
    prototypes = prototypes.detach().requires_grad_()
    pooled, attr, weights = gsp_pool(x, prototypes, backend="reference", return_weights=True, **options)
    generator = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype) for t in (pooled, attr, weights)]
    torch.autograd.backward((pooled, attr, weights), cotangents)
    return pooled, attr, weights, x.grad, prototypes.grad


def largest_error(outs, refs) -> float:
    return max(rel_err(out, ref, zero_ref="absolute") for out, ref in zip(outs, refs))


def test_the_default_step_count_is_the_documented_one():
    assert contract.default_max_iter("unrolled") == contract.UNROLLED_STEPS
    options = contract.check_options(0.3, 5.0, solver="unrolled")
    assert (options.solver, options.max_iter) == ("unrolled", contract.UNROLLED_STEPS)
    layer = GSP(5, 6, num_prototypes=3, solver="unrolled")
    assert "solver='unrolled'" in repr(layer)


@pytest.mark.parametrize("mu", [SMALLEST_MU, 1e-3, 0.3, 0.999999])
def test_one_feature_solves_in_closed_form(mu):
    """N = 1: σ(u + ℓ) = μ gives u = logit μ − ℓ, and the one weight is 1."""
    ell = torch.tensor([[-3.25], [0.5], [17.0]], dtype=torch.float64)  # [B, 1]
    u = reference.solve_unrolled(ell, mu, 1e-13, contract.UNROLLED_STEPS)
    expected = math.log(mu) - math.log1p(-mu) - ell[:, 0]
    torch.testing.assert_close(u, expected, rtol=1e-14, atol=0.0)


def test_equal_features_share_the_mass_equally():
    """Every feature alike: σ_i = μ for all i, so every weight is 1/N, at any γ."""
    x = torch.full((2, 13, 5), 0.2, dtype=torch.float64)
    prototypes = random_inputs(1, 1, 7, 5, seed=3)[1]
    for gamma in (0.5, 1e3):
        _, _, weights = gsp_pool(x, prototypes, transport_ratio=0.37, gamma=gamma, solver="unrolled", return_weights=True)
        torch.testing.assert_close(weights, torch.full_like(weights, 1 / 13), rtol=1e-12, atol=0.0)


def test_transport_ratio_one_is_exactly_the_average():
    x, prototypes = random_inputs(3, 7, 5, 4, seed=0)
    pooled, attr, weights, grad_x, grad_z = outputs(x, prototypes, transport_ratio=1.0, gamma=20.0, solver="unrolled")
    assert torch.equal(weights, torch.full_like(weights, 1 / 7))
    torch.testing.assert_close(pooled, x.mean(1), rtol=1e-14, atol=1e-15)
    assert all(bool(torch.isfinite(t).all()) for t in (attr, grad_x, grad_z))


# (N, near fraction, μ, γ, normalize, cost): primes and N = 1, Gaussian and clustered features, μ from the
# smallest accepted to 1 − 1e-9, γ up to its accepted maximum.
HARD_CASES = [
    (1, 0.0, 0.3, 5.0, "lipschitz", "euclidean"),
    (2, 0.5, SMALLEST_MU, LARGEST_GAMMA, "lipschitz", "euclidean"),
    (13, 1.0, SMALLEST_MU, 5.0, "lipschitz", "euclidean"),
    (13, 0.5, 1 - 1e-9, LARGEST_GAMMA, "l2", "euclidean"),
    (31, 0.1, 1e-3, LARGEST_GAMMA, "lipschitz", "euclidean"),
    (31, 0.5, 0.999999, 1e5, "lipschitz", "sqeuclidean"),
    (97, 1.0, 0.3, 1e3, "l2", "sqeuclidean"),
    (97, 0.0, 0.05, 0.01, "none", "euclidean"),
    (211, 0.5, 0.9, 1e4, "lipschitz", "euclidean"),
]


@pytest.mark.parametrize("n, near, mu, gamma, normalize, cost", HARD_CASES)
def test_float32_meets_the_tolerance_at_the_default_steps(n, near, mu, gamma, normalize, cost):
    """The float32 unrolled solve against the float64 reference on the same rounded inputs: within the
    γ-scaled float32 tolerance, or within what the converged float32 Newton itself loses there; and
    it has converged: within 1e-5 of that Newton."""
    x64, z64 = random_inputs(3, n, 11, 7, seed=n, near_fraction=near)
    x, prototypes = x64.float(), z64.float()
    options = {"transport_ratio": mu, "gamma": gamma, "normalize": normalize, "cost": cost}
    want = outputs(x.double(), prototypes.double(), **options)
    newton = outputs(x, prototypes, **options)
    unrolled = outputs(x, prototypes, solver="unrolled", **options)
    assert largest_error(unrolled, want) <= max(tolerance("float32", "auto", gamma), largest_error(newton, want))
    assert largest_error(unrolled, newton) <= 1e-5


@pytest.mark.parametrize("mu, gamma", [(1e-30, 5.0), (0.3, 20.0), (0.99, 1e3)])
def test_float64_matches_the_converged_newton(mu, gamma):
    x, prototypes = random_inputs(2, 23, 5, 9, seed=7, near_fraction=0.5)
    options = {"transport_ratio": mu, "gamma": gamma}
    assert largest_error(outputs(x, prototypes, solver="unrolled", **options), outputs(x, prototypes, **options)) <= 1e-9


def test_max_iter_is_the_exact_step_count():
    """Fewer steps leave the solve unconverged (the count is no cap that a test ends early)."""
    x, prototypes = random_inputs(2, 31, 5, 9, seed=2, near_fraction=0.5)
    options = {"transport_ratio": 1e-3, "gamma": 1e4, "return_weights": True}
    _, _, one_step = gsp_pool(x, prototypes, solver="unrolled", max_iter=1, **options)
    _, _, converged = gsp_pool(x, prototypes, **options)
    assert rel_err(one_step, converged) > 1e-3


def test_the_solve_traces_to_tensor_operations_with_a_dynamic_batch():
    """torch.export records the unrolled solve, one sigmoid per step, for any batch size."""

    class Solve(torch.nn.Module):
        def __init__(self, solve):
            super().__init__()
            self.solve = solve

        def forward(self, ell):
            return self.solve(ell, 0.3, 1e-6, 5)

    ell = torch.randn(4, 9)
    batch = torch.export.Dim("batch")
    program = torch.export.export(Solve(reference.solve_unrolled), (ell,), dynamic_shapes={"ell": {0: batch}}, strict=False)
    sigmoids = [node for node in program.graph.nodes if node.target == torch.ops.aten.sigmoid.default]
    assert len(sigmoids) == 5
    for size in (1, 6):
        ell = torch.randn(size, 9)
        torch.testing.assert_close(program.module()(ell), reference.solve_unrolled(ell, 0.3, 1e-6, 5))


def test_kernel_backends_run_their_newton_for_it(monkeypatch):
    """A kernel backend is handed solver="newton" (its own, capped at the same steps), the reference
    "unrolled"."""
    seen = []

    def forward(x, prototypes, options):
        seen.append(options)
        return reference.forward(x, prototypes, options)

    stand_in = SimpleNamespace(availability=lambda device: None, unsupported=lambda x, prototypes, options: None,
                               forward=forward, backward=reference.backward)
    monkeypatch.setitem(backends._loaded, "triton", stand_in)
    x, prototypes = random_inputs(2, 9, 5, 4, seed=0, dtype=torch.float32)
    kernel = gsp_pool(x, prototypes, solver="unrolled", backend="triton")
    assert (seen[-1].solver, seen[-1].max_iter) == ("newton", contract.UNROLLED_STEPS)
    unrolled = gsp_pool(x, prototypes, solver="unrolled", backend="reference")
    for got, want in zip(kernel, unrolled):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernels_match_the_reference(backend):
    if backend not in backends.available_backends("cuda"):
        pytest.skip(f"{backend} is not available here")
    x, prototypes = random_inputs(3, 49, 16, 24, seed=5, near_fraction=0.5, dtype=torch.float32)
    want = outputs(x.double(), prototypes.double(), transport_ratio=0.05, gamma=20.0)
    x, prototypes = x.cuda().requires_grad_(), prototypes.cuda().requires_grad_()
    pooled, attr, weights = gsp_pool(x, prototypes, transport_ratio=0.05, gamma=20.0, solver="unrolled", backend=backend,
                                     return_weights=True)
    for got, ref in zip((pooled, attr, weights), want):
        assert rel_err(got.cpu(), ref) <= tolerance("float32", "auto", 20.0)
