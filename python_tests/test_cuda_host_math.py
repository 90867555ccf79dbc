"""The CUDA kernels' scalar math (csrc/gsp_math.h), run on the host, against the reference.

Runs without a GPU: `_C` exposes the shared __host__ __device__ helpers whether or not it was
built with CUDA.
"""

import math

import pytest
import torch

from gsp_kernels import contract
from gsp_kernels.backends import native as _build
from gsp_kernels.backends import reference as _reference

_C = _build._C
pytestmark = pytest.mark.skipif(_C is None, reason=f"gsp_kernels._C is not built: {_build.NATIVE_IMPORT_ERROR}")


def _residual64(ell: torch.Tensor, u: float, mu: float) -> float:
    """|Σ σ(u + ℓ) − μN| / (μN) in float64."""
    n = ell.numel()
    return abs(torch.sigmoid(u + ell.double()).sum().item() - mu * n) / (mu * n)


def _ell_cases():
    """(name, ℓ [N] float32): spreads like logsumexp over prototypes at gamma from 0.1 to 1000."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for n in (1, 2, 7, 49, 196, 1023, 1024):
        for spread in (0.01, 1.0, 30.0, 300.0):
            ell = (torch.randn(n, generator=gen, dtype=torch.float64) * spread + 2.0).float()
            cases.append((f"n{n}-s{spread}", ell))
    clustered = torch.cat([torch.full((100,), -50.0), torch.full((96,), 4.0)])  # two clusters, large gap
    cases.append(("two-clusters", clustered))
    cases.append(("all-equal", torch.full((196,), 3.5)))
    return cases


@pytest.mark.parametrize("mu", [0.01, 0.1, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("name,ell", _ell_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_newton_host_matches_reference(name, ell, mu):
    tol = contract.default_tol(torch.float32)
    max_iter = contract.default_max_iter("newton")
    u_host, iterations = _C.newton_solve_host(ell.tolist(), mu, tol, max_iter)
    u_ref = _reference.solve_newton(ell.unsqueeze(0), mu, tol, max_iter).item()
    assert math.isfinite(u_host)
    assert 1 <= iterations <= max_iter
    # Both solve in float32 with sums in different orders. Where the root is well conditioned
    # (slope Σσ(1 − σ) not vanishing) they agree to float32 accuracy; where every σ saturates,
    # a whole interval meets the tolerance and only the residual is compared.
    sig = torch.sigmoid(u_ref + ell.double())
    if (sig * (1.0 - sig)).sum().item() >= 1e-2 * ell.numel():
        assert abs(u_host - u_ref) <= 2e-4 * max(1.0, abs(u_ref)), (u_host, u_ref)
    # The residual in float64 is as small as the reference's (float32 rounding of the sums aside).
    assert _residual64(ell, u_host, mu) <= max(1e-5, 2.0 * _residual64(ell, u_ref, mu))


def test_newton_host_matches_float64_root():
    ell = (torch.randn(196, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3.0).float()
    for mu in (0.05, 0.3, 0.7):
        u_host, _ = _C.newton_solve_host(ell.tolist(), mu, 1e-6, 64)
        u_64 = _reference.solve_newton(ell.double().unsqueeze(0), mu, 1e-13, 64).item()
        assert abs(u_host - u_64) <= 1e-4 * max(1.0, abs(u_64))


def test_newton_host_gap_is_exact():
    u, iterations = _C.newton_solve_host([0.3, -2.0, 7.0], 1.0, 1e-6, 64)
    assert u == math.inf and iterations == 0
    assert _C.sigmoid_host(u + 0.3) == 1.0


def test_newton_host_nonfinite_stops():
    u, iterations = _C.newton_solve_host([0.0, float("nan"), 1.0], 0.3, 1e-6, 64)
    assert math.isnan(u) and iterations <= 64


def test_newton_host_respects_max_iter():
    ell = (torch.randn(196, generator=torch.Generator().manual_seed(4)) * 300.0).tolist()
    _, iterations = _C.newton_solve_host(ell, 0.9, 1e-30, 3)
    assert iterations == 3


def test_newton_host_rejects_bad_arguments():
    with pytest.raises(ValueError):
        _C.newton_solve_host([], 0.3, 1e-6, 64)
    with pytest.raises(ValueError):
        _C.newton_solve_host([0.0], 1.5, 1e-6, 64)


def test_sigmoid_host_matches_torch():
    t = torch.cat([torch.linspace(-120.0, 120.0, 2001), torch.tensor([0.0, -0.0, 88.7, -88.7, 1e-8])])
    host = torch.tensor([_C.sigmoid_host(v) for v in t.tolist()])
    ref = torch.sigmoid(t.double())
    assert torch.isfinite(host).all()
    assert ((host.double() - ref).abs() <= 2e-7 * ref + 1e-38).all()
    assert _C.sigmoid_host(float("inf")) == 1.0 and _C.sigmoid_host(float("-inf")) == 0.0


def test_cost_host_matches_reference_snap():
    gen = torch.Generator().manual_seed(5)
    xh = torch.nn.functional.normalize(torch.randn(64, 33, generator=gen), dim=-1) * 0.9
    zh = torch.cat([xh[:3], torch.randn(5, 33, generator=gen) * 0.2])  # three exact matches
    sq_ref = _reference.squared_costs(xh.unsqueeze(0), zh)[0]  # [64, 8]
    xx, zz, dots = (xh * xh).sum(-1), (zh * zh).sum(-1), xh @ zh.t()
    for cost in contract.COST_MODES:
        ref = _reference.costs_from_squared(sq_ref, cost)
        host = torch.tensor(
            [[_C.cost_host(xx[i].item(), zz[k].item(), dots[i, k].item(), cost) for k in range(8)] for i in range(64)]
        )
        assert (host[torch.arange(3), torch.arange(3)] == 0).all()  # exact matches cost exactly 0
        assert ((host == 0) == (ref == 0)).all()
        assert torch.allclose(host, ref, rtol=1e-4, atol=1e-6)
