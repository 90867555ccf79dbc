"""`gsp-kernels check`: every backend that runs here against the float64 reference.

For each available backend (the Triton backend once per strategy, ``triton:fused`` and
``triton:gemm``) and each dtype (and, for float32 on kernel backends, each product precision),
run ``gsp_pool`` on fresh random inputs and compare the forward outputs
(pooled, attr, weights) and both gradients (x, prototypes) with the reference computed in
float64 on the CPU from upcast copies of the same inputs. Errors are ‖out − ref‖ / ‖ref‖
(``testing.rel_err``; against an exactly zero reference, 0 for an exact match, else inf), judged against
the tolerances of docs/math.md, Accuracy (``testing.tolerance``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .backends import (
    available_backends,
    expand_specs,
    forcing_strategy,
    get_backend,
    split_spec,
)
from .contract import DTYPES, check_options
from .ops import gsp_pool
from .table import format_table
from .testing import rel_err, tolerance

QUANTITIES = ("pooled", "attr", "weights", "grad_x", "grad_prototypes")


@dataclass(frozen=True)
class Case:
    """One random problem: sizes, hyperparameters, and whether features sit near prototypes."""

    batch: int
    n: int
    d: int
    m: int
    gamma: float
    transport_ratio: float
    clustered: bool

    @property
    def label(self) -> str:
        layout = "clustered" if self.clustered else "gaussian"
        return f"B{self.batch} N{self.n} D{self.d} M{self.m} γ={self.gamma:g} μ={self.transport_ratio:g} {layout}"


# N, M, D not powers of two; gammas from soft to sparse plans; mu including 1 (GAP).
DEFAULT_CASES = (
    Case(3, 37, 19, 11, gamma=5.0, transport_ratio=0.3, clustered=False),
    Case(2, 50, 70, 13, gamma=20.0, transport_ratio=0.7, clustered=True),
    Case(2, 23, 33, 5, gamma=1.0, transport_ratio=1.0, clustered=False),
    Case(4, 49, 96, 24, gamma=0.5, transport_ratio=0.05, clustered=True),
)


@dataclass
class CheckRow:
    """Result of one (backend, dtype, precision, case): errors per quantity, or why it was skipped."""

    backend: str
    dtype: str
    precision: str
    case: str
    tolerance: float
    errors: dict[str, float] = field(default_factory=dict)
    status: str = "pass"  # pass, FAIL or skipped
    reason: str = ""


def make_inputs(case: Case, device: torch.device, generator: torch.Generator):
    """Features [B, N, D] and prototypes [M, D] in float64 on `device`.

    Gaussian features have norms ~sqrt(D) (Lipschitz normalization projects them); clustered
    ones are prototypes plus small noise, inside the unit ball, so costs are near 0 and a
    large gamma gives sparse plans.
    """
    prototypes = torch.randn(case.m, case.d, generator=generator, dtype=torch.float64)
    prototypes = 0.8 * prototypes / prototypes.norm(dim=-1, keepdim=True)  # inside the unit ball
    if case.clustered:
        owner = torch.randint(case.m, (case.batch, case.n), generator=generator)
        noise = torch.randn(case.batch, case.n, case.d, generator=generator, dtype=torch.float64)
        x = prototypes[owner] + 0.05 * noise / case.d**0.5
    else:
        x = torch.randn(case.batch, case.n, case.d, generator=generator, dtype=torch.float64)
    return x.to(device), prototypes.to(device)


def run_with_grads(x, prototypes, grads, case: Case, spec: str, precision: str) -> dict[str, torch.Tensor]:
    """Forward with weights, then backward of Σ pooled·gy + attr·ga + weights·gw, by the backend
    (and Triton strategy) that ``spec`` names."""
    backend, strategy = split_spec(spec)
    with forcing_strategy(strategy):
        return _run_with_grads(x, prototypes, grads, case, backend, precision)


def _run_with_grads(x, prototypes, grads, case: Case, backend: str, precision: str) -> dict[str, torch.Tensor]:
    x = x.detach().requires_grad_()
    prototypes = prototypes.detach().requires_grad_()
    pooled, attr, weights = gsp_pool(
        x,
        prototypes,
        transport_ratio=case.transport_ratio,
        gamma=case.gamma,
        precision=precision,
        backend=backend,
        return_weights=True,
    )
    grad_pooled, grad_attr, grad_weights = (g.to(device=x.device, dtype=x.dtype) for g in grads)
    torch.autograd.backward((pooled, attr, weights), (grad_pooled, grad_attr, grad_weights))
    return {
        "pooled": pooled,
        "attr": attr,
        "weights": weights,
        "grad_x": x.grad,
        "grad_prototypes": prototypes.grad,
    }


def why_not(spec: str, x: torch.Tensor, prototypes: torch.Tensor, precision: str) -> str | None:
    """None if the backend of `spec` runs this call here, else the reason (import, device or case)."""
    try:
        module = get_backend(split_spec(spec)[0])
    except ValueError as exc:
        return str(exc)
    return module.availability(x.device) or module.unsupported(x, prototypes, check_options(precision=precision))


def precisions_for(spec: str, dtype_name: str) -> tuple[str, ...]:
    """The reference ignores precision; kernel backends are checked at IEEE and TF32 in float32."""
    if split_spec(spec)[0] != "reference" and dtype_name == "float32":
        return ("ieee", "tf32")
    return ("auto",)


def run_check(
    backends: list[str] | None = None,
    dtypes: list[str] | None = None,
    cases: tuple[Case, ...] = DEFAULT_CASES,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> list[CheckRow]:
    """Compare each (backend, dtype, precision, case) with the float64 CPU reference; backends
    may name a Triton strategy ('triton:gemm'), plain 'triton' checks each."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    backends = expand_specs(backends or available_backends(device))
    dtypes = dtypes or list(DTYPES)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for case in cases:
        x64, prototypes64 = make_inputs(case, torch.device("cpu"), generator)
        grads = (
            torch.randn(case.batch, case.d, generator=generator, dtype=torch.float64),
            torch.randn(case.batch, case.m, generator=generator, dtype=torch.float64),
            torch.randn(case.batch, case.n, generator=generator, dtype=torch.float64),
        )
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            x, prototypes = x64.to(device, dtype), prototypes64.to(device, dtype)
            # The oracle sees exactly the rounded inputs the backend sees.
            reference = run_with_grads(x.double().cpu(), prototypes.double().cpu(), grads, case, "reference", "auto")
            for backend in backends:
                for precision in precisions_for(backend, dtype_name):
                    tol = tolerance(dtype_name, precision, case.gamma)
                    row = CheckRow(backend, dtype_name, precision, case.label, tol)
                    reason = why_not(backend, x, prototypes, precision)
                    if reason is not None:
                        row.status, row.reason = "skipped", reason
                    else:
                        try:
                            outputs = run_with_grads(x, prototypes, grads, case, backend, precision)
                            row.errors = {q: rel_err(outputs[q], reference[q], zero_ref="inf") for q in QUANTITIES}
                            row.status = "pass" if max(row.errors.values()) <= row.tolerance else "FAIL"
                        except Exception as exc:  # a crashing backend is a failure, reported per row
                            row.status, row.reason = "FAIL", f"{type(exc).__name__}: {exc}"
                    rows.append(row)
    return rows


def check_table(rows: list[CheckRow]) -> str:
    """Plain-text table: one line per row, relative errors per quantity and the verdict."""
    header = ["backend", "dtype", "precision", "case", *QUANTITIES, "tol", "result"]
    lines = []
    for row in rows:
        errors = [f"{row.errors[q]:.1e}" if q in row.errors else "-" for q in QUANTITIES]
        verdict = row.status + (f" ({row.reason})" if row.reason else "")
        lines.append([row.backend, row.dtype, row.precision, row.case, *errors, f"{row.tolerance:.0e}", verdict])
    return format_table(header, lines)


def rows_as_dicts(rows: list[CheckRow]) -> list[dict]:
    """JSON-ready rows."""
    return [asdict(row) for row in rows]
