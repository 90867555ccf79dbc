"""Host-side launch helpers that both strategies of the `triton` backend share: the knobs of the
launches, how a sample splits across programs, the register cap of the half-precision kernels,
the precision of the cost products, and the launches of the per-sample kernels (``kernels``)
that both strategies run: ``fused`` with the products computed inside, ``gemm`` with them given.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from ...contract import COST_SNAP, HALF_DTYPES, NORMALIZE_CODES, GSPOptions
from .kernels import _gsp_backward_kernel, _gsp_forward_kernel, _gsp_norms_kernel

# How the kernels were built: triton.jit picks the interpreter at decoration time.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The half-precision per-sample kernels' occupancy target: programs in an SM's 64K registers
# (sm_80 and sm_90), two so that one program's memory waits overlap the other's work; 1 lifts
# the register cap that holds it (bench/profile_backends.py compares).
REGISTERS_PER_SM = 65536
PROGRAMS_PER_SM = 2
# Tests may set this to a dict with any of BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages
# to force tiling at small sizes (both strategies' per-sample kernels).
BLOCK_OVERRIDE: dict | None = None
# The forward and the backward's first kernel split each sample across ⌈N / BLOCK_N⌉ programs
# (the last one to finish completes the sample). False: one program per sample, looping over
# its features: the comparison point for benchmarks, and a
# fallback, also chosen at import by the environment variable GSP_TRITON_SPLIT=0.
SPLIT_SAMPLES = os.environ.get("GSP_TRITON_SPLIT", "1") != "0"
# The norms kernel's tiles (``row_norms``): rows (features or prototypes) by columns of D.
ROWS_BLOCK = 32
COLS_BLOCK = 128
# ``_prepare_prototypes`` scales a prototype whose norm reaches 2^SCALE_ABOVE: every norm from 1
# where a feature can be as long as float32's max; float16 features are shorter than 2³⁶ (65504·√D),
# so their products overflow only past 2⁶⁴; never without normalization (its norms are bounded).
SCALE_ABOVE = {"default": 0, "float16": 64, "none": 255}


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for host ints (``triton.cdiv`` is a jit function: ~1 µs per host call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it x's (a no-op on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def sample_tiles(n: int, block_n: int) -> tuple[int, int]:
    """(programs per sample, features per program): balanced tiles of at most BLOCK_N features,
    or the whole sample in one program when ``SPLIT_SAMPLES`` is off."""
    tiles = cdiv(n, block_n) if SPLIT_SAMPLES else 1
    return tiles, cdiv(n, tiles)


def register_cap(config: dict, half: bool) -> dict:
    """config, with ``maxnreg`` for half-precision launches: ``PROGRAMS_PER_SM`` programs per SM
    whatever the Triton version's code generation (3.6 builds the 8-warp half kernels in 165-174
    registers where 3.9 takes 95-106: one program per SM; capped at 128, neither spills)."""
    if half:
        registers_per_thread = REGISTERS_PER_SM // (PROGRAMS_PER_SM * 32 * config["num_warps"])
        if registers_per_thread < 255:  # a thread's own limit
            config = {**config, "maxnreg": registers_per_thread}
    return config


def with_overrides(config: dict, half: bool) -> dict:
    """A tile table's (or tuned) config with the test override ``BLOCK_OVERRIDE`` and the register cap."""
    return register_cap({**config, **(BLOCK_OVERRIDE or {})}, half)


def half_products(x: torch.Tensor, prototypes: torch.Tensor) -> bool:
    """Whether the fused kernels' cost products run in a half dtype (features and prototypes of
    one half dtype): they then take the half tile table and its register cap. Mixed dtypes (half
    features, float32 prototypes: the GSP layer under autocast) upcast to float32 and run three
    TF32 products per step, the float32 kernels' register profile: under the half cap they spilled
    280-400 bytes (sm_90 builds, Triton 3.6 and 3.8)."""
    return x.dtype == prototypes.dtype and x.dtype in HALF_DTYPES


def resolve_precision(x: torch.Tensor, prototypes: torch.Tensor, precision: str) -> tuple[bool, str, str, float]:
    """(cast cost operands to float32, cost-dot precision, float32-dot precision, snap)."""
    f32_precision = "tf32x3" if precision == "auto" else precision
    # The interpreter's tl.dot reads bfloat16 as raw integers; exact products either way.
    native_half = half_products(x, prototypes) and not (INTERPRETED and x.dtype == torch.bfloat16)
    if native_half:  # exact products of half values; the precision flag does not apply
        return False, "tf32", f32_precision, COST_SNAP
    return True, f32_precision, f32_precision, COST_SNAP


def prototype_block_d(d: int) -> int:
    """The prototype epilogue's D tile: the whole row up to 512 columns."""
    return min(next_pow2(d), 512)


def prototype_block_b(batch: int) -> int:
    """The prototype epilogue's tile of per-sample column sums: the whole batch up to 256."""
    return min(next_pow2(batch), 256)


def row_norms(x: torch.Tensor, prototypes: torch.Tensor, normalize: str, grad_pooled: torch.Tensor | None = None,
              features: bool = True):
    """One launch of the norms kernel: ((|x|² as (s, scale), x·gy or None) [B·N] float32, or None
    without ``features``; (z′, z_scale [M], |z′|² [M])): the prepared prototypes z′ = z / z_scale
    [M, D] (``jit_math._prepare_prototypes``) in z's dtype, float32 for float16 prototypes next to
    longer features."""
    batch, n, d = x.shape
    m = prototypes.shape[0]
    prepared_dtype = torch.float32 if prototypes.dtype == torch.float16 != x.dtype else prototypes.dtype
    prepared = torch.empty((m, d), dtype=prepared_dtype, device=x.device)
    z_rows = torch.empty((2, m), dtype=torch.float32, device=x.device)  # z_scale, |z′|²
    rows = torch.empty((3 if grad_pooled is not None else 2, batch * n) if features else (3, 1),
                       dtype=torch.float32, device=x.device)  # |x|² as (s, scale), x·gy
    x_programs = cdiv(batch * n, ROWS_BLOCK) if features else 0
    scale_above = SCALE_ABOVE["none" if normalize == "none" else "float16" if x.dtype == torch.float16 else "default"]
    _gsp_norms_kernel[(x_programs + cdiv(m, ROWS_BLOCK),)](
        x, *x.stride(), prototypes, *prototypes.stride(), x if grad_pooled is None else grad_pooled,
        rows[0], rows[1], rows[-1], prepared, z_rows[0], z_rows[1],
        batch * n, n, m, d, x_programs,
        BLOCK_R=ROWS_BLOCK, BLOCK_D=min(next_pow2(d), COLS_BLOCK), WITH_GY=grad_pooled is not None,
        SCALE_ABOVE=scale_above, num_warps=4,
    )
    x_rows = (rows[0], rows[1], rows[2] if grad_pooled is not None else None) if features else None
    return x_rows, (prepared, z_rows[0], z_rows[1])


def per_sample_forward(x, prototypes, z_scale, options: GSPOptions, config: dict, logits, logits_strides,
                       x_rows=None, z_sq=None, parts=0):
    """The per-sample forward kernel of both strategies, on the prepared prototypes and their
    z_scale [M] (``row_norms``): logits scratch [B, N, M] (strides ``logits_strides``), computing
    the products itself (parts = 0) or reading them from the scratch, as ``parts`` column blocks
    of M, with |x|² as (s, scale) [B·N] each (x_rows) and |z′|² [M] (the gemm strategy).
    -> pooled [B, D], attr [B, M], weights [B, N] in x's dtype, u [B] float32."""
    batch, n, d = x.shape
    m = prototypes.shape[0]
    mu = options.transport_ratio
    gap = mu >= 1.0
    cast_f32, dot_precision, f32_precision, snap = resolve_precision(x, prototypes, options.precision)
    tiles_per_sample, rows_per_tile = sample_tiles(n, config["BLOCK_N"])
    pooled = x.new_empty((batch, d))
    attr = x.new_empty((batch, m))
    weights = x.new_empty((batch, n))
    u = torch.empty((batch,), dtype=torch.float32, device=x.device)
    ell = torch.empty((batch, n), dtype=torch.float32, device=x.device)
    arrivals = torch.zeros((batch,), dtype=torch.int32, device=x.device)
    logit_mu = 0.0 if gap else math.log(mu) - math.log1p(-mu)
    _gsp_forward_kernel[(batch * tiles_per_sample,)](
        x, *x.stride(), prototypes, *prototypes.stride(), z_scale,
        pooled, attr, weights, u, logits, ell, arrivals,
        *logits_strides, *((logits, logits) if x_rows is None else x_rows[:2]), logits if z_sq is None else z_sq,
        n, m, d, rows_per_tile, tiles_per_sample,
        float(options.gamma), snap, 1.0 / (n * mu), mu * n,
        logit_mu, math.log(mu), math.log(mu * n), float(options.tol), int(options.max_iter),
        BLOCK_ALL_N=next_pow2(max(n, 16)),
        NORMALIZE=NORMALIZE_CODES[options.normalize], EUCLIDEAN=options.cost == "euclidean",
        NEWTON=options.solver == "newton", GAP=gap, CAST_F32=cast_f32, PRECISION=dot_precision,
        POOL_PRECISION="ieee" if f32_precision == "ieee" else "tf32x3",
        SPLIT_HALF=x.dtype in HALF_DTYPES, NATIVE_HALF_DOT=not INTERPRETED, PARTS=parts, **config,
    )
    return pooled, attr, weights, u


def per_sample_backward(grad_pooled, grad_attr, grad_weights, x, prototypes, z_scale, u, options: GSPOptions,
                        config: dict, coef, coef_strides, x_rows=None, z_sq=None, parts=0, pair=None,
                        pair_strides=(0, 0, 0)):
    """The per-sample backward kernel of both strategies, on the prepared prototypes and their
    z_scale (``row_norms``): V′ = V·z_scale over ``coef`` [B, N, M] (strides ``coef_strides``; with
    parts > 0 it holds the products on entry, see ``per_sample_forward``, and x_rows (|x|² as
    (s, scale), x·gy [B·N]) and |z′|² [M] are given), also as hi + lo into ``pair`` [B, N, 2M] in
    x's dtype when given; returns (β p, w, 1/p) [B, 3, N] and the per-sample column sums of W [B, M]."""
    batch, n, d = x.shape
    m = prototypes.shape[0]
    mu = options.transport_ratio
    cast_f32, dot_precision, _f32_precision, snap = resolve_precision(x, prototypes, options.precision)
    tiles_per_sample, rows_per_tile = sample_tiles(n, config["BLOCK_N"])
    row_coefs = torch.empty((batch, 3, n), dtype=torch.float32, device=x.device)  # β p, w, 1/p
    row_scratch = torch.empty((batch, 5, n), dtype=torch.float32, device=x.device)
    z_sq_rows = torch.empty((batch, m), dtype=torch.float32, device=x.device)
    col_sum = torch.empty((batch, m), dtype=torch.float32, device=x.device)
    tile_sums = torch.empty((batch, tiles_per_sample, 2), dtype=torch.float32, device=x.device)
    arrivals = torch.zeros((batch,), dtype=torch.int32, device=x.device)
    given = (coef, coef, coef, coef) if x_rows is None else (*x_rows, z_sq)
    _gsp_backward_kernel[(batch * tiles_per_sample,)](
        x, *x.stride(), prototypes, *prototypes.stride(), z_scale,
        u.to(torch.float32), grad_pooled, grad_attr, grad_weights,
        coef, row_coefs, row_scratch, z_sq_rows, col_sum, tile_sums, arrivals,
        *coef_strides, *given, coef if pair is None else pair, *pair_strides,
        n, m, d, rows_per_tile, tiles_per_sample,
        float(options.gamma), snap, 1.0 / (n * mu),
        NORMALIZE=NORMALIZE_CODES[options.normalize], EUCLIDEAN=options.cost == "euclidean", GAP=mu >= 1.0,
        CAST_F32=cast_f32, PRECISION=dot_precision, PARTS=parts, V_PAIR=pair is not None, **config,
    )
    return row_coefs, col_sum
