"""Backend registry: `auto`'s choice on a GPU, fallbacks, and the reasons it reports.

The GPU cases use stand-in backend modules (the registry only asks them `availability` and
`unsupported`), so the ordering is tested on any machine.
"""

from types import SimpleNamespace

import pytest
import torch

from gsp_kernels import backends
from gsp_kernels.contract import GSPOptions


def stand_in(unsupported_reason=None, unavailable_reason=None):
    """A backend module that runs anywhere, or declines with the given reasons."""
    return SimpleNamespace(
        availability=lambda device: unavailable_reason,
        unsupported=lambda x, prototypes, options: unsupported_reason,
    )


@pytest.fixture
def kernels_everywhere(monkeypatch):
    """Both kernel backends available and willing: the registry's order alone decides."""
    monkeypatch.setitem(backends._loaded, "cuda", stand_in())
    monkeypatch.setitem(backends._loaded, "triton", stand_in())


def gpu_features(dtype):
    return SimpleNamespace(device=torch.device("cuda"), dtype=dtype)


def resolve(x, name="auto", solver="newton"):
    prototypes = SimpleNamespace(device=x.device, dtype=torch.float32)
    return backends.resolve_backend(name, x, prototypes, GSPOptions(0.3, 5.0, solver=solver))


@pytest.mark.parametrize(
    "dtype, expected",
    [(torch.float32, "cuda"), (torch.bfloat16, "triton"), (torch.float16, "triton")],
)
def test_auto_takes_the_backend_measured_fastest_for_the_dtype(kernels_everywhere, dtype, expected):
    assert resolve(gpu_features(dtype)) == expected


def test_auto_skips_a_backend_that_declines_the_call(monkeypatch):
    monkeypatch.setitem(backends._loaded, "cuda", stand_in(unsupported_reason="fixed_point not implemented"))
    monkeypatch.setitem(backends._loaded, "triton", stand_in())
    assert resolve(gpu_features(torch.float32)) == "triton"


def test_auto_falls_back_to_the_reference_when_no_kernel_applies(monkeypatch):
    monkeypatch.setitem(backends._loaded, "cuda", stand_in(unavailable_reason="not built with CUDA"))
    monkeypatch.setitem(backends._loaded, "triton", "import failed: no triton")
    assert resolve(gpu_features(torch.bfloat16)) == "reference"


def test_auto_on_the_cpu_is_the_reference(kernels_everywhere):
    x = torch.zeros(1, 1, 1)
    assert resolve(x) == "reference"


def test_a_backend_named_explicitly_must_apply_and_says_why(monkeypatch):
    monkeypatch.setitem(backends._loaded, "cuda", stand_in(unsupported_reason="float64 is not supported"))
    with pytest.raises(ValueError, match="float64 is not supported"):
        resolve(gpu_features(torch.float64), name="cuda")
    monkeypatch.setitem(backends._loaded, "triton", "import failed: no triton")
    with pytest.raises(ValueError, match="no triton"):
        resolve(gpu_features(torch.float32), name="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve(gpu_features(torch.float32), name="fastest")


def test_backend_status_gives_a_reason_for_every_unavailable_backend():
    statuses = backends.backend_status("cpu")
    assert set(statuses) == set(backends.BACKENDS)
    assert statuses["reference"].available
    for status in statuses.values():
        assert status.available or status.reason not in ("", "available")
    assert backends.available_backends("cpu")[-1] == "reference"
