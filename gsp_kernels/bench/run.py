"""One run of the kernel benchmark: every candidate at every shape and dtype, the per-call
dispatch overhead, optionally the training step, and the JSON-ready report that holds them."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..backends import available_backends, get_backend, parse_spec, triton_tuned_config
from ..contract import DTYPES, check_options
from ..ops import gsp_pool
from ..testing import Shape
from .candidates import (
    BASELINES,
    DEFAULT_SHAPES,
    GAMMA,
    PAPER_ITERATIONS,
    PHASES,
    TRANSPORT_RATIO,
    VARIANTS,
    build_candidates,
    default_dtypes,
    make_input_sets,
)
from .cost_model import Peaks, cost_model, resolve_peaks
from .timing import time_candidates, timer_name


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
    variant: str = "plain"  # a backend's call: plain, masked or learned (candidates.VARIANTS)
    vs_plain: dict[str, float | None] = field(default_factory=dict)  # this time / the plain call's of the same backend


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
    variants: tuple[str, ...] = ("plain",),
) -> list[BenchRow]:
    """All rows for one shape and dtype, measured in one go (the variants of a backend beside
    its plain call, round-robin on the CPU)."""
    dtype = DTYPES[dtype_name]
    inputs = make_input_sets(shape, dtype, device)
    candidates, failed = build_candidates(backends, baselines, inputs, newton_iterations, variants)
    measured = time_candidates(candidates, device, inputs.count, warmup, repeats)
    model = cost_model(shape, dtype)
    paper = next((t for c, t in zip(candidates, measured.median_ms) if c.name == "paper"), None)
    plain = {c.backend_spec: t for c, t in zip(candidates, measured.median_ms) if c.kind == "backend" and c.variant == "plain"}
    rows = []
    for candidate, ms, ms_min, peak_mb, host_ms, graph_ms, error in zip(
        candidates, measured.median_ms, measured.fastest_ms, measured.peak_memory_mb, measured.host_ms,
        measured.graph_ms, measured.errors,
    ):
        row = BenchRow(
            candidate.name, candidate.kind, vars(shape).copy(), dtype_name, ms, ms_min, peak_memory_mb=peak_mb,
            host_ms=host_ms, graph_ms=graph_ms, variant=candidate.variant,
        )
        own_plain = plain.get(candidate.backend_spec) if candidate.kind == "backend" else None
        row.note = "; ".join(filter(None, [candidate.note, error, f"{inputs.count} input sets"]))
        for phase in PHASES:
            t = ms[phase]
            baseline = paper[phase] if paper else None
            row.speedup_vs_paper[phase] = baseline / t if t and baseline else None
            row.vs_plain[phase] = t / own_plain[phase] if t and own_plain and own_plain[phase] else None
            row.tflops[phase] = model["flops"][phase] / (t * 1e-3) / 1e12 if t else None
            row.gbps[phase] = model["bytes"][phase] / (t * 1e-3) / 1e9 if t else None
            row.floor_ms[phase] = peaks.floors_ms(model["flops"][phase], model["bytes"][phase], dtype_name)
        rows.append(row)
    for name, kind, reason in failed:
        variant = next((variant for variant in VARIANTS if kind == "backend" and name.endswith(f" {variant}")), "plain")
        rows.append(BenchRow(name, kind, vars(shape).copy(), dtype_name, dict.fromkeys(PHASES), note=reason, variant=variant))
    return rows


def dispatch_overhead(backends: list[str], device: torch.device, calls: int = 200) -> list[dict]:
    """Per-call µs (best of 7 batches) on a B=N=D=M=1 input of gsp_pool versus the backend's
    functions called directly: the forward alone, and a forward+backward (autograd versus
    ``backend.forward`` then ``backend.backward``)."""
    x = torch.randn(1, 1, 1, device=device)  # [B, N, D]
    prototypes = torch.randn(1, 1, device=device)  # [M, D]
    x_leaf, prototypes_leaf = x.clone().requires_grad_(), prototypes.clone().requires_grad_()
    grad_pooled, grad_attr, grad_weights = (torch.randn(1, 1, device=device) for _ in range(3))
    options = check_options(TRANSPORT_RATIO, GAMMA, n=1, dtype=torch.float32)
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


def triton_split_samples() -> bool | None:
    """Whether the Triton kernels split a sample across programs (``launch.SPLIT_SAMPLES``,
    ``GSP_TRITON_SPLIT``); None without Triton."""
    try:
        from ..backends.triton import launch
    except ImportError:
        return None
    return launch.SPLIT_SAMPLES


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
    variants: tuple[str, ...] = VARIANTS,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict:
    """Run the benchmark; returns the JSON-ready report (rows, overhead, peaks, environment).
    Each backend is timed in each of ``variants`` (``candidates.VARIANTS``), side by side."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if backends is None:
        backends = available_backends(device)
        if device.type == "cpu" and "triton" in backends:
            # Triton on the CPU is its interpreter (TRITON_INTERPRET=1): a correctness tool, not timed.
            backends.remove("triton")
            log("not timing triton: on the CPU it runs in its interpreter (name it in --backends to force)")
    if training_step:
        # Imported here: `python -m gsp_kernels.bench.training_step` runs that module as __main__,
        # which the package must not have imported before.
        from .training_step import require_torchvision, training_step_rows

        require_torchvision()  # before the measurements, not after them
    dtypes = dtypes or default_dtypes(device)
    peaks = resolve_peaks(device, peak_tflops, peak_gbps)
    log(f"peaks: fp32 {peaks.fp32_tflops:.3g} TFLOP/s, memory {peaks.gbps:.4g} GB/s ({peaks.source})")
    rows = []
    for shape in shapes:
        for dtype_name in dtypes:
            log(f"measuring {shape.label} {dtype_name}: {', '.join([*backends, *baselines])}")
            rows += bench_shape(
                shape, dtype_name, device, backends, list(baselines), peaks, warmup, repeats, newton_iterations, tuple(variants)
            )
    log("measuring per-call overhead")
    backend_names = list(dict.fromkeys(parse_spec(spec)[0] for spec in backends))  # without :strategy@precision
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "timer": timer_name(device),
        "triton_split_samples": triton_split_samples(),
        "triton_tuned_config": triton_tuned_config(device),
        "params": {"transport_ratio": TRANSPORT_RATIO, "gamma": GAMMA, "paper_iterations": PAPER_ITERATIONS,
                   "compiled_newton_iterations": newton_iterations, "repeats": repeats, "warmup": warmup,
                   "variants": list(variants)},
        "peaks": {"fp32_tflops": peaks.fp32_tflops, "tensor_core_tflops": peaks.tensor_core_tflops,
                  "gbps": peaks.gbps, "source": peaks.source},
        "rows": [vars(row) for row in rows],
        "overhead": dispatch_overhead(backend_names, device),
        "training_step": None,
    }
    if training_step:
        report["training_step"] = training_step_rows(device, backend_names)
    return report
