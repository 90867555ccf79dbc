"""Every input gsp_pool accepts gives the right answer in every backend that runs here, or a
ValueError at the call (docs/math.md, Dtypes and their limits): hypothesis over shapes, dtypes,
the scales of the features and of the prototypes across the dtype's range, and the whole range of
μ and γ. "Right" is the accuracy contract (docs/math.md, Accuracy): within its tolerance of the
float64 reference on the same rounded inputs, finite, and weights summing to 1 within the bound of
the same page."""

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gsp_kernels import available_backends, contract, gsp_pool
from gsp_kernels.testing import random_inputs, rel_err, tolerance

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = available_backends(DEVICE)
NAMES = ("pooled", "attr", "weights", "grad_x", "grad_prototypes")
# A kernel may lose this many times what the float32 reference loses on the same inputs
# (python_tests/test_kernel_properties.py's ieee ratio, docs/math.md, Accuracy).
KERNEL_ERROR_RATIO = 10.0
# The float32 reference against float64: gross errors (a lost overflow, weights summing to 3, NaN are
# all O(1)), beyond any conditioning of the inputs: at least REFERENCE_BOUND, and REFERENCE_MARGIN
# times the γ-scaled tolerance, since near a prototype a euclidean cost is the root of a rounded
# square and its error grows faster than the linear γ scaling of the contract's cases.
REFERENCE_BOUND = 1e-3
REFERENCE_MARGIN = 4.0
# Rows scaled below this keep their squared costs above float32's smallest normal (docs/math.md).
SMALLEST_SCALE = 2.0**-24


def smallest_scale(dtype: torch.dtype) -> float:
    """The smallest power of two the random rows are scaled by: SMALLEST_SCALE, and their elements
    and outputs normal numbers of the dtype (float16's normal range starts at 2^-14)."""
    return max(SMALLEST_SCALE, torch.finfo(dtype).tiny * 2.0**12)


def largest_scale(dtype: torch.dtype, normalize: str, d: int) -> float:
    """The largest power of two the random rows (norms up to 3) may be scaled by: their norms within
    the dtype's range (with normalization) or within √(max/4) (without)."""
    limit = torch.finfo(dtype).max / (4 * math.sqrt(d))
    if normalize == "none":
        compute = contract.compute_dtype(torch.empty(0, dtype=dtype))
        limit = min(limit, math.sqrt(torch.finfo(compute).max / 4) / (4 * math.sqrt(d)))
    return 2.0 ** math.floor(math.log2(limit))


@st.composite
def cases(draw):
    backend = draw(st.sampled_from(BACKENDS))
    dtypes = [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if backend == "reference" else [])
    dtype = draw(st.sampled_from(dtypes))
    batch, n, m, d = draw(st.integers(1, 2)), draw(st.integers(1, 13)), draw(st.integers(1, 7)), draw(st.integers(1, 11))
    normalize = draw(st.sampled_from(contract.NORMALIZE_MODES))
    cost = draw(st.sampled_from(contract.COST_MODES))
    top = math.log2(largest_scale(dtype, normalize, d))
    exponent = st.integers(int(math.log2(smallest_scale(dtype))), int(top))
    scale_x, scale_z = 2.0 ** draw(exponent), 2.0 ** draw(exponent)
    tiny = torch.finfo(contract.compute_dtype(torch.empty(0, dtype=dtype))).tiny
    mu = draw(st.sampled_from([1.0, 0.3]) | st.floats(math.log10(tiny), 0.0).map(lambda e: min(1.0, 10.0**e)))
    gamma = draw(st.sampled_from([5.0, 20.0, 1e39]) | st.floats(-3.0, 16.0).map(lambda e: 10.0**e))
    seed = draw(st.integers(0, 2**31 - 1))
    near = draw(st.sampled_from([0.0, 0.5]))
    return backend, dtype, (batch, n, m, d), normalize, cost, scale_x, scale_z, mu, gamma, seed, near


def data_cost(x, prototypes, cost: str) -> float:
    """The largest cost between these (unnormalized) rows, in float64."""
    distances = torch.cdist(x.double().reshape(-1, x.shape[-1]), prototypes.double())
    return distances.max().item() ** (1 if cost == "euclidean" else 2)


def beyond_the_data_bound(largest: float, gamma: float, n: int, compute: torch.dtype) -> bool:
    """Whether γ and these rows' largest cost pass the bounds the check takes for normalized rows
    (half the range over N features, the logits' resolution), here set by the data."""
    limits = torch.finfo(compute)
    return gamma * largest * n > limits.max / 2 or limits.eps * gamma * largest > contract.LOGIT_RESOLUTION


def outputs_and_grads(x, prototypes, cotangents, **options):
    x = x.detach().requires_grad_()
    prototypes = prototypes.detach().requires_grad_()
    pooled, attr, weights = gsp_pool(x, prototypes, return_weights=True, **options)
    torch.autograd.backward((pooled, attr, weights), [c.to(x.dtype) for c in cotangents])
    return pooled, attr, weights, x.grad, prototypes.grad


def weights_sum_bound(dtype: torch.dtype, c_max: float, gamma: float) -> float:
    """|Σw − 1| allowed: the Newton tolerance and the weights' rounding to the output dtype, plus the
    logits' rounding eps·γ·c_max (at most LOGIT_RESOLUTION for an accepted γ)."""
    compute = contract.compute_dtype(torch.empty(0, dtype=dtype))
    return 10 * contract.default_tol(compute) + 2 * torch.finfo(dtype).eps + 2 * torch.finfo(compute).eps * gamma * c_max


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_accepted_inputs_give_the_right_answer(case):
    backend, dtype, (batch, n, m, d), normalize, cost, scale_x, scale_z, mu, gamma, seed, near = case
    x64, z64 = random_inputs(batch, n, m, d, seed=seed, near_fraction=near)
    x, prototypes = (x64 * scale_x).to(DEVICE, dtype), (z64 * scale_z).to(DEVICE, dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    cotangents = [torch.randn(shape, generator=generator, dtype=torch.float64).to(DEVICE)
                  for shape in ((batch, d), (batch, m), (batch, n))]
    options = {"transport_ratio": mu, "gamma": gamma, "normalize": normalize, "cost": cost}
    compute = contract.compute_dtype(x, prototypes)
    try:
        contract.check_options(mu, gamma, normalize, cost, n=n, dtype=compute)
    except ValueError as refused:
        with pytest.raises(ValueError, match=re.escape(str(refused))):
            gsp_pool(x, prototypes, backend=backend, **options)
        return
    c_max = contract.largest_cost(normalize, cost) or data_cost(x, prototypes, cost)
    if normalize == "none" and beyond_the_data_bound(c_max, gamma, n, compute):
        return  # without normalization the data's costs set the bound, which is not checked (docs/math.md)
    got = outputs_and_grads(x, prototypes, cotangents, backend=backend, **options)
    want = outputs_and_grads(x.double(), prototypes.double(), cotangents, backend="reference", **options)
    # The kernels are held to a multiple of what the reference loses in their compute dtype on the
    # same inputs (ill-conditioned ones: l2 rows far shorter than 1, features within the snap
    # radius of a prototype); the reference, to a bound that catches what no rounding explains.
    own = want if compute == torch.float64 else outputs_and_grads(x, prototypes, cotangents, backend="reference", **options)
    tol = tolerance(contract.DTYPE_NAMES[dtype], "auto", gamma * max(c_max, 2.0) / 2)  # γ·c: the logits' scale
    gradient_scale = max(1.0, *(r.double().norm().item() for r in want[3:]))
    for name, out, ref, ref_own in zip(NAMES, got, want, own):
        assert torch.isfinite(out).all(), name
        error, norm = (out.double() - ref.double()).norm().item(), ref.double().norm().item()
        floor = tol * gradient_scale if name.startswith("grad") else 0.0
        if backend == "reference":
            bound = max(REFERENCE_MARGIN * tol, REFERENCE_BOUND) * norm + floor
        else:
            bound = max(tol * norm, KERNEL_ERROR_RATIO * (ref_own.double() - ref.double()).norm().item()) + floor
        assert error <= bound, f"{name}: error {error:.3e} ({rel_err(out, ref, zero_ref='inf'):.3e} relative) > {bound:.3e}"
    deviation = (got[2].double().sum(-1) - 1).abs().max().item()
    assert deviation <= weights_sum_bound(dtype, c_max, gamma), deviation
