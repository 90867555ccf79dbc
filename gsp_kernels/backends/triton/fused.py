"""The `triton` backend's fused strategy: the cost products computed in its own kernels
(``kernels``; their shared math in ``jit_math``), forward in one launch, backward in two launches
plus one GEMM, each after the prototypes' preparation (``launch.row_norms``: z′ = z / z_scale, a
power of two that keeps the products x·z′ within |x|, docs/math.md, Dtypes and their limits).
Math and symbols: docs/math.md. Layout of the work:

- Forward (``_gsp_forward_kernel``), one program per (sample, tile of at most BLOCK_N
  features): B·⌈N/BLOCK_N⌉ programs, so that small batches still fill the GPU.
  1. for its features and each tile of prototypes, the products x·z′ over D tiles
     (``tl.dot``, the loop that ``num_stages`` software-pipelines), with |x|² and |z′|² from the
     same loaded tiles (a block of rows whose |x|² overflowed sums them again, scaled).
     Normalization is a per-row scale, so x̂·ẑ = (x·z′) z_scale / (d_x d_z) and
     |x̂|² = |x|² / d_x²: no normalized copy is made. Snapped costs give logits −γc, written to
     a per-sample scratch [N, M], and ℓ by an online logsumexp over prototype tiles (scratch
     [N]). Then the program takes a ticket from the sample's arrival counter
     (``_last_to_arrive``: barrier, then an acq_rel atomic at GPU scope, the pattern of CUTLASS's
     semaphores); the last of the sample's programs runs steps 2-4, reading the others'
     scratch from L2. The result does not depend on which program is last: steps 2-4 read
     only scratch, in a fixed order.
  2. the root u, in registers (ℓ of the whole sample is one vector): bracketed Newton with
     the rules of ``backends.reference.solve_newton``, or the paper's fixed point; μ = 1 is exact
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
  it forms W per tile, overwrites the scratch with V′ = W z_scale / (d_x d_z) (V′ z′ = V z), and
  writes per feature β p, w and 1/p of grad_x = (x/p)(β p) − V z + w gy: β = (S − r·[projects]) / d_x²
  with S = Σ_k W and r = x̂·gx̂ = |x̂|² S − Σ_k W (x̂·ẑ), so the normalization backward needs no
  extra pass over D (p: a power of two near d_x for long rows, 1 for the others).
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
  tl.dot it is pipelined and latency-hidden. Launches: the prototypes' preparation, the
  per-sample kernel, the GEMM and the finishing launch; the only torch op is the memset of the
  arrival counters (also one in the forward).

Precision of the products (``precision``), measured as in docs/math.md, Accuracy
(‖out − ref‖ / ‖ref‖):

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
same values through float32 there (``launch.INTERPRETED``).
"""

from __future__ import annotations

import functools

import torch

from ...contract import NORMALIZE_CODES, GSPOptions
from .kernels import _gsp_backward_finish_kernel, _gsp_coef_x_kernel
from .launch import (
    INTERPRETED,
    cdiv,
    half_products,
    next_pow2,
    per_sample_backward,
    per_sample_forward,
    prototype_block_b,
    prototype_block_d,
    resolve_precision,
    row_norms,
    with_overrides,
)

# Tests and the sweep may set this to a dict with any of BLOCK_K, BLOCK_M, BLOCK_D (powers of two
# >= 16), num_warps, num_stages, programs_wanted to force the backward's split-K GEMM
# (``_gsp_coef_x_kernel``, see ``gemm_config``).
GEMM_OVERRIDE: dict | None = None


@functools.lru_cache(maxsize=256)
def tile_config(n: int, m: int, d: int, half: bool, backward: bool) -> dict:
    """Constexpr block sizes and launch parameters for a (N, M, D) bucket (powers of two).

    tl.dot needs every tile dim >= 16; 64 feature rows let Hopper use wgmma and bound how
    often each program re-reads the prototypes (once per feature tile). D goes 32 (float32)
    or 64 (half) per step. Prototype tiles, from sm_90 builds at N=196, M=128, D=512 with
    3 stages and 8 warps (``test_triton._compile_kernels_for_sm90``): the half-precision
    kernels take the widest tile that fits two programs per SM (<= 128 registers, held there
    by ``launch.register_cap``): 64 prototypes in the forward (122 registers; 178 with 128), 32
    in the backward (126; 167 with 64). The float32 ones fit one program per SM whatever the
    tile (three TF32 products per step), so they take the widest that does not spill, and read
    each x tile fewer times: 128 in the forward (244), 64 in the backward (220). (Registers
    from Triton 3.9's sm_90 builds.) num_stages pipelines the loops that feed
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


def launch_config(n: int, m: int, d: int, half: bool, backward: bool = False, tuned: dict | None = None) -> dict:
    """The tuned tiles if given (a tuned entry's "forward" or "backward"), else the cached table
    entry for this shape's bucket; then the test override and the register cap
    (``launch.with_overrides``)."""
    config = tuned or tile_config(next_pow2(n), next_pow2(m), next_pow2(d), half, backward)
    return with_overrides(config, half)


@functools.lru_cache(maxsize=256)
def split_k_config(
    total_rows: int, m: int, d: int, programs_wanted: int,
    block_k: int | None = None, block_m: int | None = None, block_d: int | None = None,
) -> tuple[int, int, int, int, int]:
    """(BLOCK_K, BLOCK_M, BLOCK_D, rows per split, splits) for the prototype-gradient GEMM:
    enough splits of the B·N features to give about `programs_wanted` programs. Block sizes
    not given: 64 features, up to 64 prototypes and 64 columns."""
    block_k = block_k or 64
    block_m = block_m or min(max(next_pow2(m), 16), 64)
    block_d = block_d or min(max(next_pow2(d), 16), 64)
    tiles = cdiv(m, block_m) * cdiv(d, block_d)
    splits = max(1, min(cdiv(programs_wanted, tiles), cdiv(total_rows, block_k)))
    rows_per_split = cdiv(cdiv(total_rows, splits), block_k) * block_k
    return block_k, block_m, block_d, rows_per_split, cdiv(total_rows, rows_per_split)


@functools.lru_cache(maxsize=16)
def programs_wanted(device: torch.device) -> int:
    """Two programs per SM on a GPU; a few on the interpreter (to exercise the split)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def gemm_config(total_rows: int, m: int, d: int, device: torch.device, tuned: dict | None = None) -> dict:
    """The split-K GEMM's launch: num_warps 4, num_stages 3, programs_wanted from the device, or
    the tuned settings if given (a tuned entry's "coef_x"), then the sweep's override if any;
    blocks and split from ``split_k_config``."""
    gemm = {"num_warps": 4, "num_stages": 3, "programs_wanted": programs_wanted(device), **(tuned or {}),
            **(GEMM_OVERRIDE or {})}
    block_k, block_m, block_d, rows_per_split, splits = split_k_config(
        total_rows, m, d, gemm["programs_wanted"], gemm.get("BLOCK_K"), gemm.get("BLOCK_M"), gemm.get("BLOCK_D")
    )
    return {**gemm, "BLOCK_K": block_k, "BLOCK_M": block_m, "BLOCK_D": block_d,
            "rows_per_split": rows_per_split, "splits": splits}


def forward(x, prototypes, options: GSPOptions, tuned: dict | None = None):
    """pooled [B, D], attr [B, M], weights [B, N] in x's dtype, u [B] float32, in one launch;
    ``tuned``: the tuned entry (None for none), whose "forward" tiles replace the tile table's."""
    config = launch_config(x.shape[1], prototypes.shape[0], x.shape[2], half_products(x, prototypes),
                           tuned=(tuned or {}).get("forward"))
    _, (prepared, z_scale, _) = row_norms(x, prototypes, options.normalize, features=False)
    logits = x.new_empty((x.shape[0], x.shape[1], prototypes.shape[0]), dtype=torch.float32)  # [B, N, M]
    return per_sample_forward(x, prepared, z_scale, options, config, logits, logits.stride())


def backward(grad_pooled, grad_attr, grad_weights, x, prototypes, u, options: GSPOptions, tuned: dict | None = None):
    """grad_x (x's strides and dtype) and grad_prototypes from contiguous output gradients: the
    per-sample kernel (V, column sums, β and w), the split-K GEMM of the prototype gradient, then
    one launch that finishes both (the prototype epilogue; grad_x as a GEMM over the prototypes
    with its epilogue). ``tuned``: the tuned entry (None for none), whose "backward" tiles and
    "coef_x" GEMM settings replace the built-in ones where given."""
    tuned = tuned or {}
    batch, n, d = x.shape
    m = prototypes.shape[0]
    _, _, f32_precision, _ = resolve_precision(x, prototypes, options.precision)
    config = launch_config(n, m, d, half_products(x, prototypes), backward=True, tuned=tuned.get("backward"))
    native_half_dot = not INTERPRETED  # the interpreter's tl.dot misreads bfloat16 operands
    _, (prepared, z_scale, _) = row_norms(x, prototypes, options.normalize, features=False)
    coef = torch.empty((batch, n, m), dtype=torch.float32, device=x.device)  # x·z′, then V′
    row_coefs, col_sum = per_sample_backward(
        grad_pooled, grad_attr, grad_weights, x, prepared, z_scale, u, options, config, coef, coef.stride(),
    )
    # Σ_b Σ_i W_ki x̂_i = d_z,k Σ_b Σ_i V_ki x_i (as V′ = V·z_scale): one split-K GEMM over all B·N features.
    gemm = gemm_config(batch * n, m, d, x.device, tuned=tuned.get("coef_x"))
    splits = gemm["splits"]
    partials = torch.empty((splits, m, d), dtype=torch.float32, device=x.device)
    _gsp_coef_x_kernel[(cdiv(m, gemm["BLOCK_M"]), cdiv(d, gemm["BLOCK_D"]), splits)](
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
    col_tiles = cdiv(d, block_d)
    _gsp_backward_finish_kernel[(m + col_tiles * cdiv(batch * n, block_r),)](
        partials, splits, col_sum, batch, coef, row_coefs,
        prepared, *prepared.stride(), z_scale, grad_z,
        x, *x.stride(), grad_pooled, grad_x, *grad_x.stride(),
        batch * n, n, m, d, col_tiles,
        BLOCK_ZD=prototype_block_d(d), BLOCK_B=prototype_block_b(batch),
        NORMALIZE=NORMALIZE_CODES[options.normalize],
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_D=block_d,
        SPLIT_BF16=prepared.dtype == torch.bfloat16, NATIVE_HALF_DOT=native_half_dot, PRECISION=f32_precision,
        num_warps=4, num_stages=config["num_stages"],
    )
    return grad_x, grad_z
