"""The sweep's configurations (bench/sweep_triton.py): the swept problem, the dtype pairs, the
candidate tiles of each kernel in priority order, the rules a config must meet to launch, the
kernels' default config at a shape, and each group's candidate list (full, given or smoke)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from sweep_report import GEMM_KEYS, KEYS, config_key, config_keys

from gsp_kernels.backends import triton as _triton
from gsp_kernels.backends.triton import fused as triton_fused
from gsp_kernels.backends.triton import launch as triton_launch
from gsp_kernels.testing import Shape

KERNELS = ("strategy", "forward", "backward", "coef_x")
# (features, prototypes) dtypes by name; "bfloat16+float32" is the GSP layer under bf16 autocast
# (the projected map in bfloat16, the prototypes float32 parameters), the common training call.
DTYPES = {
    "float32": (torch.float32, torch.float32),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "bfloat16+float32": (torch.bfloat16, torch.float32),
}
DEFAULT_DTYPES = "float32,bfloat16,bfloat16+float32"
# Conservative shared-memory bound for the dot operand buffers (the H200 has 227 KB per block).
SMEM_LIMIT_BYTES = 200 * 1024

# Candidates in priority order (a budget-limited run gets the first ones of every group):
# (BLOCK_N, BLOCK_M, BLOCK_D as a factor of the default's BLOCK_D, num_warps, num_stages).
# The default (triton_fused.tile_config), always measured first, is 64 x 128 x 32 (float32) or
# 64 x 64 x 64 (half), 8 warps, 3 stages for the forward, 64 x 64 x 32 (float32) or 64 x 32 x 64
# (half), 8 warps, 3 stages for the backward (whose tiles also set its grad_x GEMM's: BLOCK_N
# features by BLOCK_D columns, BLOCK_M prototypes per step). num_stages pipelines the loops
# that feed tl.dot. First come one-stage configs: the measured gain of pipelining. BLOCK_N also
# sets how many programs share a sample (⌈N / BLOCK_N⌉: 4 of 49 features at N = 196 with 64,
# 7 of 28 with 32, less padding for the float32 tensor-core work). Register counts below are
# Triton 3.9's builds; Triton 3.6 builds the half kernels larger, and every half-precision
# config launches with the library's register cap (two programs per SM, ``launch_config``:
# 128 at 8 warps), so a wide 8-warp half tile is timed as the library would run it, spills
# included.
FORWARD_CANDIDATES = [
    (64, 128, 1, 8, 1),  # the default before pipelining (one stage)
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
# 2 programs per SM (triton_fused.gemm_config), 16 tiles x 17 splits at the target shape on an H200.
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
    """The swept call: its shape and its options (the report's "problem")."""

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
        return Shape(self.batch, self.n, self.d, self.m).label


def parse_config(text: str) -> dict:
    parts = [int(p) for p in text.split(",")]
    for keys in (KEYS, GEMM_KEYS):
        if len(parts) == len(keys):
            return dict(zip(keys, parts))
    raise argparse.ArgumentTypeError(f"a config is {','.join(KEYS)} or {','.join(GEMM_KEYS)}, got {text!r}")


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
        config = triton_fused.gemm_config(problem.batch * problem.n, problem.m, problem.d, x.device)
    else:
        config = triton_fused.launch_config(problem.n, problem.m, problem.d, triton_launch.half_products(x, z), backward=kernel == "backward")
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
        # programs_wanted per SM: the default's 2 per SM (triton_fused.programs_wanted) scaled.
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
