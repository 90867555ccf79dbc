"""Shared test configuration: GPU marker, Triton interpreter on CPU-only machines, CPU process
groups for the DistributedDataParallel tests (the error metric and the shared test inputs'
helpers are gsp_kernels.testing's)."""

import gc
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def spawn_gloo_ranks(body, world_size: int, tmp_path, *args) -> None:
    """Run ``body(rank, *args)`` in ``world_size`` CPU processes joined in one gloo group; a file
    store under ``tmp_path``: no TCP server thread on rank 0 that another rank could outlive, no
    port race."""
    mp.spawn(_gloo_rank, args=(world_size, str(tmp_path / "store"), body, args), nprocs=world_size, join=True)


def _gloo_rank(rank: int, world_size: int, store_path: str, body, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        body(rank, *args)
        # Release DDP's reducer (body's locals) before the group goes: left to interpreter
        # teardown, it aborted the process now and then (std::terminate, "without an active
        # exception", ~3% of runs).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
