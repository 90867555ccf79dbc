"""The kernel benchmark's clocks: how one candidate's phases are timed.

On a GPU ``triton.testing.do_bench`` (median) when triton imports, else CUDA events; on the CPU
``time.perf_counter`` medians, with the candidates of one case measured round-robin so that a
busy machine slows them alike. On a GPU also the host's issue time of one call (no
synchronization: when it reaches the GPU median, the call is bound by the host, not by its
kernels) and the GPU time of the same call captured once in a CUDA graph and replayed (the
kernels alone, what a step captured with CUDA graphs or ``torch.compile(mode="reduce-overhead")``
pays: the number to hold against the roofline).
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .candidates import PHASES, Candidate

GRAPH_PHASES = ("fwd", "fwd_bwd")  # replayed as CUDA graphs (the backward alone reuses a retained graph)
# Calls issued back to back for the host-side time (few enough not to fill the launch queue).
HOST_TIMED_CALLS = 5


def median_ms(fn: Callable[[int], object], device: torch.device, n_sets: int, warmup: int, repeats: int) -> float:
    """Median time of fn(set_index) in ms, rotating over n_sets input sets."""
    counter = itertools.count()
    call = lambda: fn(next(counter) % n_sets)  # noqa: E731
    if device.type == "cuda":
        try:
            import triton.testing

            return float(triton.testing.do_bench(call, return_mode="median"))
        except ImportError:
            return cuda_event_median_ms(call, warmup, repeats)
    return statistics.median(round_robin_samples([fn], n_sets, warmup, repeats)[0])


def cuda_event_median_ms(call: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median of CUDA-event timings of single calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(max(repeats, 10)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def round_robin_samples(fns: list[Callable[[int], object]], n_sets: int, warmup: int, repeats: int) -> list[list[float]]:
    """CPU times (ms) of several functions, timed in turn each repeat so load hits them alike."""
    for fn in fns:
        for i in range(max(warmup, n_sets)):  # every input set once: lazily built state is ready
            fn(i % n_sets)
    times: list[list[float]] = [[] for _ in fns]
    for repeat in range(repeats):
        for fn, samples in zip(fns, times):
            start = time.perf_counter()
            fn(repeat % n_sets)
            samples.append((time.perf_counter() - start) * 1e3)
    return times


def host_issue_ms(fn: Callable[[int], object], device: torch.device, n_sets: int) -> float:
    """CPU ms to issue one call of fn, HOST_TIMED_CALLS back to back without synchronizing."""
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(HOST_TIMED_CALLS):
        fn(i % n_sets)
    issued = time.perf_counter()
    torch.cuda.synchronize(device)
    return (issued - start) / HOST_TIMED_CALLS * 1e3


def graph_replay_ms(fn: Callable[[int], object], device: torch.device) -> float:
    """Median ms of fn(0) captured in a CUDA graph and replayed: the GPU time without the host."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn(0)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(0)
    try:
        return median_ms(lambda _i: graph.replay(), device, 1, 2, 10)
    finally:
        del graph
        torch.cuda.empty_cache()


def timer_name(device: torch.device) -> str:
    """Which clock the report's numbers come from."""
    if device.type != "cuda":
        return "time.perf_counter, median, round-robin"
    try:
        import triton.testing  # noqa: F401

        return "triton.testing.do_bench, median"
    except ImportError:
        return "CUDA events, median"


@dataclass
class Timings:
    """What ``time_candidates`` measured, one entry per candidate."""

    median_ms: list[dict[str, float | None]]
    fastest_ms: list[dict[str, float | None]]  # CPU only: a loaded machine only adds time
    peak_memory_mb: list[float | None]  # GPU only
    host_ms: list[float | None]  # GPU only: issue time of one forward+backward
    graph_ms: list[dict[str, float | None]]  # GPU only: CUDA-graph replay of fwd and fwd_bwd
    errors: list[str]


def time_candidates(candidates: list[Candidate], device: torch.device, n_sets: int, warmup: int, repeats: int) -> Timings:
    """Median (and on the CPU fastest) ms per phase, peak extra memory, host issue time,
    CUDA-graph replay time and error notes for each candidate."""
    timings = [dict.fromkeys(PHASES) for _ in candidates]
    fastest = [dict.fromkeys(PHASES) for _ in candidates]
    memory: list[float | None] = [None] * len(candidates)
    host: list[float | None] = [None] * len(candidates)
    graph = [dict.fromkeys(GRAPH_PHASES) for _ in candidates]
    errors = [""] * len(candidates)
    if device.type == "cpu":
        for phase in PHASES:
            usable = [j for j in range(len(candidates)) if not errors[j]]
            try:
                fns = [getattr(candidates[j], phase) for j in usable]
                for j, samples in zip(usable, round_robin_samples(fns, n_sets, warmup, repeats)):
                    timings[j][phase], fastest[j][phase] = statistics.median(samples), min(samples)
            except Exception:
                # Find the failing candidate alone so the others still get measured.
                for j in usable:
                    try:
                        samples = round_robin_samples([getattr(candidates[j], phase)], n_sets, warmup, repeats)[0]
                        timings[j][phase], fastest[j][phase] = statistics.median(samples), min(samples)
                    except Exception as exc:
                        errors[j] = f"{phase} failed: {type(exc).__name__}: {exc}"
        return Timings(timings, fastest, memory, host, graph, errors)
    for j, candidate in enumerate(candidates):
        try:
            for phase in PHASES:
                timings[j][phase] = median_ms(getattr(candidate, phase), device, n_sets, warmup, repeats)
            # Peak memory of one forward+backward, outside do_bench (its cache flush allocates).
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            candidate.fwd_bwd(0)
            torch.cuda.synchronize(device)
            memory[j] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            host[j] = host_issue_ms(candidate.fwd_bwd, device, n_sets)
        except Exception as exc:  # e.g. out of memory: report, keep going
            errors[j] = f"failed: {type(exc).__name__}: {exc}"
            continue
        for phase in GRAPH_PHASES if candidate.graphable else ():
            try:
                graph[j][phase] = graph_replay_ms(getattr(candidate, phase), device)
            except Exception as exc:  # a host sync inside the call cannot be captured
                errors[j] = f"graph {phase} not captured: {type(exc).__name__}: {exc}"
                torch.cuda.synchronize(device)
    return Timings(timings, fastest, memory, host, graph, errors)
