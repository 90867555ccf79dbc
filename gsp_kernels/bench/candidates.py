"""The kernel benchmark's cases and the implementations it times.

A case is one shape and dtype: ``make_input_sets`` draws its inputs, several sets when one set is
small, so that a call does not find its inputs in cache. A ``Candidate`` is one implementation
at one case as three callables over input-set indices (forward, backward alone, forward+backward):
the backends through ``gsp_pool`` (a spec may name a Triton strategy and a product precision,
``triton:gemm@ieee``), the paper's algorithm (``paper.paper_gsp``, eager) and ``torch.compile``
of the reference's forward and analytic backward. Each backend also runs in ``VARIANTS`` beside
its plain call: "masked" (a padded batch: ``padding_mask``) and "learned" (mu and gamma as 0-d
tensors that take gradients), whose times are held against the plain call's. ``gsp-kernels bench`` and the pytest-benchmark
suite (bench/test_microbench.py) time the same candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..backends import forcing_strategy, parse_spec
from ..backends import reference as _reference
from ..ops import gsp_pool
from ..testing import Shape
from .paper import paper_gsp

TRANSPORT_RATIO = 0.3
GAMMA = 5.0
PAPER_ITERATIONS = 100
PHASES = ("fwd", "bwd", "fwd_bwd")
BASELINES = ("paper", "compile")  # the paper's algorithm; torch.compile of the reference
# How a backend is called: plain (float mu and gamma, no mask), masked (a padded batch), learned
# (tensor mu and gamma that require grad).
VARIANTS = ("plain", "masked", "learned")
DEFAULT_SHAPES = (Shape(64, 49, 512, 64), Shape(256, 196, 512, 128))
QUICK_SHAPES = (Shape(8, 49, 64, 16), Shape(16, 49, 96, 24))
# Bytes of one input set below which the benchmark rotates several sets (cache-cold inputs).
ROTATE_BELOW_BYTES = 64 * 2**20
MAX_INPUT_SETS = 8


def default_dtypes(device: torch.device) -> list[str]:
    """The dtypes timed when none are named: float32, plus bfloat16 on a GPU."""
    return ["float32", "bfloat16"] if device.type == "cuda" else ["float32"]


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
    variant: str = "plain"  # one of VARIANTS (baselines: plain)
    backend_spec: str = ""  # the backend spec a backend candidate calls


@dataclass
class InputSets:
    """n_sets copies of (x [B, N, D], prototypes [M, D]) and output gradients, on one device."""

    features: list[torch.Tensor]
    prototypes: list[torch.Tensor]
    grad_pooled: torch.Tensor  # [B, D]
    grad_attr: torch.Tensor  # [B, M]

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


def padding_mask(batch: int, n: int, device: torch.device) -> torch.Tensor:
    """``[B, N]`` bool of a padded batch: sample b has its first N - b·(N//2)/(B-1) positions
    valid (N for the first, about N/2 for the last), the rest padding."""
    counts = n - torch.arange(batch, device=device) * (n // 2) // max(batch - 1, 1)  # [B]
    return torch.arange(n, device=device) < counts[:, None]


def autograd_candidate(name: str, kind: str, op: Callable, inputs: InputSets, note: str = "",
                       leaves: tuple[torch.Tensor, ...] = ()) -> Candidate:
    """Candidate for a differentiable op(x, prototypes) -> (pooled, attr): autograd backward
    (``leaves``: other tensors the op differentiates, whose gradients are cleared as well)."""
    graphs: dict[int, tuple] = {}
    grads = (inputs.grad_pooled, inputs.grad_attr)

    def fwd(i):
        return op(inputs.features[i], inputs.prototypes[i])

    def clear_grads(i):
        inputs.features[i].grad = None
        inputs.prototypes[i].grad = None
        for leaf in leaves:
            leaf.grad = None

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
        grad_weights = torch.zeros(x.shape[:2], dtype=compute, device=x.device)  # [B, N]
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


def _forcing_strategy(fn: Callable[[int], object], strategy: str) -> Callable[[int], object]:
    """fn run with the Triton backend's strategy forced (forward and backward alike)."""

    def forced(i):
        with forcing_strategy(strategy):
            return fn(i)

    return forced


def _variant_call(variant: str, inputs: InputSets) -> tuple[dict, tuple[torch.Tensor, ...]]:
    """The ``gsp_pool`` keywords of a variant and the extra tensors it differentiates."""
    if variant == "masked":
        x = inputs.features[0]
        return {"transport_ratio": TRANSPORT_RATIO, "gamma": GAMMA,
                "mask": padding_mask(x.shape[0], x.shape[1], x.device)}, ()
    if variant == "learned":
        device = inputs.features[0].device
        mu, gamma = (torch.tensor(value, device=device, requires_grad=True) for value in (TRANSPORT_RATIO, GAMMA))
        return {"transport_ratio": mu, "gamma": gamma}, (mu, gamma)
    return {"transport_ratio": TRANSPORT_RATIO, "gamma": GAMMA}, ()


def build_candidates(
    backends: list[str], baselines: list[str], inputs: InputSets, newton_iterations: int,
    variants: tuple[str, ...] = ("plain",),
) -> tuple[list[Candidate], list[tuple[str, str, str]]]:
    """Candidates for the backends (in each of ``variants``: "plain" named by its spec, the others
    "SPEC masked", "SPEC learned") and baselines, plus (name, kind, reason) for those that could
    not be built (a variant a backend refuses among them)."""
    candidates, failed = [], []
    for spec in backends:
        backend, strategy, precision = parse_spec(spec)
        for variant in variants:
            name = spec if variant == "plain" else f"{spec} {variant}"
            keywords, leaves = _variant_call(variant, inputs)
            op = lambda x, z, backend=backend, precision=precision, keywords=keywords: gsp_pool(  # noqa: E731
                x, z, precision=precision, backend=backend, **keywords
            )
            if variant != "plain":
                try:  # a backend that refuses the variant refuses it at the call
                    with torch.no_grad():
                        op(inputs.features[0], inputs.prototypes[0])
                except (ValueError, TypeError, RuntimeError) as exc:
                    failed.append((name, "backend", f"refused: {type(exc).__name__}: {exc}"))
                    continue
            candidate = autograd_candidate(name, "backend", op, inputs, leaves=leaves)
            if strategy is not None:
                for phase in PHASES:
                    setattr(candidate, phase, _forcing_strategy(getattr(candidate, phase), strategy))
            candidate.graphable = backend != "reference"  # its Newton loop checks convergence on the host
            candidate.variant, candidate.backend_spec = variant, spec
            candidates.append(candidate)
    if "paper" in baselines:
        op = lambda x, z: paper_gsp(x, z, TRANSPORT_RATIO, GAMMA, PAPER_ITERATIONS)  # noqa: E731
        candidates.append(autograd_candidate("paper", "baseline", op, inputs, f"{PAPER_ITERATIONS} iterations, eager"))
    if "compile" in baselines:
        try:
            candidates.append(compiled_reference_candidate(inputs, newton_iterations))
        except Exception as exc:
            failed.append(("compiled-reference", "baseline", f"compile failed: {type(exc).__name__}: {exc}"))
    return candidates, failed
