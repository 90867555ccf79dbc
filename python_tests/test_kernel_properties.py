"""Kernel backends on random shapes and parameters (hypothesis): every output and gradient
within the float32 tolerance (docs/math.md, Accuracy) of the float64 reference, or, where
float32 itself is ill-conditioned (features clustered near prototypes, large gamma), within a fixed multiple of
the float32 reference's own error on the same inputs (an error ratio against an upcast
reference, as flash-attention tests its kernels). Triton runs through its interpreter on the
CPU; the CUDA backend only where a GPU is."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_triton import OUTPUT_NAMES, SMALL_TILES, outputs_and_grads

from gsp_kernels import available_backends
from gsp_kernels.backends import triton as _triton
from gsp_kernels.backends.triton import launch as triton_launch
from gsp_kernels.testing import random_inputs

FLOAT32_TOL = 1e-5  # docs/math.md, Accuracy: float32 with IEEE products
# A kernel may lose this many times the float32 reference's error: both round the same
# cancellation-prone costs (|x̂|² + |ẑ|² − 2 x̂·ẑ), in different orders; 3xTF32 products drop
# the lo·lo term (~2⁻²¹ per product against float32's 2⁻²⁴). The interpreter computes both exactly.
ERROR_RATIO = {"ieee": 10.0, "tf32x3": 32.0}
precisions = st.sampled_from(tuple(ERROR_RATIO))

shapes = st.tuples(
    st.integers(1, 3),  # B
    st.integers(1, 37),  # N
    st.integers(1, 19),  # M
    st.integers(1, 35),  # D
)
parameters = st.fixed_dictionaries(
    {
        "transport_ratio": st.sampled_from([0.05, 0.3, 0.9, 1.0]) | st.floats(0.02, 1.0),
        "gamma": st.sampled_from([0.1, 5.0, 20.0, 100.0]) | st.floats(0.05, 100.0),
        "normalize": st.sampled_from(["lipschitz", "l2", "none"]),
        "cost": st.sampled_from(["euclidean", "sqeuclidean"]),
    }
)
# What check_backend takes, for every backend's test.
EXAMPLES = dict(
    shape=shapes,
    params=parameters,
    precision=precisions,
    seed=st.integers(0, 2**31 - 1),
    near_fraction=st.sampled_from([0.0, 0.3, 1.0]),
)


def error_norms(outputs, reference) -> list[float]:
    """‖out − ref‖ per output in float64; inf where out is not finite."""
    errors = []
    for out, ref in zip(outputs, reference):
        out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
        errors.append((out64 - ref64).norm().item() if torch.isfinite(out64).all() else float("inf"))
    return errors


def check_backend(backend: str, device: str, shape, params, precision: str, seed: int, near_fraction: float) -> None:
    """‖out − ref‖ ≤ max(FLOAT32_TOL, ERROR_RATIO · float32 reference's relative error) · ‖ref‖
    + floor. The gradients' floor is FLOAT32_TOL times the larger gradient norm: a gradient that
    is exactly zero in exact arithmetic (e.g. the prototypes' when one feature takes all the
    weight) is float32 noise of terms of that size, not a relative quantity."""
    x64, prototypes64 = random_inputs(*shape, seed=seed, near_fraction=near_fraction)
    x, prototypes = x64.float().to(device), prototypes64.float().to(device)
    got = outputs_and_grads(x, prototypes, backend, precision=precision, **params)
    float32_ref = outputs_and_grads(x, prototypes, "reference", **params)
    exact = outputs_and_grads(x.double(), prototypes.double(), "reference", cotangent_dtype=torch.float32, **params)
    norms = [ref.detach().double().norm().item() for ref in exact]
    gradient_scale = max(norms[3], norms[4])  # grad_x, grad_prototypes
    for index, (name, err, ref_err, norm) in enumerate(
        zip(OUTPUT_NAMES, error_norms(got, exact), error_norms(float32_ref, exact), norms)
    ):
        floor = FLOAT32_TOL * gradient_scale if index >= 3 else 0.0
        bound = max(FLOAT32_TOL, ERROR_RATIO[precision] * ref_err / max(norm, 1e-300)) * norm + floor
        assert err <= bound, f"{backend} {precision} {name}: error {err:.2e} > {bound:.2e} (norm {norm:.2e}, float32 reference's error {ref_err:.2e})"


# derandomize: CI sees the same 25 examples every run (a tolerance test must not flake);
# explore further by raising max_examples or dropping derandomize locally.
@settings(max_examples=25, deadline=None, derandomize=True)
@given(**EXAMPLES, small_tiles=st.booleans(), strategy=st.sampled_from(_triton.STRATEGIES))
def test_triton_matches_reference(shape, params, precision, seed, near_fraction, small_tiles, strategy):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if "triton" not in available_backends(device):
        pytest.skip("triton is not available here")
    previous = triton_launch.BLOCK_OVERRIDE
    triton_launch.BLOCK_OVERRIDE = SMALL_TILES if small_tiles else None  # several tiles along N, M and D
    try:
        with _triton.use_strategy(strategy):
            check_backend("triton", device, shape, params, precision, seed, near_fraction)
    finally:
        triton_launch.BLOCK_OVERRIDE = previous


@pytest.mark.gpu
@settings(max_examples=40, deadline=None, derandomize=True)
@given(**EXAMPLES)
def test_cuda_matches_reference(shape, params, precision, seed, near_fraction):
    if "cuda" not in available_backends("cuda"):
        pytest.skip("the CUDA backend is not built")
    check_backend("cuda", "cuda", shape, params, precision, seed, near_fraction)


@pytest.mark.parametrize("strategy", _triton.STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", ["lipschitz", "l2"])
def test_triton_rows_of_norm_1e30(strategy, dtype, normalize):
    """Rows of norm ~1e30, far past √max (1.8e19), where a plain float32 sum of squares is inf:
    normalized, the features are the prototypes' directions e0, e1, so the costs are 0 and √2 by
    hand; at μ = 1 pooled is the mean of the features, weights 1/2 and attr 1/2 (the two features
    mirror each other). At μ = 0.3 with random rows of that size too, every output and gradient
    matches the float64 reference within the dtype's tolerance (docs/math.md, Accuracy)."""
    if "triton" not in available_backends("cpu"):
        pytest.skip("triton is not available here")
    x = torch.tensor([[[1e30, 0.0, 0.0], [0.0, 1e30, 0.0]]], dtype=torch.float64)  # [1, 2, 3]
    prototypes = torch.tensor([[3e30, 0.0, 0.0], [0.0, 2e29, 0.0]], dtype=torch.float64)  # [2, 3]
    x, prototypes = x.to(dtype), prototypes.to(dtype)
    options = {"transport_ratio": 1.0, "gamma": 5.0, "normalize": normalize}
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with _triton.use_strategy(strategy):
        got = outputs_and_grads(x, prototypes, "triton", **options)
        pooled, attr, weights = got[:3]
        torch.testing.assert_close(pooled.double(), x.double().mean(1), rtol=tol, atol=0.0)
        torch.testing.assert_close(weights.double(), torch.full((1, 2), 0.5, dtype=torch.float64), rtol=tol, atol=0.0)
        torch.testing.assert_close(attr.double(), torch.full((1, 2), 0.5, dtype=torch.float64), rtol=tol, atol=0.0)
        generator = torch.Generator().manual_seed(3)
        x = (torch.randn(2, 5, 7, generator=generator, dtype=torch.float64) * 1e30).to(dtype)
        prototypes = (torch.randn(3, 7, generator=generator, dtype=torch.float64) * 1e30).to(dtype)
        prototypes[0] *= 1e-30  # one prototype of ordinary length next to the long ones
        for case in (options, {**options, "transport_ratio": 0.3}):
            got = outputs_and_grads(x, prototypes, "triton", **case)
            want = outputs_and_grads(x.double(), prototypes.double(), "reference", cotangent_dtype=dtype, **case)
            gradient_scale = max(want[3].norm().item(), want[4].norm().item())
            for index, (name, out, ref) in enumerate(zip(OUTPUT_NAMES, got, want)):
                assert torch.isfinite(out).all(), name
                error, norm = (out.double() - ref).norm().item(), ref.norm().item()
                floor = tol * gradient_scale if index >= 3 else 0.0
                assert error <= tol * norm + floor, f"{name}: error {error:.3e} vs norm {norm:.3e}"
