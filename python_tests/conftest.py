"""Shared test configuration: GPU marker, Triton interpreter on CPU-only machines, error metric."""

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through its interpreter; set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def single_thread():
    """One torch CPU thread for the test: tiny models run as fast on one, and stay fast when other
    jobs load the CPUs (a module opts in with ``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (SPEC.md's metric); NaN anywhere gives inf."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    assert denom > 0, "never compare against an all-zero reference"
    return (out64 - ref64).norm().item() / denom
