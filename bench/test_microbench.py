"""Microbenchmarks of every available backend under pytest-benchmark, on the cases of
`gsp-kernels bench` (gsp_kernels.bench.candidates: its shapes, dtypes, input sets and candidates).

    pytest bench/ --benchmark-only                        # time them, print the table
    pytest bench/ --benchmark-only --benchmark-autosave   # ... and save the run under .benchmarks/
    pytest bench/ --benchmark-only --benchmark-compare    # ... against the last saved run
    pytest bench/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%   # fail on a 10% regression
    pytest bench/ --benchmark-disable                     # run each case once, time nothing (CI's smoke test)

One benchmark per (shape, dtype, backend, phase), named ``test_gsp_pool[8x49x64x16-float32-reference-fwd]``
and grouped by shape, dtype and phase, so that a table compares the backends and a saved run is
compared case by case. Phases: forward of a training step (inputs require grad), backward alone
(on a retained graph), forward+backward. On a GPU: the default shapes (``DEFAULT_SHAPES``) in
float32 and bfloat16, each timed call ending in ``torch.cuda.synchronize``, rotating over the
input sets as ``gsp-kernels bench`` does. On the CPU: the first of the quick shapes
(``QUICK_SHAPES``) in float32, in seconds; the Triton backend runs in its interpreter (bench/
conftest.py sets TRITON_INTERPRET=1), a correctness tool timed over a few rounds of one input set.

Each timed call is host wall time, launch and synchronization included (pytest-benchmark's
clock): for regressions between runs of one machine, not comparable with the do_bench medians of
``gsp-kernels bench``."""

from __future__ import annotations

import itertools
from functools import cache

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="the microbenchmarks need pytest-benchmark (the test extra)")

from gsp_kernels import available_backends
from gsp_kernels.bench.candidates import (
    DEFAULT_SHAPES,
    PHASES,
    QUICK_SHAPES,
    Candidate,
    build_candidates,
    default_dtypes,
    make_input_sets,
)
from gsp_kernels.contract import DTYPES
from gsp_kernels.testing import Shape

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = DEFAULT_SHAPES if DEVICE.type == "cuda" else QUICK_SHAPES[:1]
BACKENDS = available_backends(DEVICE)
# Rounds of the Triton interpreter (about a second a call at the CPU's shape).
INTERPRETER_ROUNDS = 3
CASES = [(shape, dtype_name, backend, phase) for shape in SHAPES for dtype_name in default_dtypes(DEVICE)
         for backend in BACKENDS for phase in PHASES]


@cache
def candidate(shape: Shape, dtype_name: str, backend: str) -> tuple[Candidate, int]:
    """The bench package's candidate for this case (built once) and the input sets it rotates over."""
    inputs = make_input_sets(shape, DTYPES[dtype_name], DEVICE)
    (built,), _ = build_candidates([backend], [], inputs, newton_iterations=20)  # no baseline: no compile
    return built, inputs.count


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize(("shape", "dtype_name", "backend", "phase"), CASES,
                         ids=[f"{shape}-{dtype_name}-{backend}-{phase}" for shape, dtype_name, backend, phase in CASES])
def test_gsp_pool(benchmark, shape: Shape, dtype_name: str, backend: str, phase: str):
    interpreted = backend == "triton" and DEVICE.type == "cpu"
    built, n_sets = candidate(shape, dtype_name, backend)
    n_sets = 1 if interpreted else n_sets
    fn = getattr(built, phase)
    for i in range(n_sets):  # every input set once: the backward's retained graphs are built
        fn(i)
    synchronize()
    counter = itertools.count()

    def call():
        fn(next(counter) % n_sets)
        synchronize()

    benchmark.group = f"{shape} {dtype_name} {phase}"
    benchmark.extra_info.update(device=str(DEVICE), shape=str(shape), dtype=dtype_name, backend=backend, phase=phase,
                                input_sets=n_sets)
    if interpreted:
        benchmark.pedantic(call, rounds=INTERPRETER_ROUNDS)
    else:
        benchmark(call)
