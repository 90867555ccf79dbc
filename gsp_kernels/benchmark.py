"""`gsp-kernels bench`: forward, backward and forward+backward times of every backend.

Each row is one implementation at one shape and dtype: the available backends through
``gsp_pool`` (a backend may be named with a product precision, ``cuda@tf32x3``), plus two
baselines measured in the same run: the paper's algorithm (``_paper.paper_gsp``, 100
fixed-point iterations, eager) and ``torch.compile`` of the reference's forward and analytic
backward with a fixed Newton iteration count.

Timing: on a GPU ``triton.testing.do_bench`` (median) when triton imports, else CUDA events;
on the CPU ``time.perf_counter`` medians, with the rows of one shape measured round-robin so
that a busy machine slows them alike. Small inputs rotate through several input sets so a
call does not find its inputs in cache. Costs follow SPEC.md's model: forward 2·B·N·M·D
flops, backward 3x that; bytes B·N·D·sizeof(x) forward, twice that backward (read x, write
grad_x).

On a GPU each row also reports ``host f+b ms``: the CPU time to issue one forward+backward
(Python, dispatcher, autograd and launches, with no synchronization). When it reaches the
GPU median, the call is bound by the host, not by its kernels. ``graph fwd ms`` and
``graph f+b ms`` are the same calls captured once in a CUDA graph and replayed: the GPU time
of the kernels alone (what a training step captured with CUDA graphs, or
``torch.compile(mode="reduce-overhead")``, pays), the number to hold against the roofline.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import _paper
from .backends import (
    available_backends,
    forcing_strategy,
    get_backend,
    parse_spec,
    triton_tuned_config,
)
from .backends import reference as _reference
from .contract import check_options, options_for_call
from .ops import gsp_pool
from .table import format_table

TRANSPORT_RATIO = 0.3
GAMMA = 5.0
PAPER_ITERATIONS = 100
# H200 SXM peaks: dense FP32 FMA, TF32 and BF16 tensor cores (TFLOP/s), measured copy (GB/s).
H200_PEAK_TFLOPS = {"fp32": 67.0, "tf32": 495.0, "bf16": 990.0}
H200_PEAK_GBPS = 4300.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
PHASES = ("fwd", "bwd", "fwd_bwd")
BASELINES = ("paper", "compile")  # the paper's algorithm; torch.compile of the reference
GRAPH_PHASES = ("fwd", "fwd_bwd")  # replayed as CUDA graphs (the backward alone reuses a retained graph)
# Calls issued back to back for the host-side time (few enough not to fill the launch queue).
HOST_TIMED_CALLS = 5
# Bytes of one input set below which the benchmark rotates several sets (cache-cold inputs).
ROTATE_BELOW_BYTES = 64 * 2**20
MAX_INPUT_SETS = 8


@dataclass(frozen=True)
class Shape:
    """Problem size: batch, features per sample, feature dim, prototypes."""

    batch: int
    n: int
    d: int
    m: int

    @property
    def label(self) -> str:
        return f"B{self.batch} N{self.n} D{self.d} M{self.m}"

    @classmethod
    def parse(cls, text: str) -> "Shape":
        """'64x49x512x64' (B x N x D x M)."""
        try:
            parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
        except ValueError:
            parts = []
        if len(parts) != 4 or min(parts) < 1:
            raise ValueError(f"shape must be BxNxDxM with positive sizes, got {text!r}")
        return cls(*parts)


DEFAULT_SHAPES = (Shape(64, 49, 512, 64), Shape(256, 196, 512, 128))
QUICK_SHAPES = (Shape(8, 49, 64, 16), Shape(16, 49, 96, 24))


def cost_model(shape: Shape, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """SPEC.md's flops and minimum bytes per phase."""
    forward_flops = 2.0 * shape.batch * shape.n * shape.m * shape.d
    x_bytes = float(shape.batch * shape.n * shape.d * torch.empty((), dtype=dtype).element_size())
    flops = {"fwd": forward_flops, "bwd": 3.0 * forward_flops, "fwd_bwd": 4.0 * forward_flops}
    bytes_moved = {"fwd": x_bytes, "bwd": 2.0 * x_bytes, "fwd_bwd": 3.0 * x_bytes}
    return {"flops": flops, "bytes": bytes_moved}


@dataclass
class Peaks:
    """Machine peaks for the roofline floor, and where they came from."""

    fp32_tflops: float
    tensor_core_tflops: dict[str, float]  # per input dtype name: tf32 for float32, bf16 for bf16...
    gbps: float
    source: str

    def floors_ms(self, flops: float, bytes_moved: float, dtype_name: str) -> dict[str, float]:
        """Roofline floor at FP32 FMA rate and at tensor-core rate (ms)."""
        memory_ms = bytes_moved / (self.gbps * 1e9) * 1e3
        tensor_core = self.tensor_core_tflops.get(dtype_name, self.fp32_tflops)
        return {
            "fp32": max(flops / (self.fp32_tflops * 1e12) * 1e3, memory_ms),
            "tensor_core": max(flops / (tensor_core * 1e12) * 1e3, memory_ms),
        }


def measure_peaks(device: torch.device) -> tuple[float, float, float]:
    """Measured matmul TFLOP/s (fp32 IEEE, tf32-or-fp32, bf16) and copy GB/s on `device`."""
    size = 4096 if device.type == "cuda" else 1024
    copy_elements = (256 if device.type == "cuda" else 128) * 2**20 // 4

    def matmul_tflops(dtype: torch.dtype, allow_tf32: bool) -> float:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        try:
            ms = median_ms(lambda _: torch.mm(a, b), device, 1, warmup=2, repeats=5)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        return 2.0 * size**3 / (ms * 1e-3) / 1e12

    fp32 = matmul_tflops(torch.float32, False)
    tf32 = matmul_tflops(torch.float32, True) if device.type == "cuda" else fp32
    bf16 = matmul_tflops(torch.bfloat16, False) if device.type == "cuda" else fp32
    source = torch.empty(copy_elements, device=device)
    target = torch.empty_like(source)
    ms = median_ms(lambda _: target.copy_(source), device, 1, warmup=2, repeats=5)
    gbps = 2.0 * source.numel() * 4 / (ms * 1e-3) / 1e9  # read + write
    return fp32, max(tf32, fp32), max(bf16, fp32), gbps


def resolve_peaks(device: torch.device, peak_tflops: list[float] | None, peak_gbps: float | None) -> Peaks:
    """Given peaks, else H200 defaults on an H200, else measured ones."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if "H200" in name:
        fp32, tf32, bf16, gbps = *H200_PEAK_TFLOPS.values(), H200_PEAK_GBPS
        source = "H200 defaults (dense datasheet peaks, 4.3 TB/s measured copy)"
    else:
        fp32, tf32, bf16, gbps = measure_peaks(device)
        source = f"measured on {name}"
    if peak_tflops:
        fp32, tf32, bf16 = (peak_tflops + [fp32, tf32, bf16][len(peak_tflops):])[:3]
        source += "; --peak-tflops given"
    if peak_gbps:
        gbps = peak_gbps
        source += "; --peak-gbps given"
    tensor_core = {"float32": tf32, "bfloat16": bf16, "float16": bf16, "float64": fp32}
    return Peaks(fp32, tensor_core, gbps, source)


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


@dataclass
class Candidate:
    """One implementation at one shape and dtype: three timed callables over input-set indices."""

    name: str
    kind: str  # "backend" or "baseline"
    fwd: Callable[[int], object]
    bwd: Callable[[int], object]
    fwd_bwd: Callable[[int], object]
    note: str = ""
    graphable: bool = True  # no host sync inside a call: CUDA-graph capture works


@dataclass
class InputSets:
    """n_sets copies of (x [B, N, D], prototypes [M, D]) and output gradients, on one device."""

    features: list[torch.Tensor]
    prototypes: list[torch.Tensor]
    grad_pooled: torch.Tensor
    grad_attr: torch.Tensor

    @property
    def count(self) -> int:
        return len(self.features)


def make_input_sets(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> InputSets:
    """Random inputs; several sets when one set is small."""
    generator = torch.Generator(device=device).manual_seed(seed)
    x_bytes = shape.batch * shape.n * shape.d * torch.empty((), dtype=dtype).element_size()
    n_sets = max(1, min(MAX_INPUT_SETS, math.ceil(ROTATE_BELOW_BYTES / x_bytes)))

    def randn(*size):
        return torch.randn(*size, generator=generator, device=device).to(dtype)

    return InputSets(
        [randn(shape.batch, shape.n, shape.d).requires_grad_() for _ in range(n_sets)],
        [randn(shape.m, shape.d).requires_grad_() for _ in range(n_sets)],
        randn(shape.batch, shape.d),
        randn(shape.batch, shape.m),
    )


def autograd_candidate(name: str, kind: str, op: Callable, inputs: InputSets, note: str = "") -> Candidate:
    """Candidate for a differentiable op(x, prototypes) -> (pooled, attr): autograd backward."""
    graphs: dict[int, tuple] = {}
    grads = (inputs.grad_pooled, inputs.grad_attr)

    def fwd(i):
        return op(inputs.features[i], inputs.prototypes[i])

    def clear_grads(i):
        inputs.features[i].grad = None
        inputs.prototypes[i].grad = None

    def bwd(i):
        # One retained graph per input set; each call runs only the backward pass.
        if i not in graphs:
            graphs[i] = fwd(i)
        clear_grads(i)
        torch.autograd.backward(graphs[i], grads, retain_graph=True)

    def fwd_bwd(i):
        clear_grads(i)
        torch.autograd.backward(fwd(i), grads)

    return Candidate(name, kind, fwd, bwd, fwd_bwd, note)


def compiled_reference_candidate(inputs: InputSets, newton_iterations: int) -> Candidate:
    """torch.compile of the reference forward / analytic backward, fixed Newton iteration count.

    Under compilation ``solve_newton`` skips its early exit (no host sync), so it runs exactly
    ``newton_iterations`` steps. Tries fullgraph=True; falls back to the default mode.
    """
    compute = torch.float32 if inputs.features[0].dtype != torch.float64 else torch.float64
    params = (TRANSPORT_RATIO, GAMMA)

    def forward(x, prototypes):
        return _reference.gsp_forward(x.to(compute), prototypes.to(compute), *params, max_iter=newton_iterations)

    def backward(grad_pooled, grad_attr, x, prototypes, u):
        x, prototypes = x.to(compute), prototypes.to(compute)
        grad_weights = torch.zeros(x.shape[:2], dtype=compute, device=x.device)
        grad_x, grad_z = _reference.gsp_backward(
            grad_pooled.to(compute), grad_attr.to(compute), grad_weights, x, prototypes, u, *params
        )
        return grad_x.to(x.dtype), grad_z.to(prototypes.dtype)

    def forward_backward(grad_pooled, grad_attr, x, prototypes):
        _, _, _, u = forward(x, prototypes)
        return backward(grad_pooled, grad_attr, x, prototypes, u)

    detached = [(x.detach(), z.detach()) for x, z in zip(inputs.features, inputs.prototypes)]
    grads = (inputs.grad_pooled.detach(), inputs.grad_attr.detach())
    example_u = forward(*detached[0])[3]
    notes = []
    compiled = {}
    for label, fn, example in (
        ("fwd", forward, detached[0]),
        ("bwd", backward, (*grads, *detached[0], example_u)),
        ("fwd_bwd", forward_backward, (*grads, *detached[0])),
    ):
        try:
            compiled[label] = torch.compile(fn, fullgraph=True)
            compiled[label](*example)
        except Exception as exc:  # graph break or unsupported op: the default mode still compiles
            notes.append(f"{label}: fullgraph failed ({type(exc).__name__}), default mode")
            compiled[label] = torch.compile(fn)
            compiled[label](*example)
    saved_u = [forward(*pair)[3] for pair in detached]
    note = f"{newton_iterations} Newton steps; " + ("fullgraph" if not notes else "; ".join(notes))
    return Candidate(
        "compiled-reference",
        "baseline",
        lambda i: compiled["fwd"](*detached[i]),
        lambda i: compiled["bwd"](*grads, *detached[i], saved_u[i]),
        lambda i: compiled["fwd_bwd"](*grads, *detached[i]),
        note,
    )


@dataclass
class BenchRow:
    """Timings and derived rates of one candidate at one shape and dtype."""

    name: str
    kind: str
    shape: dict
    dtype: str
    ms: dict[str, float | None] = field(default_factory=dict)  # medians
    ms_min: dict[str, float | None] = field(default_factory=dict)  # fastest sample (CPU only)
    speedup_vs_paper: dict[str, float | None] = field(default_factory=dict)
    peak_memory_mb: float | None = None
    host_ms: float | None = None  # CPU time to issue one forward+backward (GPU only)
    graph_ms: dict[str, float | None] = field(default_factory=dict)  # CUDA-graph replay, fwd and fwd_bwd (GPU only)
    tflops: dict[str, float | None] = field(default_factory=dict)
    gbps: dict[str, float | None] = field(default_factory=dict)
    floor_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    note: str = ""


parse_backend_spec = parse_spec


def _forcing_strategy(fn: Callable[[int], object], strategy: str) -> Callable[[int], object]:
    """fn run with the Triton backend's strategy forced (forward and backward alike)."""

    def forced(i):
        with forcing_strategy(strategy):
            return fn(i)

    return forced


def build_candidates(
    backends: list[str], baselines: list[str], inputs: InputSets, newton_iterations: int
) -> tuple[list[Candidate], list[BenchRow]]:
    """Candidates for the backends and baselines, plus rows for those that could not be built."""
    candidates, failed = [], []
    for spec in backends:
        backend, strategy, precision = parse_backend_spec(spec)
        op = lambda x, z, backend=backend, precision=precision: gsp_pool(  # noqa: E731
            x, z, transport_ratio=TRANSPORT_RATIO, gamma=GAMMA, precision=precision, backend=backend
        )
        candidate = autograd_candidate(spec, "backend", op, inputs)
        if strategy is not None:
            for phase in PHASES:
                setattr(candidate, phase, _forcing_strategy(getattr(candidate, phase), strategy))
        candidate.graphable = backend != "reference"  # its Newton loop checks convergence on the host
        candidates.append(candidate)
    if "paper" in baselines:
        op = lambda x, z: _paper.paper_gsp(x, z, TRANSPORT_RATIO, GAMMA, PAPER_ITERATIONS)  # noqa: E731
        candidates.append(autograd_candidate("paper", "baseline", op, inputs, f"{PAPER_ITERATIONS} iterations, eager"))
    if "compile" in baselines:
        try:
            candidates.append(compiled_reference_candidate(inputs, newton_iterations))
        except Exception as exc:
            failed.append(("compiled-reference", f"compile failed: {type(exc).__name__}: {exc}"))
    return candidates, failed


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


def bench_shape(
    shape: Shape,
    dtype_name: str,
    device: torch.device,
    backends: list[str],
    baselines: list[str],
    peaks: Peaks,
    warmup: int,
    repeats: int,
    newton_iterations: int,
) -> list[BenchRow]:
    """All rows for one shape and dtype, measured in one go."""
    dtype = DTYPES[dtype_name]
    inputs = make_input_sets(shape, dtype, device)
    candidates, failed = build_candidates(backends, baselines, inputs, newton_iterations)
    measured = time_candidates(candidates, device, inputs.count, warmup, repeats)
    model = cost_model(shape, dtype)
    paper = next((t for c, t in zip(candidates, measured.median_ms) if c.name == "paper"), None)
    rows = []
    for candidate, ms, ms_min, peak_mb, host_ms, graph_ms, error in zip(
        candidates, measured.median_ms, measured.fastest_ms, measured.peak_memory_mb, measured.host_ms,
        measured.graph_ms, measured.errors,
    ):
        row = BenchRow(
            candidate.name, candidate.kind, vars(shape).copy(), dtype_name, ms, ms_min, peak_memory_mb=peak_mb,
            host_ms=host_ms, graph_ms=graph_ms,
        )
        row.note = "; ".join(filter(None, [candidate.note, error, f"{inputs.count} input sets"]))
        for phase in PHASES:
            t = ms[phase]
            baseline = paper[phase] if paper else None
            row.speedup_vs_paper[phase] = baseline / t if t and baseline else None
            row.tflops[phase] = model["flops"][phase] / (t * 1e-3) / 1e12 if t else None
            row.gbps[phase] = model["bytes"][phase] / (t * 1e-3) / 1e9 if t else None
            row.floor_ms[phase] = peaks.floors_ms(model["flops"][phase], model["bytes"][phase], dtype_name)
        rows.append(row)
    for name, reason in failed:
        rows.append(BenchRow(name, "baseline", vars(shape).copy(), dtype_name, dict.fromkeys(PHASES), note=reason))
    return rows


def dispatch_overhead(backends: list[str], device: torch.device, calls: int = 200) -> list[dict]:
    """Per-call µs (best of 7 batches) on a B=N=D=M=1 input of gsp_pool versus the backend's
    functions called directly: the forward alone, and a forward+backward (autograd versus
    ``backend.forward`` then ``backend.backward``)."""
    x = torch.randn(1, 1, 1, device=device)
    prototypes = torch.randn(1, 1, device=device)
    x_leaf, prototypes_leaf = x.clone().requires_grad_(), prototypes.clone().requires_grad_()
    grad_pooled, grad_attr, grad_weights = (torch.randn(1, 1, device=device) for _ in range(3))
    options = options_for_call(check_options(TRANSPORT_RATIO, GAMMA), 1, torch.float32)
    results = []
    for backend in backends:
        module = get_backend(backend)

        def via_op():
            return gsp_pool(x, prototypes, transport_ratio=TRANSPORT_RATIO, gamma=GAMMA, backend=backend)

        def direct():
            return module.forward(x, prototypes, options)

        def via_op_fwd_bwd():
            x_leaf.grad = prototypes_leaf.grad = None
            outputs = gsp_pool(x_leaf, prototypes_leaf, transport_ratio=TRANSPORT_RATIO, gamma=GAMMA, backend=backend)
            torch.autograd.backward(outputs, (grad_pooled, grad_attr))

        def direct_fwd_bwd():
            u = module.forward(x, prototypes, options)[3]
            return module.backward(grad_pooled, grad_attr, grad_weights, x, prototypes, u, options)

        # Interleaved batches of calls; the minimum is the cost without interference.
        labelled = {"gsp_pool": via_op, "backend.forward": direct, "gsp_pool f+b": via_op_fwd_bwd,
                    "backend f+b": direct_fwd_bwd}
        samples: dict[str, list[float]] = {label: [] for label in labelled}
        for _ in range(7):
            for label, fn in labelled.items():
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                samples[label].append((time.perf_counter() - start) / calls * 1e6)
        per_call = {label: min(values) for label, values in samples.items()}
        results.append(
            {
                "backend": backend,
                "gsp_pool_us": per_call["gsp_pool"],
                "backend_forward_us": per_call["backend.forward"],
                "overhead_us": per_call["gsp_pool"] - per_call["backend.forward"],
                "gsp_pool_fwd_bwd_us": per_call["gsp_pool f+b"],
                "backend_fwd_bwd_us": per_call["backend f+b"],
                "overhead_fwd_bwd_us": per_call["gsp_pool f+b"] - per_call["backend f+b"],
            }
        )
    return results


def training_step_rows(device: torch.device, backends: list[str]) -> tuple[list[dict] | None, str]:
    """Rows from the metric-learning helper's training-step benchmark, or why there are none."""
    try:
        from .training.bench_step import training_step_rows as rows_for
    except ImportError as exc:
        return None, (
            f"--training-step needs gsp_kernels.training.bench_step ({exc}); "
            'install the training extra with pip install -e ".[train]"'
        )
    return rows_for(device, backends), ""


def run_bench(
    shapes: tuple[Shape, ...] = DEFAULT_SHAPES,
    dtypes: list[str] | None = None,
    backends: list[str] | None = None,
    baselines: tuple[str, ...] = BASELINES,
    device: torch.device | str | None = None,
    warmup: int = 2,
    repeats: int = 9,
    newton_iterations: int = 20,
    peak_tflops: list[float] | None = None,
    peak_gbps: float | None = None,
    training_step: bool = False,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict:
    """Run the benchmark; returns the JSON-ready report (rows, overhead, peaks, environment)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if backends is None:
        backends = available_backends(device)
        if device.type == "cpu" and "triton" in backends:
            # Triton on the CPU is its interpreter (TRITON_INTERPRET=1): a correctness tool, not timed.
            backends.remove("triton")
            log("not timing triton: on the CPU it runs in its interpreter (name it in --backends to force)")
    dtypes = dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    peaks = resolve_peaks(device, peak_tflops, peak_gbps)
    log(f"peaks: fp32 {peaks.fp32_tflops:.3g} TFLOP/s, memory {peaks.gbps:.4g} GB/s ({peaks.source})")
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            log(f"measuring {shape.label} {dtype_name}: {', '.join([*backends, *baselines])}")
            rows += bench_shape(
                shape, dtype_name, device, backends, list(baselines), peaks, warmup, repeats, newton_iterations
            )
    log("measuring per-call overhead")
    backend_names = list(dict.fromkeys(parse_backend_spec(spec)[0] for spec in backends))  # without :strategy@precision
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "timer": timer_name(device),
        "triton_split_samples": triton_split_samples(),
        "triton_tuned_config": triton_tuned_config(device),
        "params": {"transport_ratio": TRANSPORT_RATIO, "gamma": GAMMA, "paper_iterations": PAPER_ITERATIONS,
                   "compiled_newton_iterations": newton_iterations, "repeats": repeats, "warmup": warmup},
        "peaks": {"fp32_tflops": peaks.fp32_tflops, "tensor_core_tflops": peaks.tensor_core_tflops,
                  "gbps": peaks.gbps, "source": peaks.source},
        "rows": [vars(row) for row in rows],
        "overhead": dispatch_overhead(backend_names, device),
        "training_step": None,
    }
    if training_step:
        step_rows, reason = training_step_rows(device, backend_names)
        report["training_step"] = step_rows if step_rows is not None else {"unavailable": reason}
    return report


_SPLIT_TEXT = {True: "; triton: samples split across programs",
               False: "; triton: one program per sample (GSP_TRITON_SPLIT=0)"}


def triton_split_samples() -> bool | None:
    """Whether the Triton kernels split a sample across programs (``launch.SPLIT_SAMPLES``,
    ``GSP_TRITON_SPLIT``); None without Triton."""
    try:
        from .backends.triton import launch
    except ImportError:
        return None
    return launch.SPLIT_SAMPLES


def timer_name(device: torch.device) -> str:
    """Which clock the report's numbers come from."""
    if device.type != "cuda":
        return "time.perf_counter, median, round-robin"
    try:
        import triton.testing  # noqa: F401

        return "triton.testing.do_bench, median"
    except ImportError:
        return "CUDA events, median"


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: dict) -> str:
    """The readable tables: timings per row, overhead, training step."""
    headers = ["impl", "shape", "dtype", "fwd ms", "bwd ms", "f+b ms", "f+b min ms", "host f+b ms", "graph fwd ms",
               "graph f+b ms", "x paper f+b", "peak MB",
               "TFLOP/s f+b", "GB/s f+b", "floor f+b ms fp32/tc", "note"]
    lines = []
    for row in report["rows"]:
        shape = Shape(**row["shape"]).label
        floor = row["floor_ms"].get("fwd_bwd")
        floor_text = f"{floor['fp32']:.3g}/{floor['tensor_core']:.3g}" if floor else "-"
        lines.append([
            row["name"], shape, row["dtype"], *(_fmt(row["ms"][p]) for p in PHASES), _fmt(row["ms_min"].get("fwd_bwd")),
            _fmt(row.get("host_ms")), *(_fmt(row.get("graph_ms", {}).get(p)) for p in GRAPH_PHASES),
            _fmt(row["speedup_vs_paper"].get("fwd_bwd"), ".2f"), _fmt(row["peak_memory_mb"], ".1f"),
            _fmt(row["tflops"].get("fwd_bwd")), _fmt(row["gbps"].get("fwd_bwd")), floor_text, row["note"],
        ])
    has_triton = any(row["name"].startswith("triton") for row in report["rows"])
    parts = [
        f"device: {report['device']}, torch {report['torch']}, {report['cpu_threads']} CPU threads "
        f"(load average {report['load_average']:.1f}), "
        f"timer: {report['timer']}; mu={report['params']['transport_ratio']}, gamma={report['params']['gamma']}"
        + (_SPLIT_TEXT.get(report.get("triton_split_samples"), "") if has_triton else ""),
        f"peaks: {report['peaks']['source']}; fwd = forward of a training step (inputs require grad), "
        "x paper = paper's time / this time",
        *([f"triton tuned configuration: {report.get('triton_tuned_config', 'not recorded')}; "
           "triton:fused / triton:gemm rows force that strategy, plain triton rows let the backend choose"]
          if has_triton else []),
        format_table(headers, lines),
        "",
        "per-call overhead on a 1x1x1x1 input (gsp_pool vs the backend's functions called directly):",
        format_table(
            ["backend", "gsp_pool µs", "backend.forward µs", "overhead µs", "gsp_pool f+b µs", "backend f+b µs",
             "overhead f+b µs"],
            [[o["backend"], *(_fmt(o.get(key), ".1f") for key in (
                "gsp_pool_us", "backend_forward_us", "overhead_us", "gsp_pool_fwd_bwd_us", "backend_fwd_bwd_us",
                "overhead_fwd_bwd_us"))]
             for o in report["overhead"]],
        ),
    ]
    step = report.get("training_step")
    if isinstance(step, dict):
        parts += ["", f"training step: unavailable: {step['unavailable']}"]
    elif step:
        keys = list(dict.fromkeys(k for row in step for k in row))
        parts += ["", "training step:", format_table(keys, [[_fmt_cell(row.get(k)) for k in keys] for row in step])]
    return "\n".join(parts)


def _fmt_cell(value) -> str:
    return _fmt(value) if isinstance(value, float) else ("-" if value is None else str(value))
