"""Sweep the Triton GSP kernels' launch configurations: time, bitwise determinism, accuracy.

GPU-time estimate, default sweep (128 configs: 48 forward, 48 backward, 32 coef_x): ~1.5-2 min on an H200 with 12 precompile processes (compile ~1-3 s per config, the small GEMM less, 128 x 2 s / 12 = ~21 s, plus ~10 s of process start), then ~0.3 s per config to check and time (do_bench ~0.1-0.3 s): ~40 s; ~5-6 min if compiled serially (--compile-workers 0), which --budget-s 180 cuts short, round-robin over the groups so each keeps its first candidates.

What it answers, at the target shape B=256 N=196 D=512 M=128 (gamma 5, transport_ratio 0.3,
lipschitz, euclidean, newton, max_iter / tol from gsp_kernels.backends.reference): which
(BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages) is fastest for the forward kernel and for
the backward, which (BLOCK_K, BLOCK_M, BLOCK_D, num_warps, num_stages, programs_wanted) for
the backward's split-K prototype-gradient GEMM ("coef_x", `_gsp_coef_x_kernel`), and which
strategy ("strategy": the fused kernels or the gemm strategy, forward+backward at their
defaults, `_triton.use_strategy`), in float32 (precision auto = tf32x3, and ieee), bfloat16, and
bfloat16 features with float32 prototypes (the GSP layer under autocast), and whether each config
is bitwise deterministic and accurate against a float64 reference. `--write-config` turns the
winners into the tuned-configuration file of gsp_kernels.backends.triton.tuning (bench/sweep_report.py); defaults
are always the built-in rules (a tuned file in force is set aside while sweeping).

How:
- `triton_launch.BLOCK_OVERRIDE` is set to the full config around the timed call only (and reset
  to None in a `finally`). It applies to the forward *and* the backward launch, so the two
  are swept separately: forward configs time `_triton.forward` alone; backward configs time
  `_triton.backward` alone, on a u computed once per (dtype, precision) with the default
  config. The backward's prototype-gradient GEMM (`_gsp_coef_x_kernel`) keeps its default config
  there (included in the backward time) and is swept by the coef_x groups through
  `triton_fused.GEMM_OVERRIDE` instead: they time `_triton.backward` the same way, with the
  backward kernel's default config, so a coef_x speedup is over the whole backward.
  programs_wanted (the split-K's target program count) is 1, 2 (default) or 4 per SM.
- Per config: one call (compile, or load from Triton's cache; compile/launch errors such as
  out-of-resources are recorded and the sweep goes on), --det-runs more calls compared with
  torch.equal on every output, ‖out − ref‖/‖ref‖ per output against a float64 reference
  computed once per dtype (gsp_kernels.backends.reference on the same rounded inputs), then the
  median of triton.testing.do_bench (GPU) or of the determinism runs' wall times
  (time.perf_counter, interpreter). The last output of do_bench's calls is compared too.
- On a GPU, --compile-workers processes first compile every config into Triton's on-disk
  cache (at a small batch with the same specializations), so the timing loop mostly loads.
- "best" in a group = the fastest config that is deterministic and accurate (max relative
  error <= the dtype's tolerance, 1e-5 float32 / 2e-2 bfloat16, or <= 2x the default's
  error), reported with its speedup over the default config measured in the same run.
  Results are written to --json after every config (a killed run keeps what it measured).

Usage:
  python bench/sweep_triton.py --json OUT.json                          # full sweep, GPU
  python bench/sweep_triton.py --dry-run                                # list the configs only
  python bench/sweep_triton.py --kernels forward --dtypes bfloat16 --max-configs 6
  python bench/sweep_triton.py --configs 64,128,64,8,1 --configs 32,128,64,4,2   # given configs
  python bench/sweep_triton.py --kernels coef_x --dtypes bfloat16 --configs 64,128,64,8,3,264
  TRITON_INTERPRET=1 python bench/sweep_triton.py --smoke --json /tmp/s.json   # CPU check

A config is written BLOCK_N,BLOCK_M,BLOCK_D,num_warps,num_stages (forward, backward) or
BLOCK_K,BLOCK_M,BLOCK_D,num_warps,num_stages,programs_wanted (coef_x; programs_wanted is a
count of programs, 264 = 2 per SM on an H200); --configs of one kind select their kernels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The interpreter is chosen when the Triton kernels are decorated, i.e. imported: without a
# GPU, set it before triton and the package are imported (a no-op if already imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (REPO_ROOT, REPO_ROOT / "bench"):  # the package without an install; sweep_report beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from sweep_report import (  # noqa: E402
    GEMM_KEYS, KEYS, config_header, config_key, config_keys, fmt, print_report, summarize, write_json,
    write_tuned_config,
)

from gsp_kernels.backends import reference as _reference  # noqa: E402
from gsp_kernels.backends import triton as _triton  # noqa: E402
from gsp_kernels.backends.triton import fused as triton_fused  # noqa: E402
from gsp_kernels.backends.triton import launch as triton_launch  # noqa: E402
from gsp_kernels.backends.triton import tuning  # noqa: E402
from gsp_kernels.contract import (  # noqa: E402
    COST_MODES, NORMALIZE_MODES, PRECISIONS, SOLVERS, GSPOptions, check_options, default_max_iter, default_tol,
    options_for_call,
)

KERNELS = ("strategy", "forward", "backward", "coef_x")
# (features, prototypes) dtypes by name; "bfloat16+float32" is the GSP layer under bf16 autocast
# (the projected map in bfloat16, the prototypes float32 parameters), the common training call.
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "bfloat16+float32": (torch.bfloat16, torch.float32),
}
DEFAULT_DTYPES = "float32,bfloat16,bfloat16+float32"
# SPEC.md's tolerances on ‖out − ref‖ / ‖ref‖ per features' dtype.
TOL = {"float32": 1e-5, "bfloat16": 2e-2, "bfloat16+float32": 2e-2}
FORWARD_OUTPUTS = ("pooled", "attr", "weights", "u")
BACKWARD_OUTPUTS = ("grad_x", "grad_prototypes")
TARGET_SHAPE = "256x196x512x128"
SMOKE_SHAPE = "2x9x20x7"
# Conservative shared-memory bound for the dot operand buffers (the H200 has 227 KB per block).
SMEM_LIMIT_BYTES = 200 * 1024
# Batch of the precompile workers' calls: same specializations as the target (B·N divisible by 16).
WORKER_BATCH = 16

# Candidates in priority order (a budget-limited run gets the first ones of every group):
# (BLOCK_N, BLOCK_M, BLOCK_D as a factor of the default's BLOCK_D, num_warps, num_stages).
# The default (triton_fused._tile_config), always measured first, is 64 x 128 x 32 (float32) or
# 64 x 64 x 64 (half), 8 warps, 3 stages for the forward, 64 x 64 x 32 (float32) or 64 x 32 x 64
# (half), 8 warps, 3 stages for the backward (whose tiles also set its grad_x GEMM's: BLOCK_N
# features by BLOCK_D columns, BLOCK_M prototypes per step). num_stages pipelines the loops
# that feed tl.dot. First come one-stage configs: the measured gain of pipelining. BLOCK_N also
# sets how many programs share a sample (⌈N / BLOCK_N⌉: 4 of 49 features at N = 196 with 64,
# 7 of 28 with 32, less padding for the float32 tensor-core work). Register counts below are
# Triton 3.9's builds; Triton 3.6 builds the half kernels larger, and every half-precision
# config launches with the library's register cap (two programs per SM, ``_launch_config``:
# 128 at 8 warps), so a wide 8-warp half tile is timed as the library would run it, spills
# included.
FORWARD_CANDIDATES = [
    (64, 128, 1, 8, 1),  # session-2 default
    (64, 64, 1, 8, 1),
    (64, 64, 1, 8, 3),  # half default: 122 registers, two programs per SM
    (64, 128, 1, 8, 3),  # float32 default
    (64, 64, 1, 8, 2),
    (64, 128, 1, 8, 2),
    (64, 64, 1, 8, 4),
    (64, 64, 2, 8, 3),
    (32, 64, 1, 4, 3),  # 168 registers at 4 warps (half): three programs per SM
    (64, 64, 1, 4, 3),
    (32, 128, 1, 4, 3),
    (128, 64, 1, 8, 3),
    (64, 128, 2, 8, 2),
    (32, 64, 2, 4, 2),
    (64, 128, 0.5, 8, 4),
    (16, 128, 1, 4, 3),
    (128, 128, 0.5, 8, 3),
    (32, 64, 1, 8, 3),
    (64, 32, 1, 4, 3),
    (32, 32, 2, 2, 2),
]
BACKWARD_CANDIDATES = [
    (64, 64, 1, 8, 1),  # one stage: the measured gain of pipelining
    (64, 32, 1, 8, 1),
    (64, 64, 1, 8, 3),  # float32 default; half: 167 registers, one program per SM
    (64, 32, 1, 8, 3),  # half default: 126 registers, two programs per SM
    (64, 32, 1, 8, 2),
    (64, 32, 1, 8, 4),
    (64, 32, 1, 4, 3),  # 150 registers (half): three 4-warp programs per SM
    (32, 32, 1, 4, 3),  # 94 registers (half): five per SM
    (64, 32, 0.5, 8, 3),
    (64, 64, 1, 8, 2),
    (64, 128, 1, 8, 2),  # one prototype tile: the costs once per feature tile
    (32, 64, 1, 4, 3),
    (128, 32, 1, 8, 3),
    (64, 16, 1, 4, 3),
    (32, 32, 2, 4, 3),
    (64, 32, 2, 8, 3),
    (128, 64, 1, 8, 2),
    (16, 32, 1, 2, 3),
    (64, 64, 0.5, 4, 4),
    (32, 64, 2, 8, 2),
]
# The prototype-gradient GEMM over all B·N features: (BLOCK_K, BLOCK_M, BLOCK_D, num_warps,
# num_stages, programs_wanted per SM). The default (first) is 64 x 64 x 64, 4 warps, 3 stages,
# 2 programs per SM (triton_fused._gemm_config), 16 tiles x 17 splits at the target shape on an H200.
GEMM_CANDIDATES = [
    (64, 64, 64, 4, 3, 2),  # default
    (64, 128, 64, 8, 3, 2),  # one prototype tile at M=128: each x tile read once
    (64, 64, 64, 4, 3, 1),  # half the splits: fewer partials to write and sum
    (64, 64, 64, 4, 3, 4),
    (64, 64, 64, 8, 4, 2),
    (128, 64, 64, 8, 2, 2),
    (32, 64, 64, 4, 4, 2),
    (64, 64, 128, 8, 3, 2),
    (64, 128, 128, 8, 2, 2),
    (32, 128, 64, 4, 3, 1),
    (64, 32, 64, 4, 3, 4),
    (128, 128, 64, 8, 2, 1),
]
# float32 with exact products (CUDA-core FMA, not the default path): the first this many.
IEEE_CANDIDATES = 8


@dataclass(frozen=True)
class Problem:
    batch: int
    n: int
    d: int
    m: int
    gamma: float
    mu: float
    normalize: str
    cost: str
    solver: str

    @property
    def label(self) -> str:
        return f"B{self.batch} N{self.n} D{self.d} M{self.m}"


@dataclass
class Group:
    """One (kernel, dtype, precision) sweep with its inputs, reference and candidates."""

    kernel: str
    dtype: str
    precision: str
    configs: list[dict] = field(default_factory=list)
    default: dict | None = None
    inputs: dict | None = None  # tensors, filled by prepare()

    @property
    def key(self) -> str:
        return f"{self.kernel} {self.dtype} {self.precision}"


# ----------------------------------------------------------------------------- configs


def parse_config(text: str) -> dict:
    parts = [int(p) for p in text.split(",")]
    for keys in (KEYS, GEMM_KEYS):
        if len(parts) == len(keys):
            return dict(zip(keys, parts))
    raise argparse.ArgumentTypeError(f"a config is {','.join(KEYS)} or {','.join(GEMM_KEYS)}, got {text!r}")


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape is BxNxDxM with positive sizes, got {text!r}")
    return tuple(parts)


def _pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def config_problem(config: dict, kernel: str, dtype: str) -> str | None:
    """Why a config cannot be launched by these kernels (None if it can)."""
    if kernel == "strategy":
        return None  # its configs are _triton.STRATEGIES' names (use_strategy checks them)
    for key in config_keys(kernel)[:3]:
        if not _pow2(config[key]) or config[key] < 16:  # tl.arange: powers of two; tl.dot: >= 16
            return f"{key}={config[key]} must be a power of two >= 16"
    if not _pow2(config["num_warps"]) or config["num_warps"] > 16:
        return f"num_warps={config['num_warps']} must be a power of two <= 16"
    if config["num_stages"] < 1:
        return "num_stages must be >= 1"
    elem = DTYPES[dtype][0].itemsize
    if kernel == "coef_x":
        if config["programs_wanted"] < 1:
            return "programs_wanted must be >= 1"
        bk, bm, bd = config["BLOCK_K"], config["BLOCK_M"], config["BLOCK_D"]
        per_stage = bm * bk * 4 + bk * bd * elem  # Vᵀ (float32, or bfloat16 hi + lo) and x tiles
    else:
        bn, bm, bd = config["BLOCK_N"], config["BLOCK_M"], config["BLOCK_D"]
        per_stage = (bn * bd + bd * bm) * elem  # x and zᵀ tiles of the cost dot
    if kernel == "backward":
        per_stage = max(per_stage, (bn * bm + bm * bd) * 4)  # V and z tiles of pass 2 (float32)
    if per_stage * config["num_stages"] > SMEM_LIMIT_BYTES:
        return f"~{per_stage * config['num_stages'] // 1024} KB of pipelined operands > {SMEM_LIMIT_BYTES // 1024} KB"
    return None


def sweep_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not triton_launch.INTERPRETED else "cpu")


def default_config(problem: Problem, kernel: str, dtype: str, device: torch.device | None = None) -> dict:
    """The config the kernels use today at this shape (no override) on `device` (default: the
    sweep's; the GEMM's programs_wanted depends on it)."""
    assert not triton_launch.BLOCK_OVERRIDE and not triton_fused.GEMM_OVERRIDE, "overrides must be None outside a measurement"
    # The inputs' shape, dtypes and device only: broadcast views of one element each.
    x_dtype, z_dtype = DTYPES[dtype]
    x = torch.empty((1, 1, 1), dtype=x_dtype, device=device or sweep_device()).expand(problem.batch, problem.n, problem.d)
    z = torch.empty((1, 1), dtype=z_dtype, device=x.device).expand(problem.m, problem.d)
    if kernel == "strategy":
        return {"strategy": _triton.strategy_for(x, z)}
    if kernel == "coef_x":
        config = triton_fused._gemm_config(problem.batch * problem.n, problem.m, problem.d, x.device)
    else:
        config = triton_fused._launch_config(problem.n, problem.m, problem.d, triton_launch.half_products(x, z), backward=kernel == "backward")
    return {k: int(config[k]) for k in config_keys(kernel)}


def candidate_configs(problem: Problem, kernel: str, dtype: str, precision: str, max_configs: int | None,
                      given: list[dict] | None) -> tuple[dict, list[dict]]:
    """(default, [default, candidates...]) clipped to the shape, deduplicated, valid."""
    default = default_config(problem, kernel, dtype)
    if given:
        raw = [dict(c) for c in given if set(c) == set(config_keys(kernel))]
    elif kernel == "strategy":
        raw = [{"strategy": name} for name in _triton.STRATEGIES]
    elif kernel == "coef_x":
        # programs_wanted per SM: the default's 2 per SM (triton_fused._programs_wanted) scaled.
        table = GEMM_CANDIDATES[:IEEE_CANDIDATES] if precision == "ieee" else GEMM_CANDIDATES
        raw = [
            {"BLOCK_K": bk, "BLOCK_M": bm, "BLOCK_D": bd, "num_warps": w, "num_stages": s,
             "programs_wanted": default["programs_wanted"] * per_sm // 2}
            for bk, bm, bd, w, s, per_sm in table
        ]
    else:
        table = FORWARD_CANDIDATES if kernel == "forward" else BACKWARD_CANDIDATES
        if precision == "ieee":
            table = table[:IEEE_CANDIDATES]
        raw = [
            {"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_D": int(default["BLOCK_D"] * df), "num_warps": w, "num_stages": s}
            for bn, bm, df, w, s in table
        ]
    # No tile larger than the padded dimension (those only add masked work).
    caps = {"BLOCK_N": problem.n, "BLOCK_M": problem.m, "BLOCK_D": problem.d, "BLOCK_K": problem.batch * problem.n}
    caps = {key: dim for key, dim in caps.items() if key in config_keys(kernel)}
    configs, seen = [default], {config_key(default)}
    for config in raw:
        for key, dim in caps.items():
            config[key] = max(16, min(config[key], triton_launch.next_pow2(dim)))
        key = config_key(config)
        if key in seen:
            continue
        why = config_problem(config, kernel, dtype)
        if why:
            print(f"  skip {kernel} {dtype} {key}: {why}")
            continue
        seen.add(key)
        configs.append(config)
    if max_configs is not None:
        configs = configs[:max(1, max_configs)]
    return default, configs


# ----------------------------------------------------------------------------- inputs and reference


def random_inputs(problem: Problem, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 features [B, N, D] and prototypes [M, D] on the CPU: norms spread over [0.3, 3]
    (both sides of the lipschitz threshold 1), 30% of the features near a prototype (noise
    0.05), like python_tests/oracles.random_inputs."""
    gen = torch.Generator().manual_seed(seed)

    def rows(count):
        direction = torch.randn(count, problem.d, generator=gen)
        direction = direction / torch.linalg.vector_norm(direction, dim=-1, keepdim=True).clamp_min(1e-6)
        return direction * (0.3 + 2.7 * torch.rand(count, 1, generator=gen))

    prototypes = rows(problem.m)
    x = rows(batch * problem.n)
    near = torch.rand(batch * problem.n, generator=gen) < 0.3
    picks = torch.randint(0, problem.m, (batch * problem.n,), generator=gen)
    jitter = 0.05 * torch.randn(batch * problem.n, problem.d, generator=gen)
    x = torch.where(near[:, None], prototypes[picks] + jitter, x)
    return x.reshape(batch, problem.n, problem.d), prototypes


def call_options(problem: Problem, precision: str) -> GSPOptions:
    """The options of the backend's forward and backward for ``problem`` (float32 compute)."""
    return options_for_call(
        check_options(problem.mu, problem.gamma, problem.normalize, problem.cost, problem.solver, precision=precision),
        problem.n, torch.float32,
    )


def make_tensors(problem: Problem, batch: int, dtype: str, device: torch.device, seed: int) -> dict:
    """Features and prototypes in `dtype`'s pair on `device`, and cotangents of the three outputs
    in the features' dtype (the outputs')."""
    x, z = random_inputs(problem, batch, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x_dtype, z_dtype = DTYPES[dtype]
    cot = [torch.randn(shape, generator=gen) for shape in ((batch, problem.d), (batch, problem.m), (batch, problem.n))]
    return {
        "x": x.to(device, x_dtype),
        "z": z.to(device, z_dtype),
        "cotangents": [c.to(device, x_dtype) for c in cot],
    }


def reference_outputs(problem: Problem, tensors: dict) -> dict:
    """float64 forward and backward on the same (rounded) values: {name: tensor}."""
    x64, z64 = tensors["x"].double(), tensors["z"].double()
    pooled, attr, weights, u = _reference.gsp_forward(
        x64, z64, problem.mu, problem.gamma, problem.normalize, problem.cost, problem.solver,
        default_max_iter(problem.solver), default_tol(torch.float64),
    )
    grad_x, grad_z = _reference.gsp_backward(
        *(c.double() for c in tensors["cotangents"]), x64, z64, u,
        problem.mu, problem.gamma, problem.normalize, problem.cost,
    )
    return {"pooled": pooled, "attr": attr, "weights": weights, "u": u, "grad_x": grad_x, "grad_prototypes": grad_z}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (inf for non-finite outputs)."""
    out64 = out.detach().double()
    if not bool(torch.isfinite(out64).all()):
        return math.inf
    denom = ref.norm().item()
    num = (out64 - ref).norm().item()
    return num / denom if denom > 0 else num


def kernel_call(group: Group, problem: Problem, config: dict | None = None):
    """A no-argument function running the group's kernel once, returning its outputs: the tile
    groups time the fused strategy (their overrides' kernels), the strategy group forward then
    backward (on the forward's u) of ``config``'s strategy."""
    t = group.inputs
    options = call_options(problem, group.precision)
    if group.kernel == "strategy":
        def forward_backward():
            with _triton.use_strategy(config["strategy"]):
                outputs = _triton.forward(t["x"], t["z"], options)
                return (*outputs, *_triton.backward(*t["cotangents"], t["x"], t["z"], outputs[3], options))

        return forward_backward
    if group.kernel == "forward":
        def forward():
            with _triton.use_strategy("fused"):
                return _triton.forward(t["x"], t["z"], options)

        return forward

    def backward():
        with _triton.use_strategy("fused"):
            return _triton.backward(*t["cotangents"], t["x"], t["z"], t["u"], options)

    return backward


# ----------------------------------------------------------------------------- measurement


def set_override(config: dict | None, kernel: str = "forward") -> None:
    """The config on the hook its kernel reads (GEMM_OVERRIDE for coef_x; the strategy group's
    configs act through kernel_call); None: both off."""
    tiles = config if config and kernel != "strategy" else None
    triton_launch.BLOCK_OVERRIDE = dict(tiles) if tiles and kernel != "coef_x" else None
    triton_fused.GEMM_OVERRIDE = dict(tiles) if tiles and kernel == "coef_x" else None


def context_ok(device: torch.device) -> bool:
    """False after a sticky CUDA error (e.g. an illegal address): nothing more can run."""
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
        return True
    except Exception:  # noqa: BLE001
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def blank_row(group: Group, config: dict, error: str | None = None) -> dict:
    """A result row of `config` with nothing measured yet (or only `error`)."""
    return {
        "kernel": group.kernel, "dtype": group.dtype, "precision": group.precision, "config": dict(config),
        "is_default": config == group.default, "ms": None, "deterministic": None, "det_runs": 0,
        "rel_err": {}, "max_rel_err": None, "tol": TOL[group.dtype], "accurate": None,
        "first_call_s": None, "error": error,
    }


def measure(group: Group, config: dict, problem: Problem, refs: dict, device: torch.device, args) -> dict:
    """One row: first-call time, determinism, errors and median time of one config."""
    names = {"forward": FORWARD_OUTPUTS, "strategy": FORWARD_OUTPUTS + BACKWARD_OUTPUTS}.get(group.kernel, BACKWARD_OUTPUTS)
    row = blank_row(group, config)
    call = kernel_call(group, problem, config)
    set_override(config, group.kernel)
    try:
        start = time.perf_counter()
        first = call()
        synchronize(device)
        row["first_call_s"] = round(time.perf_counter() - start, 4)
        row["rel_err"] = {name: rel_err(out, refs[name]) for name, out in zip(names, first)}
        row["max_rel_err"] = max(row["rel_err"].values())
        row["accurate"] = row["max_rel_err"] <= TOL[group.dtype]
        deterministic, wall = True, []
        for _ in range(args.det_runs):
            start = time.perf_counter()
            again = call()
            synchronize(device)
            wall.append(time.perf_counter() - start)
            deterministic &= all(torch.equal(a, b) for a, b in zip(first, again))
        row["det_runs"] = args.det_runs
        if device.type == "cuda":
            last = []

            def timed():
                last[:] = [call()]

            try:
                row["ms"] = float(triton.testing.do_bench(timed, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))
            except TypeError:  # a triton without return_mode
                row["ms"] = float(triton.testing.do_bench(timed, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.5])[0])
            synchronize(device)
            if last:
                deterministic &= all(torch.equal(a, b) for a, b in zip(first, last[0]))
                row["det_runs"] += 1
        elif wall:
            row["ms"] = statistics.median(wall) * 1e3
        row["deterministic"] = bool(deterministic)
    except Exception as exc:  # noqa: BLE001  (compile, resource or launch failure: record, go on)
        row["error"] = f"{type(exc).__name__}: {exc}"[:600]
    finally:
        set_override(None)
    return row


# ----------------------------------------------------------------------------- precompile workers


def worker_main(job_file: str) -> int:
    """Compile (by launching at a small batch) each job's config into Triton's on-disk cache."""
    spec = json.loads(Path(job_file).read_text())
    problem = Problem(**spec["problem"])
    device = sweep_device()
    batch = min(problem.batch, WORKER_BATCH)
    tensors = {}
    for job in spec["jobs"]:
        kernel, dtype, precision = job["kernel"], job["dtype"], job["precision"]
        if dtype not in tensors:
            tensors[dtype] = make_tensors(problem, batch, dtype, device, seed=0)
            tensors[dtype]["u"] = torch.zeros(batch, device=device)  # any finite u compiles the backward
        group = Group(kernel, dtype, precision, inputs=tensors[dtype])
        start, error, from_triton = time.perf_counter(), None, False
        set_override(job["config"], kernel)
        try:
            kernel_call(group, problem, job["config"])()
            synchronize(device)
        except Exception as exc:  # noqa: BLE001  (recorded; the main loop skips this config)
            error = f"{type(exc).__name__}: {exc}"[:600]
            from_triton = type(exc).__module__.startswith("triton") and "CUDA" not in str(exc)
        finally:
            set_override(None)
        line = {"index": job["index"], "seconds": round(time.perf_counter() - start, 3), "error": error,
                "compile_error": from_triton}
        print("JOB " + json.dumps(line), flush=True)
        if error and not from_triton:  # e.g. a CUDA error: this process's context may be unusable
            return 1
    return 0


def start_precompile(order: list[tuple[Group, dict]], problem: Problem, workers: int, scratch: Path) -> list:
    """Start `workers` processes compiling the configs (round-robin in sweep order) into
    Triton's on-disk cache; collect_precompile() waits for them."""
    jobs = [
        {"index": i, "kernel": g.kernel, "dtype": g.dtype, "precision": g.precision, "config": c}
        for i, (g, c) in enumerate(order)
    ]
    procs = []
    for w in range(workers):
        mine = jobs[w::workers]
        if not mine:
            continue
        job_file = scratch / f"jobs{w}.json"
        job_file.write_text(json.dumps({"problem": problem.__dict__, "jobs": mine}))
        out = open(scratch / f"worker{w}.out", "w")  # noqa: SIM115  (closed in collect_precompile)
        err = open(scratch / f"worker{w}.err", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--_compile-worker", str(job_file)],
            stdout=out, stderr=err, cwd=str(REPO_ROOT),
        )
        procs.append((w, proc, out, err))
    print(f"precompile: {len(jobs)} configs on {len(procs)} processes", flush=True)
    return procs


def collect_precompile(procs: list, deadline: float, scratch: Path, jobs: int) -> dict:
    """Wait for the workers until the deadline (then stop them); {index: worker line}."""
    for w, proc, out, err in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by its handle
            proc.wait()
            print(f"  worker {w}: stopped at the precompile deadline", flush=True)
        out.close()
        err.close()
        if proc.returncode not in (0, -9):
            tail = (scratch / f"worker{w}.err").read_text()[-1500:]
            print(f"  worker {w}: exit {proc.returncode}\n{tail}", flush=True)
    done = {}
    for w, *_ in procs:
        for line in (scratch / f"worker{w}.out").read_text().splitlines():
            if line.startswith("JOB "):
                entry = json.loads(line[4:])
                done[entry["index"]] = entry
    seconds = [e["seconds"] for e in done.values()]
    if seconds:
        print(f"precompile: {len(done)}/{jobs} done, median {statistics.median(seconds):.2f} s per config "
              f"(max {max(seconds):.2f} s, {sum(seconds):.0f} s of compile in all)", flush=True)
    return done


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=parse_shape, default=None, help=f"BxNxDxM (default {TARGET_SHAPE}; smoke {SMOKE_SHAPE})")
    p.add_argument("--gamma", type=float, default=5.0)
    p.add_argument("--transport-ratio", type=float, default=0.3)
    p.add_argument("--normalize", default="lipschitz", choices=NORMALIZE_MODES)
    p.add_argument("--cost", default="euclidean", choices=COST_MODES)
    p.add_argument("--solver", default="newton", choices=SOLVERS)
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {', '.join(KERNELS)}")
    p.add_argument("--dtypes", default=None, help=f"comma list of {', '.join(DTYPES)} (features+prototypes; default "
                   f"{DEFAULT_DTYPES}, --smoke: float32)")
    p.add_argument("--precisions", default="auto,ieee", help="float32 precisions (bfloat16 always runs auto)")
    p.add_argument("--configs", type=parse_config, action="append", default=None,
                   help="sweep only these configs (repeatable): BLOCK_N,BLOCK_M,BLOCK_D,num_warps,num_stages for "
                        "forward/backward, BLOCK_K,BLOCK_M,BLOCK_D,num_warps,num_stages,programs_wanted for coef_x")
    p.add_argument("--max-configs", type=int, default=None, help="at most this many configs per group (priority order)")
    p.add_argument("--budget-s", type=float, default=180.0, help="no new config starts after this many seconds")
    p.add_argument("--det-runs", type=int, default=2, help="calls compared bitwise with the first one")
    p.add_argument("--warmup-ms", type=int, default=10, help="do_bench warmup")
    p.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition time")
    p.add_argument("--compile-workers", type=int, default=None,
                   help="processes precompiling the configs on a GPU (default min(12, cpus - 2); 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--write-config", metavar="PATH", default=None,
                   help="write (or merge into) a tuned-configuration file for this GPU and Triton (gsp_kernels.backends.triton.tuning): "
                        "per dtype the fastest deterministic, accurate strategy and tiles; a folder gets the standard name")
    p.add_argument("--commit", default=os.environ.get("GSP_COMMIT"),
                   help="the commit measured, recorded in --write-config's file (default $GSP_COMMIT, else git)")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny shape {SMOKE_SHAPE}, two configs per kernel, auto precision, float32 unless --dtypes "
                        "(CPU: interpreter)")
    p.add_argument("--dry-run", action="store_true", help="print the groups and configs, run nothing")
    p.add_argument("--_compile-worker", dest="compile_worker", default=None, help=argparse.SUPPRESS)
    return p


def smoke_configs(problem: Problem, kernel: str, dtype: str = "float32") -> list[dict]:
    """Two configs: the default and one with small D tiles (D spans two tiles); for coef_x
    also small feature tiles and twice the programs (the features then split in two); for the
    strategy group both strategies."""
    default = default_config(problem, kernel, dtype)
    if kernel == "strategy":
        return [default, *({"strategy": name} for name in _triton.STRATEGIES if name != default["strategy"])]
    small = {**default, "BLOCK_D": 16, "num_warps": 2, "num_stages": 2}
    if kernel == "coef_x":
        small.update(BLOCK_K=16, programs_wanted=2 * default["programs_wanted"])
    return [default, small]


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    # Defaults are the built-in rules, not a tuned file already in force (workers inherit this).
    saved = os.environ.get(tuning.ENV_VAR)
    os.environ[tuning.ENV_VAR] = "none"
    tuning.clear_cache()
    try:
        return worker_main(args.compile_worker) if args.compile_worker else sweep(args, argv)
    finally:
        if saved is None:
            os.environ.pop(tuning.ENV_VAR, None)
        else:
            os.environ[tuning.ENV_VAR] = saved
        tuning.clear_cache()


def sweep(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """The sweep main() runs: groups, precompile, measurements, report (and tuned file)."""
    t0 = time.monotonic()
    device = sweep_device()
    unavailable = _triton.availability(device)
    if unavailable:
        raise SystemExit(f"triton backend unavailable on {device}: {unavailable}")
    batch, n, d, m = args.shape or parse_shape(SMOKE_SHAPE if args.smoke else TARGET_SHAPE)
    problem = Problem(batch, n, d, m, args.gamma, args.transport_ratio, args.normalize, args.cost, args.solver)
    kernels = [k for k in args.kernels.split(",") if k]
    dtypes = [t for t in (args.dtypes or ("float32" if args.smoke else DEFAULT_DTYPES)).split(",") if t]
    precisions = [p for p in args.precisions.split(",") if p]
    if args.smoke:
        precisions = ["auto"]
    if device.type == "cpu" and "bfloat16" in dtypes and not args.dry_run:
        print("bfloat16 dropped: the interpreter's tl.dot is not reliable in bfloat16 (float32 and mixed dtypes, whose "
              "dots run in float32, only on the CPU)")
        dtypes = [t for t in dtypes if t != "bfloat16"]
    for name, values, allowed in (("kernels", kernels, KERNELS), ("dtypes", dtypes, DTYPES), ("precisions", precisions, PRECISIONS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"--{name}: unknown {bad}, choose from {list(allowed)}")

    if args.configs:  # configs of one kind (5 or 6 numbers) select the kernels that take them
        kernels = [k for k in kernels if any(set(c) == set(config_keys(k)) for c in args.configs)]
        if not kernels:
            raise SystemExit("--configs: none of them fits the --kernels chosen")

    # Groups, most used path first: bfloat16 and float32 auto, forward, backward, then coef_x.
    groups = []
    for dtype in dtypes:
        for precision in (precisions if dtype == "float32" else ["auto"]):
            for kernel in kernels:
                group = Group(kernel, dtype, precision)
                if args.smoke:
                    group.default = default_config(problem, kernel, dtype)
                    group.configs = smoke_configs(problem, kernel, dtype)
                else:
                    group.default, group.configs = candidate_configs(
                        problem, kernel, dtype, precision, args.max_configs, args.configs
                    )
                groups.append(group)
    groups.sort(key=lambda g: (g.precision == "ieee", g.dtype != "bfloat16", KERNELS.index(g.kernel)))
    # Round-robin over the groups by candidate rank: a budget cut leaves every group its first ones.
    order = []
    for rank in range(max(len(g.configs) for g in groups)):
        order += [(g, g.configs[rank]) for g in groups if rank < len(g.configs)]

    if args.dry_run:
        for group in groups:
            print(f"{group.key}: default {config_key(group.default)}; {len(group.configs)} configs "
                  f"({config_header(group.kernel)}): " + " ".join(config_key(c) for c in group.configs))
        per_kernel = ", ".join(f"{k} {sum(len(g.configs) for g in groups if g.kernel == k)}" for k in kernels)
        print(f"{len(order)} configs in all ({per_kernel})")
        return {"groups": {g.key: g.configs for g in groups}, "order": [(g.key, c) for g, c in order]}

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"B": batch, "N": n, "D": d, "M": m},
        "problem": problem.__dict__,
        "max_iter": default_max_iter(problem.solver), "tol": default_tol(torch.float32),
        "timer": "triton.testing.do_bench median" if device.type == "cuda" else "time.perf_counter median of the determinism runs",
        "budget_s": args.budget_s, "budget_reached": False, "elapsed_s": 0.0,
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "defaults": {g.key: g.default for g in groups},
        "precompile": None, "aborted": None, "rows": [], "not_run": [],
    }
    print(f"sweep on {report['device']}: {problem.label}, {len(order)} configs in {len(groups)} groups, "
          f"budget {args.budget_s:.0f} s", flush=True)

    workers = args.compile_workers
    if workers is None:
        workers = min(12, max(0, (os.cpu_count() or 1) - 2)) if device.type == "cuda" and not args.smoke else 0
    with tempfile.TemporaryDirectory(prefix="sweep_triton_") as scratch:
        compiled, procs = {}, []
        if workers > 0:  # on the CPU only to exercise this path: the interpreter has no cache
            procs = start_precompile(order, problem, workers, Path(scratch))

        # Inputs and the float64 reference, once per dtype; u once per (dtype, precision) from
        # the default config, for the backward and coef_x groups (both time _triton.backward).
        tensors, refs, us = {}, {}, {}
        for dtype in dtypes:
            tensors[dtype] = make_tensors(problem, batch, dtype, device, args.seed)
            refs[dtype] = reference_outputs(problem, tensors[dtype])
        for group in groups:
            group.inputs = dict(tensors[group.dtype])
            if group.kernel != "forward":
                assert triton_launch.BLOCK_OVERRIDE is None and triton_fused.GEMM_OVERRIDE is None
                if (group.dtype, group.precision) not in us:
                    us[group.dtype, group.precision] = _triton.forward(
                        group.inputs["x"], group.inputs["z"], call_options(problem, group.precision)
                    )[3]
                group.inputs["u"] = us[group.dtype, group.precision]
        synchronize(device)
        print(f"inputs and references ready at {time.monotonic() - t0:.1f} s", flush=True)
        if procs:
            compiled = collect_precompile(procs, t0 + 0.6 * args.budget_s, Path(scratch), len(order))
            report["precompile"] = {
                "workers": len(procs), "done": len(compiled), "jobs": len(order),
                "elapsed_s": round(time.monotonic() - t0, 2),
                "seconds": [compiled[i]["seconds"] for i in sorted(compiled)],
            }

        for index, (group, config) in enumerate(order):
            elapsed = time.monotonic() - t0
            if elapsed > args.budget_s:
                report["budget_reached"] = True
                report["not_run"] = [
                    {"kernel": g.kernel, "dtype": g.dtype, "precision": g.precision, "config": c}
                    for g, c in order[index:]
                ]
                print(f"budget of {args.budget_s:.0f} s reached: {len(order) - index} configs not run", flush=True)
                break
            entry = compiled.get(index, {})
            worker_error = entry.get("error") if entry.get("compile_error") else None
            if worker_error:  # failed to compile/launch in the worker: do not pay for it again
                row = blank_row(group, config, error="precompile: " + worker_error)
            else:
                row = measure(group, config, problem, refs[group.dtype], device, args)
            report["rows"].append(row)
            report["elapsed_s"] = round(time.monotonic() - t0, 2)
            write_json(report, args.json)
            status = row["error"][:80] if row["error"] else (
                f"{fmt(row['ms'], '.4f')} ms det={fmt(row['deterministic'])} err={fmt(row['max_rel_err'], '.1e')} "
                f"first={fmt(row['first_call_s'], '.2f')} s"
            )
            print(f"[{report['elapsed_s']:6.1f} s] {group.key:<24} {config_key(config):<20} {status}", flush=True)
            if row["error"] and device.type == "cuda" and not context_ok(device):
                report["aborted"] = f"CUDA context unusable after {group.key} {config_key(config)}: {row['error']}"
                report["not_run"] = [
                    {"kernel": g.kernel, "dtype": g.dtype, "precision": g.precision, "config": c}
                    for g, c in order[index + 1:]
                ]
                print(report["aborted"], flush=True)
                break

    report["elapsed_s"] = round(time.monotonic() - t0, 2)
    report["summary"] = [
        {k: s[k] for k in ("kernel", "dtype", "precision", "speedup_over_default")}
        | {"default": s["default"]["config"] if s["default"] else None,
           "default_ms": s["default"]["ms"] if s["default"] else None,
           "best": s["best"]["config"] if s["best"] else None,
           "best_ms": s["best"]["ms"] if s["best"] else None}
        for s in summarize(report)
    ]
    if args.write_config:
        report["tuned_config"] = write_tuned_config(report, problem, args)
    write_json(report, args.json)
    print_report(report)
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
