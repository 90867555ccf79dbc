"""The math contract in code (docs/math.md): its constants, its modes and their kernel codes, the
dtype policy, the defaults, the options object and the checks of those options.

``gsp_pool`` (``ops``), every backend and the ``GSP`` layer take these from here, so that one
option is accepted or refused with one message wherever it is given. The CUDA kernels'
``csrc/gsp_math.h`` spells the constants and codes again in C++; python_tests/test_contract.py
checks that it matches this module.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

# Squared costs at or below snap·(|x̂|² + |ẑ|²) are exactly 0 (docs/math.md, Forward): the
# GEMM-shaped expansion |x̂|² + |ẑ|² − 2 x̂·ẑ cancels catastrophically for a feature equal to a
# prototype (float32 leaves ~5e-7 relative noise, whose square root would be a spurious distance
# of ~7e-4), so an exact match costs exactly 0 in every backend. The radius follows the compute
# dtype: float32 (every kernel backend) cannot resolve a distance below ~3e-3·|x̂| through the
# expansion anyway; float64 resolves ~5e-7·|x̂|.
COST_SNAP = 4e-6
COST_SNAP_FLOAT64 = 1e-13
# l2 normalization divides by max(|x|, L2_EPS).
L2_EPS = 1e-12

DEFAULT_TRANSPORT_RATIO = 0.3  # μ of the authors' configurations
DEFAULT_GAMMA = 5.0  # γ of the authors' TensorFlow configurations

NORMALIZE_MODES = ("lipschitz", "l2", "none")
COST_MODES = ("euclidean", "sqeuclidean")
SOLVERS = ("newton", "unrolled", "fixed_point")
KERNEL_SOLVERS = ("newton", "fixed_point")  # what the kernels run (``kernel_options`` maps the rest)
PRECISIONS = ("auto", "ieee", "tf32", "tf32x3")
# The kernels' codes for the modes: Triton constexprs, and the enums of csrc/gsp_math.h.
NORMALIZE_CODES = {"lipschitz": 0, "l2": 1, "none": 2}
COST_CODES = {"euclidean": 0, "sqeuclidean": 1}

# The dtypes the op takes, by their names (the CLI's, the benchmarks' and the tuned files').
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
HALF_DTYPES = (torch.bfloat16, torch.float16)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half types are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def autocast_off(device_type: str):
    """torch.autocast disabled inside, where it is on. The op computes in ``compute_dtype`` by its
    own policy, but its body runs under the caller's autocast (a custom op without an autocast
    kernel falls through it, and so does an autograd.Function), which would cast every matmul
    inside to half precision."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def default_tol(dtype: torch.dtype) -> float:
    """Newton tolerance on |Σσ − μN| / (μN) and on the relative step, per compute dtype."""
    return 1e-13 if dtype == torch.float64 else 1e-6


# The unrolled solve's step count: the fewest with which the float32 solve meets docs/math.md,
# Accuracy, and has converged (within 1e-5 of Newton's root) over every accepted μ and γ
# (bench/unrolled_steps.py measures it; docs/math.md, The scalar solve).
UNROLLED_STEPS = 24


def default_max_iter(solver: str) -> int:
    """Iteration cap or count: the paper's 100 for fixed_point, ``UNROLLED_STEPS`` for unrolled, a
    safety cap for Newton."""
    return {"fixed_point": 100, "unrolled": UNROLLED_STEPS}.get(solver, 64)


def cost_snap(dtype: torch.dtype) -> float:
    """Relative snap radius (squared) for costs computed in `dtype`."""
    return COST_SNAP_FLOAT64 if dtype == torch.float64 else COST_SNAP


class GSPOptions(NamedTuple):
    """The options of one GSP call (docs/math.md): what the backends take. ``check_options`` builds
    them checked; a backend's forward takes them resolved for the call (``tol`` and ``max_iter``
    set), its backward the fields that define the function (``backward_options``). The
    dispatcher's op schema takes them as scalars in this order (``ops``)."""

    transport_ratio: float | Tensor  # μ in (0, 1]; a tensor: 0-d or per sample [B] (docs/math.md, Learned μ and γ)
    gamma: float | Tensor  # γ > 0; a tensor as transport_ratio
    normalize: str = "lipschitz"
    cost: str = "euclidean"
    solver: str = "newton"
    max_iter: int | None = None  # None: default_max_iter(solver)
    tol: float | None = None  # None: default_tol of the call's compute dtype
    precision: str = "auto"


def backward_options(options: GSPOptions) -> GSPOptions:
    """The options a backward reads: the fields that define the function (the solve's are left at
    their defaults: the backward depends on the root u, not on how it was found)."""
    return GSPOptions(options.transport_ratio, options.gamma, options.normalize, options.cost,
                      precision=options.precision)


def kernel_options(options: GSPOptions) -> GSPOptions:
    """The options a kernel backend takes for a call: ``unrolled`` becomes ``newton`` (the kernels'
    Newton runs per sample on the device, with no host control flow, capped at the same steps);
    the others as they are."""
    return options._replace(solver="newton") if options.solver == "unrolled" else options


def check_choice(name: str, value, choices) -> None:
    """ValueError unless ``value`` is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_tensor(name: str, t) -> None:
    """TypeError unless ``t`` is a floating tensor of a dtype the op takes; ValueError if empty."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPE_NAMES:
        raise TypeError(f"{name} must be float64, float32, bfloat16 or float16, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def check_real(name: str, value, *, positive: bool) -> float:
    """``value`` as a float: a real number (Python's or NumPy's, not a bool), finite, and > 0 if
    ``positive``."""
    # int/float first: under torch.compile a float argument may be symbolic, and is one of those.
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    # Comparisons, not math.isfinite: under torch.compile a float argument may be symbolic.
    if not -math.inf < value < math.inf or (positive and value <= 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {value}")
    return value


def largest_cost(normalize: str, cost: str) -> float | None:
    """The largest cost a pair can have: 2 (``euclidean``) or 4 (``sqeuclidean``) between rows of
    norm at most 1 (``lipschitz``, ``l2``); None without normalization (the data's scale)."""
    if normalize == "none":
        return None
    return 2.0 if cost == "euclidean" else 4.0


# The largest rounding error of the logits −γc the plan tolerates: eps·γ·(largest cost) beyond it
# and the weights are off by that much (docs/math.md, Dtypes and their limits).
LOGIT_RESOLUTION = 0.1


def _check_representable(mu: float, gamma: float, normalize: str, cost: str, n: int, dtype: torch.dtype) -> None:
    """ValueError where ``dtype`` cannot represent the solve of N features (docs/math.md, Dtypes and
    their limits): the logits −γc summed over the N features (the solve's start and bracket) must
    stay within half the dtype's range, and their rounding, eps·γ·c, within ``LOGIT_RESOLUTION``,
    with c the largest cost (taken as 1 without normalization, where the data sets it); and μ must
    be a normal number, whose shares σ ≈ μ the dtype resolves."""
    limits = torch.finfo(dtype)
    cost_bound = largest_cost(normalize, cost)
    cost_text = f"the largest cost ({cost_bound:g})" if cost_bound else "the costs (unbounded with normalize='none', taken as 1)"
    if gamma * (cost_bound or 1.0) * n > limits.max / 2:
        raise ValueError(
            f"gamma={gamma:g} overflows {dtype}, the compute dtype of these inputs (float64 inputs compute in float64): "
            f"gamma x {cost_text} x N ({n}) must stay below {limits.max / 2:.3g}"
        )
    if limits.eps * gamma * (cost_bound or 1.0) > LOGIT_RESOLUTION:
        raise ValueError(
            f"gamma={gamma:g} is too large for {dtype} to resolve the plan ({dtype} is the compute dtype of these inputs): the "
            f"logits -gamma x cost round to within eps x gamma x {cost_text} = {limits.eps * gamma * (cost_bound or 1.0):.3g}, "
            f"above {LOGIT_RESOLUTION:g}, and the weights would be off by as much; lower gamma to "
            f"{LOGIT_RESOLUTION / (limits.eps * (cost_bound or 1.0)):.3g} or less"
            + (", or compute in float64 (float64 inputs)" if dtype != torch.float64 else "")
        )
    if mu < limits.tiny:
        raise ValueError(f"transport_ratio={mu:g} is too small: it is below {dtype}'s smallest normal number {limits.tiny:g}")


def _check_ratio(mu: float, what: str = "") -> None:
    """ValueError unless μ ∈ (0, 1] (after ``check_real``)."""
    if mu > 1.0:
        raise ValueError(f"transport_ratio must be in (0, 1], got {mu}{what}")


def check_options(
    transport_ratio=DEFAULT_TRANSPORT_RATIO, gamma=DEFAULT_GAMMA, normalize="lipschitz", cost="euclidean",
    solver="newton", max_iter=None, tol=None, precision="auto", *, n: int | None = None,
    dtype: torch.dtype | None = None, batch: int | None = None, device: torch.device | None = None,
    check_values: bool = True,
) -> GSPOptions:
    """The checked ``GSPOptions``, max_iter defaulted by solver; TypeError or ValueError naming the
    first option that is not accepted. Given the call's N and compute ``dtype``, also what that
    dtype must represent, and tol defaulted for it (the options a backend's forward takes);
    without them tol stays None when not given (a layer's options, before any call).

    transport_ratio and gamma may be tensors (``check_parameter_tensor``, with the call's
    ``batch`` and ``device`` when given); their values are checked against the same bounds with
    one device sync when ``check_values`` (``runs_eagerly``: not while tracing), and kept as
    tensors in the options."""
    tensors = {name: value for name, value in (("transport_ratio", transport_ratio), ("gamma", gamma))
               if isinstance(value, Tensor)}
    if tensors:
        return _check_tensor_options(tensors, transport_ratio, gamma, normalize, cost, solver, max_iter, tol,
                                     precision, n=n, dtype=dtype, batch=batch, device=device, check_values=check_values)
    mu = check_real("transport_ratio", transport_ratio, positive=True)
    _check_ratio(mu)
    gamma = check_real("gamma", gamma, positive=True)
    check_choice("normalize", normalize, NORMALIZE_MODES)
    check_choice("cost", cost, COST_MODES)
    check_choice("solver", solver, SOLVERS)
    if max_iter is None:
        max_iter = default_max_iter(solver)
    elif isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if dtype is not None:
        _check_representable(mu, gamma, normalize, cost, n, dtype)
    if tol is not None:
        tol = check_real("tol", tol, positive=True)
    elif dtype is not None:
        tol = default_tol(dtype)
    check_choice("precision", precision, PRECISIONS)
    return GSPOptions(mu, gamma, normalize, cost, solver, max_iter, tol, precision)


def check_parameter_tensor(name: str, value: Tensor, batch: int | None = None, device: torch.device | None = None) -> None:
    """A tensor μ or γ: TypeError unless floating; ValueError unless 0-d or ``[B]`` (``[B]`` of the
    call's batch when given) and on the call's device when given."""
    if value.dtype not in DTYPE_NAMES:
        raise TypeError(f"{name} as a tensor must be float64, float32, bfloat16 or float16, got {value.dtype}")
    if value.dim() > 1 or (value.dim() == 1 and batch is not None and value.shape[0] != batch):
        expected = "[] or [B]" if batch is None else f"[] or [{batch}] (one value per sample)"
        raise ValueError(f"{name} as a tensor must have shape {expected}, got {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but x is on {device}")


def _check_tensor_options(tensors: dict, transport_ratio, gamma, normalize, cost, solver, max_iter, tol, precision,
                          *, n, dtype, batch, device, check_values: bool) -> GSPOptions:
    """``check_options`` where μ or γ is a tensor: its kind, and with ``check_values`` its values (one
    sync for both tensors) by the scalar checks at their extremes; the tensors kept in the options."""
    for name, value in tensors.items():
        check_parameter_tensor(name, value, batch, device)
    options = check_options(  # the other options, and μ or γ given as a number
        1.0 if "transport_ratio" in tensors else transport_ratio, 1.0 if "gamma" in tensors else gamma,
        normalize, cost, solver, max_iter, tol, precision,
    )
    # Unknown bounds that pass _check_representable: μ = 1 and γ = 0.
    mu_smallest = 1.0 if "transport_ratio" in tensors else options.transport_ratio
    gamma_largest = 0.0 if "gamma" in tensors else options.gamma
    if check_values:
        extremes = torch.stack([reduce(t.detach()).double() for t in tensors.values() for reduce in (torch.amin, torch.amax)])
        values = extremes.tolist()  # the one device sync
        for i, name in enumerate(tensors):
            for value, which in ((values[2 * i], "smallest"), (values[2 * i + 1], "largest")):
                try:
                    check_real(name, value, positive=True)
                    if name == "transport_ratio":
                        _check_ratio(value)
                except ValueError as exc:
                    which = f"the {which} value" if tensors[name].numel() > 1 else "the value"
                    raise ValueError(f"{exc} ({which} of the {name} tensor)") from None
        mu_smallest = values[0] if "transport_ratio" in tensors else mu_smallest
        gamma_largest = values[-1] if "gamma" in tensors else gamma_largest
    if dtype is not None:
        try:
            _check_representable(mu_smallest, gamma_largest, normalize, cost, n, dtype)
        except ValueError as exc:
            raise ValueError(f"{exc} (the extreme value of the tensor)" if tensors else str(exc)) from None
        if tol is None:
            options = options._replace(tol=default_tol(dtype))
    return options._replace(transport_ratio=tensors.get("transport_ratio", options.transport_ratio),
                            gamma=tensors.get("gamma", options.gamma))


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)  # nn.Parameter: learnable prototypes, μ, γ


def runs_eagerly(*tensors: Tensor) -> bool:
    """True for an eager call on plain tensors: not while tracing (``torch.compile``/``torch.export``),
    under functorch transforms (``vmap``), for tensor subclasses (fake tensors) or meta tensors.
    Only then are tensor values read on the host."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or any(t.device.type == "meta" or type(t) not in _PLAIN_TENSOR_TYPES for t in tensors)
    )


def check_mask(mask, x: Tensor) -> Tensor:
    """The mask of valid positions as ``[B, N]``: a bool tensor ``[B, N]`` for x ``[B, N, D]``, or
    ``[B, H, W]`` for a map ``[B, D, H, W]``, on x's device. TypeError for a non-tensor or another
    dtype, ValueError for a wrong shape or device."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True at valid positions), got {mask.dtype}")
    expected = (x.shape[0], x.shape[1]) if x.dim() == 3 else (x.shape[0], *x.shape[2:])
    if tuple(mask.shape) != expected:
        layout = "[B, N]" if x.dim() == 3 else "[B, H, W]"
        raise ValueError(f"mask must be {layout} = {expected} for x of shape {tuple(x.shape)}, got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
    return mask if x.dim() == 3 else mask.flatten(1)
