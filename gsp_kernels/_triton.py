"""The `triton` backend: GSP forward in one fused launch, backward in two launches plus one GEMM.

Two strategies (``STRATEGIES``), chosen per call by ``strategy_for`` (forced by
``GSP_TRITON_STRATEGY`` at import or ``use_strategy``): "fused", whose kernels compute the
cost products themselves, and "gemm" (``_triton_gemm``), which takes the products
from the vendor GEMM and runs the same per-sample kernels on them (their ``PARTS`` argument).
The kernels live in ``_triton_kernels``, the @triton.jit math both strategies use in
``_triton_math``; this module is the backend's host side (strategy, tiles, launches). Math and
symbols: SPEC.md. Layout of the fused strategy's work:

- Forward (``_gsp_forward_kernel``), one program per (sample, tile of at most BLOCK_N
  features): B·⌈N/BLOCK_N⌉ programs, so that small batches still fill the GPU.
  1. for its features and each tile of prototypes, the raw products x·z over D tiles
     (``tl.dot``, the loop that ``num_stages`` software-pipelines), with |x|² and |z|² from the
     same loaded tiles. Normalization is a per-row scale, so x̂·ẑ = (x·z) / (d_x d_z) and
     |x̂|² = |x|² / d_x²: no normalized copy is made. Snapped costs give logits −γc, written to
     a per-sample scratch [N, M], and ℓ by an online logsumexp over prototype tiles (scratch
     [N]). Then the program takes a ticket from the sample's arrival counter
     (``_last_to_arrive``: barrier, then an acq_rel atomic at GPU scope, the pattern of CUTLASS's
     semaphores); the last of the sample's programs runs steps 2-4, reading the others'
     scratch from L2. The result does not depend on which program is last: steps 2-4 read
     only scratch, in a fixed order.
  2. the root u, in registers (ℓ of the whole sample is one vector): bracketed Newton with
     the rules of ``_reference.solve_newton``, or the paper's fixed point; μ = 1 is exact
     (σ ≡ 1, u = +inf).
  3. pooled = Σ w_i x_i (x re-read, mostly from L2) as a [16, BLOCK_N] x [BLOCK_N, BLOCK_D]
     product with w in row 0, so that the x tiles stream through Triton's pipeliner, with
     float32-accurate products whatever ``precision`` says (tf32x3 for float32 unless ieee;
     for half inputs, the weights as hi + lo in that dtype). Then attr and weights from the
     logits scratch. Why keep the logits rather than recompute them: recomputing doubles the
     dominant GEMM (float32 with tf32x3 is compute-bound), while the scratch is 4·M bytes per
     feature, written and read back by the same program while it is still in L2.
- Backward (``_gsp_backward_kernel``), one program per (sample, feature tile) as in the
  forward: pass 1 recomputes the raw products of its features (scratch [N, M]: cheaper than
  saving [B, N, M] in the forward, which the op's contract does not allow anyway), ℓ and ā
  (online, together), x·gy, and its tile's sums for ē; the sample's last program (same
  arrival counter) adds the tiles' sums in tile order and runs pass 2 for all its features:
  it forms W per tile, overwrites the scratch with V = W / (d_x d_z), and writes per
  feature β and w of grad_x = β x − V z + w gy: β = (S − r·[projects]) / d_x² with
  S = Σ_k W and r = x̂·gx̂ = |x̂|² S − Σ_k W (x̂·ẑ), so the normalization backward needs no
  extra pass over D.
  The prototype gradient's batch reduction Σ_b Σ_i W_ki x̂_i = d_z (Vᵀ x) is one GEMM over
  all B·N features, ``_gsp_coef_x_kernel``: a split-K Triton GEMM rather than torch.matmul,
  because it reads x through its strides (a channels-first map needs no copy), keeps half
  inputs in half (no float32 copy of x), and uses the same ``precision`` (cuBLAS float32
  without TF32 runs on CUDA cores, ~2.5× slower than tf32x3 on an H200).
  ``_gsp_backward_finish_kernel`` then does two independent jobs in one launch: a program per
  prototype sums the splits and the per-sample column sums of W in a fixed order (no
  atomics: the backward is deterministic) and applies the prototypes' normalization
  backward; the other programs compute grad_x = β x − V z + w gy as a GEMM over the
  prototypes with that epilogue, on [BLOCK_N, BLOCK_D] tiles of all B·N features. As a
  per-sample loop over D inside the first kernel, that product waited on every V and z tile
  in turn (~100 dependent round trips per sample); as thousands of programs whose loads feed
  tl.dot it is pipelined and latency-hidden. Launches: the per-sample kernel, the GEMM and
  the finishing launch; the only torch op is the memset of the arrival counters (also one in
  the forward).

Precision of the products (``precision``), in SPEC.md's terms (‖out − ref‖ / ‖ref‖):

- float32 inputs, "ieee": exact float32 products, ≲ 1e-5 (no tensor cores: slowest).
- "tf32x3" (``auto`` for float32): three TF32 products recover ~float32 accuracy, ≈ ieee,
  at 3× the TF32 tensor-core work.
- "tf32": one TF32 product (10-bit mantissa). The cost then carries ~2⁻¹⁰ relative error
  in |x̂|² + |ẑ|² − 2 x̂·ẑ, so errors are ≲ 1e-2 and grow with gamma (logits are −γc).
  Its cancellation noise for an exact match is ~1e-3 of |x̂|² + |ẑ|², above ``COST_SNAP``:
  an exact match then costs ~0.03 instead of 0, and gradients of features within a few
  hundredths of a prototype are off by up to ~10% at gamma 20. A larger snap would zero
  genuine costs of clustered features instead; use tf32 only where that error is acceptable.
- bfloat16 / float16 inputs with prototypes of the same dtype: the cost products run
  natively on the raw inputs (normalization is folded in afterwards), and products of two
  half values are exact in the float32 accumulator: ieee-accurate at half-precision tensor
  core speed, whatever ``precision`` says. Mixed dtypes are upcast to float32 in registers
  and use ``precision``. The backward's float32 V times the prototypes (V·z) and x (Vᵀx)
  uses ``precision``; with bfloat16 operands it is two exact-product bfloat16 dots instead,
  V = hi + lo (V to ~16 bits, ≪ the 2e-2 tolerance of bfloat16 inputs).

The interpreter (TRITON_INTERPRET=1, CPU tensors) computes every precision exactly, so
TF32 errors only show on a GPU; its tl.dot misreads bfloat16, so bfloat16 dots take the
same values through float32 there (``_INTERPRETED``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

from . import _reference, tuning
from ._triton_kernels import (
    _gsp_backward_finish_kernel,
    _gsp_backward_kernel,
    _gsp_coef_x_kernel,
    _gsp_forward_kernel,
)

# How the kernels were built: triton.jit picks the interpreter at decoration time.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The solve holds ℓ of one sample in registers: N up to this.
MAX_N = 4096
# The half-precision per-sample kernels' occupancy target: programs in an SM's 64K registers
# (sm_80 and sm_90), two so that one program's memory waits overlap the other's work; 1 lifts
# the register cap that holds it (bench/profile_backends.py compares).
_REGISTERS_PER_SM = 65536
PROGRAMS_PER_SM = 2
# Tests may set this to a dict with any of BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages
# to force tiling at small sizes.
BLOCK_OVERRIDE: dict | None = None
# Likewise for the backward's split-K GEMM (``_gsp_coef_x_kernel``): any of BLOCK_K, BLOCK_M, BLOCK_D
# (powers of two >= 16), num_warps, num_stages, programs_wanted (see ``_gemm_config``).
GEMM_OVERRIDE: dict | None = None

# The forward and the backward's first kernel split each sample across ⌈N / BLOCK_N⌉ programs
# (the last one to finish completes the sample). False: one program per sample, looping over
# its features (session 3's kernels): the comparison point for benchmarks, and a fallback,
# also chosen at import by the environment variable GSP_TRITON_SPLIT=0.
SPLIT_SAMPLES = os.environ.get("GSP_TRITON_SPLIT", "1") != "0"
_NORMALIZE_CODES = {"lipschitz": 0, "l2": 1, "none": 2}
_HALF_DTYPES = (torch.bfloat16, torch.float16)

# The backend's two designs: "fused" (``_triton_kernels`` compute the products too) and "gemm"
# (``_triton_gemm``: the products on the vendor GEMM, the rest in the same per-sample kernels).
STRATEGIES = tuning.STRATEGIES


def _strategy_from_environment() -> str | None:
    """GSP_TRITON_STRATEGY: unset or empty (chosen per call), or one of STRATEGIES."""
    value = os.environ.get("GSP_TRITON_STRATEGY", "")
    if value and value not in STRATEGIES:
        raise ValueError(f"GSP_TRITON_STRATEGY must be one of {STRATEGIES} or unset, got {value!r}")
    return value or None


# Forced for every call by GSP_TRITON_STRATEGY (read at import, like GSP_TRITON_SPLIT); None:
# ``strategy_for`` chooses per call.
STRATEGY: str | None = _strategy_from_environment()
_forced_strategy: str | None = None  # use_strategy's override


@contextlib.contextmanager
def use_strategy(name: str):
    """Force the strategy of every call inside the block (forward and backward alike); the
    block gets the name."""
    global _forced_strategy
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    previous, _forced_strategy = _forced_strategy, name
    try:
        yield name
    finally:
        _forced_strategy = previous


def tuned_entry(x: torch.Tensor, prototypes: torch.Tensor, precision: str = "auto") -> dict | None:
    """The tuned configuration's entry for a call on these inputs (``gsp_kernels.tuning``: the
    file for this GPU and Triton version, by dtype, precision and shape bucket), or None."""
    batch, n, d = x.shape
    return tuning.lookup(x.device, x.dtype, prototypes.dtype, precision, batch, n, prototypes.shape[0], d)


def strategy_for(x: torch.Tensor, prototypes: torch.Tensor, precision: str = "auto") -> str:
    """The strategy of a call on these inputs: ``use_strategy``'s, else STRATEGY's, else the tuned
    entry's (``tuned_entry``) where torch lets cuBLAS run (``_triton_gemm.runs_on``: not under
    deterministic algorithms without CUBLAS_WORKSPACE_CONFIG), else "fused" (a function of the
    inputs and torch's settings, so that the backward takes the forward's)."""
    if _forced_strategy or STRATEGY:
        return _forced_strategy or STRATEGY
    entry = tuned_entry(x, prototypes, precision)
    if entry is None or (entry["strategy"] == "gemm" and not _triton_gemm.runs_on(x.device)):
        return "fused"
    return entry["strategy"]


# ----------------------------------------------------------------------------- host glue


def _cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for host ints (``triton.cdiv`` is a jit function: ~1 µs per host call)."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=256)
def _tile_config(n: int, m: int, d: int, half: bool, backward: bool) -> dict:
    """Constexpr block sizes and launch parameters for a (N, M, D) bucket (powers of two).

    tl.dot needs every tile dim >= 16; 64 feature rows let Hopper use wgmma and bound how
    often each program re-reads the prototypes (once per feature tile). D goes 32 (float32)
    or 64 (half) per step. Prototype tiles, from sm_90 builds at N=196, M=128, D=512 with
    3 stages and 8 warps (``test_triton._compile_kernels_for_sm90``): the half-precision
    kernels take the widest tile that fits two programs per SM (<= 128 registers, held there
    by ``_launch_config``'s cap): 64 prototypes in the forward (122 registers; 178 with 128), 32
    in the backward (126; 167 with 64). The float32 ones fit one program per SM whatever the
    tile (three TF32 products per step), so they take the widest that does not spill, and read
    each x tile fewer times: 128 in the forward (244), 64 in the backward (220). (Registers
    from Triton 3.9's build of session 3.) num_stages pipelines the loops that feed
    tl.dot (the cost products over D, the pooling over N, the backward's GEMMs); loops that
    store to a program's own scratch are pinned to one stage in the kernels. To be tuned on
    the GPU (bench/sweep_triton.py).
    """
    if backward:
        block_m = min(max(m, 16), 32 if half else 64)
    else:
        block_m = min(max(m, 16), 64 if half else 128)
    block_n = min(max(n, 16), 64)
    block_d = min(max(d, 16), 64 if half else 32)
    full_tile = 64 * (32 if backward and half else 64)  # at and above it, 8 warps
    num_warps = 8 if block_n * block_m >= full_tile else 4
    return {"BLOCK_N": block_n, "BLOCK_M": block_m, "BLOCK_D": block_d, "num_warps": num_warps, "num_stages": 3}


def _sample_tiles(n: int, block_n: int) -> tuple[int, int]:
    """(programs per sample, features per program): balanced tiles of at most BLOCK_N features,
    or the whole sample in one program when ``SPLIT_SAMPLES`` is off."""
    tiles = _cdiv(n, block_n) if SPLIT_SAMPLES else 1
    return tiles, _cdiv(n, tiles)


def _launch_config(n: int, m: int, d: int, half: bool, backward: bool = False, tuned: dict | None = None) -> dict:
    """The tuned tiles if given (a tuned entry's "forward" or "backward"), else the cached table
    entry for this shape's bucket; then the test override if any; for half-precision inputs,
    ``maxnreg`` so that ``PROGRAMS_PER_SM`` programs fit per SM whatever the Triton version's code
    generation (3.6 takes 165-174 registers for the 8-warp kernels that 3.9 builds in 95-106: one
    program per SM; capped at 128, neither spills)."""
    config = tuned or _tile_config(_next_pow2(n), _next_pow2(m), _next_pow2(d), half, backward)
    return _register_cap({**config, **(BLOCK_OVERRIDE or {})}, half)


def _register_cap(config: dict, half: bool) -> dict:
    """config, with ``maxnreg`` for half-precision launches: ``PROGRAMS_PER_SM`` programs per SM."""
    if half:
        registers_per_thread = _REGISTERS_PER_SM // (PROGRAMS_PER_SM * 32 * config["num_warps"])
        if registers_per_thread < 255:  # a thread's own limit
            config = {**config, "maxnreg": registers_per_thread}
    return config


@functools.lru_cache(maxsize=256)
def _split_k_config(
    total_rows: int, m: int, d: int, programs_wanted: int,
    block_k: int | None = None, block_m: int | None = None, block_d: int | None = None,
) -> tuple[int, int, int, int, int]:
    """(BLOCK_K, BLOCK_M, BLOCK_D, rows per split, splits) for the prototype-gradient GEMM:
    enough splits of the B·N features to give about `programs_wanted` programs. Block sizes
    not given: 64 features, up to 64 prototypes and 64 columns."""
    block_k = block_k or 64
    block_m = block_m or min(max(_next_pow2(m), 16), 64)
    block_d = block_d or min(max(_next_pow2(d), 16), 64)
    tiles = _cdiv(m, block_m) * _cdiv(d, block_d)
    splits = max(1, min(_cdiv(programs_wanted, tiles), _cdiv(total_rows, block_k)))
    rows_per_split = _cdiv(_cdiv(total_rows, splits), block_k) * block_k
    return block_k, block_m, block_d, rows_per_split, _cdiv(total_rows, rows_per_split)


@functools.lru_cache(maxsize=16)
def _programs_wanted(device: torch.device) -> int:
    """Two programs per SM on a GPU; a few on the interpreter (to exercise the split)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _gemm_config(total_rows: int, m: int, d: int, device: torch.device, tuned: dict | None = None) -> dict:
    """The split-K GEMM's launch: num_warps 4, num_stages 3, programs_wanted from the device, or
    the tuned settings if given (a tuned entry's "coef_x"), then the sweep's override if any;
    blocks and split from ``_split_k_config``."""
    gemm = {"num_warps": 4, "num_stages": 3, "programs_wanted": _programs_wanted(device), **(tuned or {}),
            **(GEMM_OVERRIDE or {})}
    block_k, block_m, block_d, rows_per_split, splits = _split_k_config(
        total_rows, m, d, gemm["programs_wanted"], gemm.get("BLOCK_K"), gemm.get("BLOCK_M"), gemm.get("BLOCK_D")
    )
    return {**gemm, "BLOCK_K": block_k, "BLOCK_M": block_m, "BLOCK_D": block_d,
            "rows_per_split": rows_per_split, "splits": splits}


def _half_products(x: torch.Tensor, prototypes: torch.Tensor) -> bool:
    """Whether the fused kernels' cost products run in a half dtype (features and prototypes of
    one half dtype): they then take the half tile table and its register cap. Mixed dtypes (half
    features, float32 prototypes: the GSP layer under autocast) upcast to float32 and run three
    TF32 products per step, the float32 kernels' register profile: under the half cap they spilled
    280-400 bytes (sm_90 builds, Triton 3.6 and 3.8)."""
    return x.dtype == prototypes.dtype and x.dtype in _HALF_DTYPES


def _resolve_precision(x: torch.Tensor, prototypes: torch.Tensor, precision: str) -> tuple[bool, str, str, float]:
    """(cast cost operands to float32, cost-dot precision, float32-dot precision, snap)."""
    f32_precision = "tf32x3" if precision == "auto" else precision
    # The interpreter's tl.dot reads bfloat16 as raw integers; exact products either way.
    native_half = _half_products(x, prototypes) and not (_INTERPRETED and x.dtype == torch.bfloat16)
    if native_half:  # exact products of half values; the precision flag does not apply
        return False, "tf32", f32_precision, _reference.COST_SNAP
    return True, f32_precision, f32_precision, _reference.COST_SNAP


def availability(device: torch.device) -> str | None:
    """cuda: triton imported; cpu: only through the interpreter (TRITON_INTERPRET=1 at import)."""
    if device.type == "cuda":
        if _INTERPRETED:
            return "TRITON_INTERPRET=1 was set when gsp_kernels._triton was imported: kernels run on the CPU only"
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if _INTERPRETED:
            return None
        return "triton on CPU needs TRITON_INTERPRET=1 set before gsp_kernels._triton is imported"
    return f"triton does not run on {device.type}"


def unsupported(x, prototypes, solver, normalize, cost, precision) -> str | None:
    """float64 and N > MAX_N are not computed here (auto then uses the reference)."""
    if x.dtype == torch.float64 or prototypes.dtype == torch.float64:
        return "float64 inputs are computed by the reference backend"
    if x.shape[1] > MAX_N:
        return f"N={x.shape[1]} > {MAX_N} (the solve holds one sample's features in registers)"
    return None


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it x's (a no-op on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def forward(x, prototypes, mu, gamma, normalize, cost, solver, max_iter, tol, precision="auto"):
    """pooled [B, D], attr [B, M], weights [B, N] in x's dtype, u [B] float32, by the strategy
    ``strategy_for`` picks: fused (one launch) or gemm (``_triton_gemm``)."""
    with _on_device(x.device):
        if strategy_for(x, prototypes, precision) == "gemm":
            return _triton_gemm.forward(x, prototypes, mu, gamma, normalize, cost, solver, max_iter, tol, precision)
        tiles = (tuned_entry(x, prototypes, precision) or {}).get("forward")
        config = _launch_config(x.shape[1], prototypes.shape[0], x.shape[2], _half_products(x, prototypes), tuned=tiles)
        logits = x.new_empty((x.shape[0], x.shape[1], prototypes.shape[0]), dtype=torch.float32)  # [B, N, M]
        options = (mu, gamma, normalize, cost, solver, max_iter, tol, precision)
        return _per_sample_forward(x, prototypes, *options, config, logits, logits.stride())


def _per_sample_forward(
    x, prototypes, mu, gamma, normalize, cost, solver, max_iter, tol, precision, config, logits, logits_strides,
    x_sq=None, z_sq=None, parts=0,
):
    """The per-sample forward kernel of both strategies: logits scratch [B, N, M] (strides
    ``logits_strides``), computing the products itself (parts = 0) or reading them from the
    scratch, as ``parts`` column blocks of M, with |x|² [B·N] and |z|² [M] (the gemm strategy)."""
    batch, n, d = x.shape
    m = prototypes.shape[0]
    gap = mu >= 1.0
    cast_f32, dot_precision, f32_precision, snap = _resolve_precision(x, prototypes, precision)
    tiles_per_sample, rows_per_tile = _sample_tiles(n, config["BLOCK_N"])
    pooled = x.new_empty((batch, d))
    attr = x.new_empty((batch, m))
    weights = x.new_empty((batch, n))
    u = torch.empty((batch,), dtype=torch.float32, device=x.device)
    ell = torch.empty((batch, n), dtype=torch.float32, device=x.device)
    arrivals = torch.zeros((batch,), dtype=torch.int32, device=x.device)
    logit_mu = 0.0 if gap else math.log(mu) - math.log1p(-mu)
    _gsp_forward_kernel[(batch * tiles_per_sample,)](
        x, *x.stride(), prototypes, *prototypes.stride(),
        pooled, attr, weights, u, logits, ell, arrivals,
        *logits_strides, logits if x_sq is None else x_sq, logits if z_sq is None else z_sq,
        n, m, d, rows_per_tile, tiles_per_sample,
        float(gamma), snap, 1.0 / (n * mu), mu * n,
        logit_mu, math.log(mu), math.log(mu * n), float(tol), int(max_iter),
        BLOCK_ALL_N=_next_pow2(max(n, 16)),
        NORMALIZE=_NORMALIZE_CODES[normalize], EUCLIDEAN=cost == "euclidean", NEWTON=solver == "newton",
        GAP=gap, CAST_F32=cast_f32, PRECISION=dot_precision,
        POOL_PRECISION="ieee" if f32_precision == "ieee" else "tf32x3",
        SPLIT_HALF=x.dtype in _HALF_DTYPES, NATIVE_HALF_DOT=not _INTERPRETED, PARTS=parts, **config,
    )
    return pooled, attr, weights, u


def backward(grad_pooled, grad_attr, grad_weights, x, prototypes, u, mu, gamma, normalize, cost, precision="auto"):
    """grad_x (x's strides and dtype) and grad_prototypes, by the strategy ``strategy_for``
    picks (the same as the forward's for the same inputs). Fused: two launches and one GEMM, the
    per-sample kernel (V, column sums, β and w), the split-K GEMM of the prototype gradient,
    then one launch that finishes both (the prototype epilogue; grad_x as a GEMM over the
    prototypes with its epilogue)."""
    with _on_device(x.device):
        args = (grad_pooled.contiguous(), grad_attr.contiguous(), grad_weights.contiguous(), x, prototypes, u,
                mu, gamma, normalize, cost, precision)
        if strategy_for(x, prototypes, precision) == "gemm":
            return _triton_gemm.backward(*args)
        return _backward(*args, tuned=tuned_entry(x, prototypes, precision) or {})


def _per_sample_backward(
    grad_pooled, grad_attr, grad_weights, x, prototypes, u, mu, gamma, normalize, cost, precision, config,
    coef, coef_strides, x_sq=None, x_gy=None, z_sq=None, parts=0, pair=None, pair_strides=(0, 0, 0),
):
    """The per-sample backward kernel of both strategies: V over ``coef`` [B, N, M] (strides
    ``coef_strides``; with parts > 0 it holds the products on entry, see ``_per_sample_forward``,
    and |x|², x·gy [B·N], |z|² [M] are given), also as hi + lo into ``pair`` [B, N, 2M] in x's
    dtype when given; returns (β, w) [B, 2, N] and the per-sample column sums of W [B, M]."""
    batch, n, d = x.shape
    m = prototypes.shape[0]
    cast_f32, dot_precision, _f32_precision, snap = _resolve_precision(x, prototypes, precision)
    tiles_per_sample, rows_per_tile = _sample_tiles(n, config["BLOCK_N"])
    row_coefs = torch.empty((batch, 2, n), dtype=torch.float32, device=x.device)  # β, w
    row_scratch = torch.empty((batch, 4, n), dtype=torch.float32, device=x.device)
    z_sq_rows = torch.empty((batch, m), dtype=torch.float32, device=x.device)
    col_sum = torch.empty((batch, m), dtype=torch.float32, device=x.device)
    tile_sums = torch.empty((batch, tiles_per_sample, 2), dtype=torch.float32, device=x.device)
    arrivals = torch.zeros((batch,), dtype=torch.int32, device=x.device)
    given = (coef, coef, coef) if x_sq is None else (x_sq, x_gy, z_sq)
    _gsp_backward_kernel[(batch * tiles_per_sample,)](
        x, *x.stride(), prototypes, *prototypes.stride(),
        u.to(torch.float32), grad_pooled, grad_attr, grad_weights,
        coef, row_coefs, row_scratch, z_sq_rows, col_sum, tile_sums, arrivals,
        *coef_strides, *given, coef if pair is None else pair, *pair_strides,
        n, m, d, rows_per_tile, tiles_per_sample,
        float(gamma), snap, 1.0 / (n * mu),
        NORMALIZE=_NORMALIZE_CODES[normalize], EUCLIDEAN=cost == "euclidean", GAP=mu >= 1.0,
        CAST_F32=cast_f32, PRECISION=dot_precision, PARTS=parts, V_PAIR=pair is not None, **config,
    )
    return row_coefs, col_sum


def _backward(grad_pooled, grad_attr, grad_weights, x, prototypes, u, mu, gamma, normalize, cost, precision, tuned):
    """The fused backward; ``tuned``: the tuned entry ({} for none), whose "backward" tiles and
    "coef_x" GEMM settings replace the built-in ones where given."""
    batch, n, d = x.shape
    m = prototypes.shape[0]
    _, _, f32_precision, _ = _resolve_precision(x, prototypes, precision)
    config = _launch_config(n, m, d, _half_products(x, prototypes), backward=True, tuned=tuned.get("backward"))
    native_half_dot = not _INTERPRETED  # the interpreter's tl.dot misreads bfloat16 operands
    coef = torch.empty((batch, n, m), dtype=torch.float32, device=x.device)  # raw x·z, then V
    row_coefs, col_sum = _per_sample_backward(
        grad_pooled, grad_attr, grad_weights, x, prototypes, u, mu, gamma, normalize, cost, precision, config,
        coef, coef.stride(),
    )
    # Σ_b Σ_i W_ki x̂_i = d_z,k Σ_b Σ_i V_ki x_i: one split-K GEMM over all B·N features.
    gemm = _gemm_config(batch * n, m, d, x.device, tuned=tuned.get("coef_x"))
    splits = gemm["splits"]
    partials = torch.empty((splits, m, d), dtype=torch.float32, device=x.device)
    _gsp_coef_x_kernel[(_cdiv(m, gemm["BLOCK_M"]), _cdiv(d, gemm["BLOCK_D"]), splits)](
        coef, x, *x.stride(), partials,
        batch * n, n, m, d, gemm["rows_per_split"],
        BLOCK_K=gemm["BLOCK_K"], BLOCK_M=gemm["BLOCK_M"], BLOCK_D=gemm["BLOCK_D"],
        SPLIT_BF16=x.dtype == torch.bfloat16, NATIVE_HALF_DOT=native_half_dot, PRECISION=f32_precision,
        num_warps=gemm["num_warps"], num_stages=gemm["num_stages"],
    )
    # The prototype gradient's epilogue and grad_x = β x − V z + w gy (a GEMM over the
    # prototypes, in tiles of the per-sample kernel's feature, prototype and D sizes).
    grad_z = torch.empty((m, d), dtype=prototypes.dtype, device=x.device)
    grad_x = torch.empty_like(x)
    block_r, block_k, block_d = config["BLOCK_N"], config["BLOCK_M"], config["BLOCK_D"]
    col_tiles = _cdiv(d, block_d)
    _gsp_backward_finish_kernel[(m + col_tiles * _cdiv(batch * n, block_r),)](
        partials, splits, col_sum, batch, coef, row_coefs,
        prototypes, *prototypes.stride(), grad_z,
        x, *x.stride(), grad_pooled, grad_x, *grad_x.stride(),
        batch * n, n, m, d, col_tiles,
        BLOCK_ZD=_prototype_block_d(d), BLOCK_B=_prototype_block_b(batch), NORMALIZE=_NORMALIZE_CODES[normalize],
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d,
        SPLIT_BF16=prototypes.dtype == torch.bfloat16, NATIVE_HALF_DOT=native_half_dot, PRECISION=f32_precision,
        num_warps=4, num_stages=config["num_stages"],
    )
    return grad_x, grad_z


def _prototype_block_d(d: int) -> int:
    """The prototype epilogue's D tile: the whole row up to 512 columns."""
    return min(_next_pow2(d), 512)


def _prototype_block_b(batch: int) -> int:
    """The prototype epilogue's tile of per-sample column sums: the whole batch up to 256."""
    return min(_next_pow2(batch), 256)


# The gemm strategy's glue launches the per-sample kernels above (imported last: it imports them).
from . import _triton_gemm
