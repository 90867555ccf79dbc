"""The `triton` backend's gemm strategy: the three big products on the vendor GEMM (cuBLAS, through
torch.mm / torch.bmm), the rest in Triton. Math and symbols: docs/math.md; the fused strategy:
``fused``; the per-sample kernels that both strategies launch: ``kernels`` (launched by
``launch``); their shared math: ``jit_math``.

Why a second design: the fused kernels compute the cost products themselves, so their speed
rests on Triton's tiles and register allocation for each GPU and Triton version
(``launch.register_cap``: 3.6 builds the half kernels in 165-174 registers where 3.9 takes
95-106). Here the intermediate is small: the products are [B·N, M] float32 (25 MB at B=256, N=196, M=128, next
to 51 MB of bfloat16 features), so writing them to memory and reading them back costs about
what a second read of x does, and the products themselves run at the vendor library's speed on
any GPU (the pattern of Liger-Kernel's fused linear cross-entropy: torch.matmul for the logits,
Triton around it).

- Forward: the norms kernel ``_gsp_norms_kernel`` (|x|² per feature; the prepared prototypes
  z′ = z / z_scale and |z′|², ``launch.row_norms``: one read of x), the products P = x·z′ᵀ as one GEMM over all B·N features ([B·N, M]; a channels-first map, which
  does not fold to a matrix, as a batched GEMM [B, M, N] with x's transpose as the contiguous
  operand: no copy of x), then the fused strategy's own forward kernel with ``PARTS`` > 0: it
  reads P instead of computing it and writes the logits over it (no [B, N, M] tensor beyond P);
  costs, logsumexp, the solve, weights, attr and pooled are the same code. pooled stays in that
  kernel (x re-read per sample) rather than a vendor batched product: that would be one more
  launch and, for half x, a hi + lo pair of weights to stay float32-accurate.
- Backward: the norms kernel again, with x·gy; P again (the op saves only x, prototypes and u;
  recomputing is one GEMM, saving would be 25 MB more held between the passes); the fused
  per-sample backward kernel with ``PARTS`` > 0, which writes V over P (and, for bfloat16 x,
  V as a bfloat16 hi + lo pair for the GEMMs); then Σ_b Vᵀx and V z as vendor GEMMs, and
  ``_gsp_gemm_backward_finish_kernel``: the prototype epilogue (``_prototype_grad_program``,
  shared) and grad_x = β x − V z + w gy elementwise through x's strides. V z goes through memory in
  float32 ([B·N, D]): cuBLAS cannot apply the per-row β x + w gy epilogue itself.
- Launches: forward 4 (norms, GEMM, counters' memset, per-sample kernel); backward 7 (norms,
  GEMM, memset, per-sample kernel, two GEMMs, finish), plus the prototypes' split for mixed
  dtypes, the float32 copy of float16 x (below) and, for channels-first maps, the sum over the
  batch of the per-sample Vᵀx. No host sync; deterministic: cuBLAS GEMMs on one stream and
  torch's sums are, and the Triton kernels are the fused strategy's. Under
  ``torch.use_deterministic_algorithms(True)`` torch refuses cuBLAS on CUDA unless
  CUBLAS_WORKSPACE_CONFIG is set (``runs_on``): the backend's ``strategy_for`` then takes the fused
  strategy instead of a tuned entry's gemm. The GEMMs run with the caller's autocast off (the op
  is called under it, and autocast would cast torch.mm to half precision).

Precision of the products, as the fused strategy's (``fused``'s docstring):
- float32: cuBLAS float32 with TF32 off for "ieee", "tf32x3" and "auto" (full float32
  products, at least as accurate as 3xTF32; cuBLAS has no 3xTF32), TF32 on for "tf32" (the
  global torch setting, changed around a GEMM only where it differs: ``_float32_gemms``).
- bfloat16 / float16 x with prototypes of the same dtype: a half GEMM with a float32 result
  (torch.mm's ``out_dtype``): exact products, float32 accumulation.
- Mixed (autocast: half x, float32 prototypes): the prototypes as 3 bfloat16 (or 2 float16)
  parts whose sum is z to ~float32 accuracy, one GEMM of 3M (2M) columns, summed in the kernel.
- The backward's V (float32): for bfloat16 x, Vᵀx uses V as bfloat16 hi + lo (one GEMM of 2M
  rows, V to ~16 bits, as the fused strategy's split dots), and so does V z when the
  prototypes are bfloat16 too (z stacked twice); otherwise float32 GEMMs at ``precision``.
  float16 x is upcast to float32 for Vᵀx (a copy of x): V in float16 would overflow under
  loss scaling.
On the CPU (the interpreter's tests) half products go through float32 (torch's CPU GEMMs have
no ``out_dtype``): the same values, as products of half values are exact in float32.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from ...contract import HALF_DTYPES, NORMALIZE_CODES, GSPOptions, autocast_off
from .kernels import _gsp_gemm_backward_finish_kernel
from .launch import (
    COLS_BLOCK,
    ROWS_BLOCK,
    cdiv,
    next_pow2,
    per_sample_backward,
    per_sample_forward,
    prototype_block_b,
    prototype_block_d,
    resolve_precision,
    row_norms,
    with_overrides,
)

# ----------------------------------------------------------------------------- host glue


def _half_gemm_with_float32_result() -> bool:
    """Whether torch.mm and torch.bmm take ``out_dtype`` on CUDA (half operands, float32 result):
    the overloads ``aten::mm.dtype`` / ``aten::bmm.dtype`` with a CUDA kernel (torch >= 2.8). Asked
    of the dispatcher, which is what a CUDA call reaches: a check on meta tensors tests the meta
    kernel instead (present or missing independently of the CUDA one)."""
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") for op in ("aten::mm.dtype", "aten::bmm.dtype"))
    except RuntimeError:  # the overload does not exist
        return False


_HALF_OUT_DTYPE = _half_gemm_with_float32_result()
# cuBLAS's reproducible workspace settings (torch checks CUBLAS_WORKSPACE_CONFIG against these
# when deterministic algorithms are on).
_DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def runs_on(device: torch.device) -> bool:
    """Whether torch lets this strategy's GEMMs run on ``device`` now: not on CUDA under
    ``torch.use_deterministic_algorithms(True)`` unless CUBLAS_WORKSPACE_CONFIG is one of
    ``_DETERMINISTIC_CUBLAS`` (torch.mm then raises, or warns in warn-only mode). The GEMMs are
    bitwise repeatable on one stream either way (cuBLAS's own guarantee, same GPU and library);
    the setting matters where several streams share its workspaces."""
    return device.type != "cuda" or not torch.are_deterministic_algorithms_enabled() or (
        os.environ.get("CUBLAS_WORKSPACE_CONFIG") in _DETERMINISTIC_CUBLAS
    )


def _effective_float32_precision() -> str:
    """What cuBLAS uses for float32 GEMMs now, by the torch >= 2.9 API: "tf32" or "ieee" (its
    getter already resolves "none" through the cuda and generic settings; "none" left is ieee)."""
    value = torch.backends.cuda.matmul.fp32_precision
    return "tf32" if value == "tf32" else "ieee"


@contextlib.contextmanager
def _float32_gemms(precision: str):
    """cuBLAS float32 GEMMs inside: TF32 for "tf32", full float32 otherwise. torch's global
    setting, changed only where it differs and restored on exit, by the API that cuBLAS reads:
    torch >= 2.9's ``fp32_precision`` (there the legacy ``allow_tf32`` is deprecated, and its
    getter raises while the two APIs disagree: a caller's legacy "high" with "ieee" here, for the
    GEMM's duration), else ``allow_tf32``. The getter resolves "none" (inherit) to its value, so a
    restore pins what was inherited. Host state: safe under CUDA graph capture and inside
    torch.compile (the op is opaque there); not thread-safe (the flag is process-wide)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        name, wanted, current = "fp32_precision", "tf32" if precision == "tf32" else "ieee", _effective_float32_precision()
    else:
        name, wanted = "allow_tf32", precision == "tf32"
        current = matmul.allow_tf32
    if current == wanted:
        yield
        return
    previous = getattr(matmul, name)
    setattr(matmul, name, wanted)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def _product(op, a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """op(a, b) (torch.mm or torch.bmm) in float32, with autocast off (``autocast_off``: also for
    callers of the backend's functions that bypass ``gsp_pool``, such as the sweep):
    float32 operands at ``precision``; half operands (one dtype) natively with a float32 result,
    or through float32 where torch cannot (the CPU), which is exact for products of half values
    (also under TF32: its 10-bit mantissa holds theirs)."""
    with autocast_off(a.device.type):
        if a.dtype == torch.float32:
            if not a.is_cuda:
                return op(a, b)
            with _float32_gemms(precision):
                return op(a, b)
        if a.is_cuda and _HALF_OUT_DTYPE:
            return op(a, b, out_dtype=torch.float32)
        return op(a.float(), b.float())


def _prototype_columns(x: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(the prototypes as the GEMM's [PARTS·M, D] operand next to x, PARTS): themselves in x's
    dtype, float32 for float32 x, or for half x with other prototypes (autocast) float32 z split
    into PARTS parts in x's dtype that sum to z within float32's accuracy (bfloat16: 3 of 8 bits;
    float16: 2 of 11, down to its subnormal spacing 2⁻²⁴)."""
    if prototypes.dtype == x.dtype:
        return prototypes, 1
    if x.dtype == torch.float32:
        return prototypes.float(), 1
    rest = prototypes.float()
    parts = []
    for _ in range(3 if x.dtype == torch.bfloat16 else 2):
        parts.append(rest.to(x.dtype))
        rest = rest - parts[-1].float()
    return torch.cat(parts), len(parts)


def _folds(x: torch.Tensor) -> bool:
    """Whether x [B, N, D] is one [B·N, D] matrix (feature b·N + i at one row stride)."""
    return x.shape[0] == 1 or x.stride(0) == x.shape[1] * x.stride(1)


def _products(x: torch.Tensor, columns: torch.Tensor, precision: str) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """x·c for every feature and row c of columns [K, D], float32, and its (b, i, k) strides: one
    GEMM [B·N, K] when x folds, else a batched one [B, K, N] with x's transpose as the operand (a
    channels-first map's contiguous layout: no copy)."""
    batch, n, d = x.shape
    k = columns.shape[0]
    if _folds(x):
        products = _product(torch.mm, x.reshape(batch * n, d), columns.t(), precision)  # [B·N, K]
        return products, (n * products.stride(0), products.stride(0), products.stride(1))
    products = _product(torch.bmm, columns.expand(batch, k, d), x.transpose(1, 2), precision)  # [B, K, N]
    return products, (products.stride(0), products.stride(2), products.stride(1))


@functools.lru_cache(maxsize=256)
def tile_config(n: int, m: int, d: int, half: bool, backward: bool, rows_layout: bool = True) -> dict:
    """The per-sample kernels' tiles for a (N, M, D) bucket (powers of two) when the products are
    given (no cost GEMM inside). From sm_90 builds at N=196, M=128, D=512 (Triton 3.8,
    ``test_triton._compile_gemm_strategy``), the widest prototype tiles that build without
    spills for both layouts of the products (a channels-first map's [B, M, N] needs more
    registers: its tiles are loaded along features): the forward 64 prototypes at 4 warps in
    float32 (168 / 254 registers: 2-3 programs per SM), 32 at 8 warps for half inputs (under the
    two-programs-per-SM cap: 120-126); the backward, whose pass 2 holds five [BLOCK_N, BLOCK_M]
    temporaries, 32 at 8 warps (96-128), but 16 for a channels-first map's products
    (``rows_layout`` False): the device's Triton 3.6 spills at 32 there (8 bytes of stack, float32
    and bfloat16; ``scripts/device_versions_check.sh``), and builds 16 in 64-128 registers. BLOCK_D
    is the pooling product's step, as in the fused kernel. To be tuned on the GPU."""
    if backward:
        widest_m = 32 if rows_layout else 16
    else:
        widest_m = 32 if half else 64
    block_n = min(max(n, 16), 64)
    block_m = min(max(m, 16), widest_m)
    block_d = min(max(d, 16), 64 if half else 32)
    num_warps = 4 if not (half or backward) else 8
    return {"BLOCK_N": block_n, "BLOCK_M": block_m, "BLOCK_D": block_d, "num_warps": num_warps, "num_stages": 3}


def launch_config(n: int, m: int, d: int, half: bool, backward: bool = False, rows_layout: bool = True) -> dict:
    """The table entry for this shape's bucket and products' layout (``rows_layout``: [B·N, M],
    else a channels-first map's [B, M, N]), then the test override and the fused kernels' register
    cap for half-precision inputs (``launch.with_overrides``)."""
    config = tile_config(next_pow2(n), next_pow2(m), next_pow2(d), half, backward, rows_layout)
    return with_overrides(config, half)


def forward(x, prototypes, options: GSPOptions):
    """pooled [B, D], attr [B, M], weights [B, N] in x's dtype, u [B] float32 (x's device current)."""
    _, _, f32_precision, _ = resolve_precision(x, prototypes, options.precision)
    config = launch_config(x.shape[1], prototypes.shape[0], x.shape[2], x.dtype in HALF_DTYPES)
    x_rows, (prepared, z_scale, z_sq) = row_norms(x, prototypes, options.normalize)
    columns, parts = _prototype_columns(x, prepared)
    products, strides = _products(x, columns, f32_precision)  # x·z′, then the logits, in place
    return per_sample_forward(x, prepared, z_scale, options, config, products, strides, x_rows, z_sq, parts)


def backward(grad_pooled, grad_attr, grad_weights, x, prototypes, u, options: GSPOptions):
    """grad_x (x's strides and dtype) and grad_prototypes; the output gradients contiguous."""
    batch, n, d = x.shape
    m = prototypes.shape[0]
    _, _, f32_precision, _ = resolve_precision(x, prototypes, options.precision)
    config = launch_config(n, m, d, x.dtype in HALF_DTYPES, backward=True, rows_layout=_folds(x))
    x_rows, (prepared, z_scale, z_sq) = row_norms(x, prototypes, options.normalize, grad_pooled)
    columns, parts = _prototype_columns(x, prepared)
    products, strides = _products(x, columns, f32_precision)  # x·z′, then V′ (float32) over its first block
    folds = _folds(x)
    pair = None  # bfloat16 x: V as hi + lo, [B·N, 2M] or [B, 2M, N] like the products
    if x.dtype == torch.bfloat16:
        pair = x.new_empty((batch * n, 2 * m) if folds else (batch, 2 * m, n))
    pair_strides = (0, 0, 0) if pair is None else (
        (n * pair.stride(0), pair.stride(0), 1) if folds else (pair.stride(0), 1, pair.stride(1))
    )
    row_coefs, col_sum = per_sample_backward(
        grad_pooled, grad_attr, grad_weights, x, prepared, z_scale, u, options, config,
        products, strides, x_rows, z_sq, parts, pair, pair_strides,
    )
    v = products[:, :m] if folds else products[:, :m, :]  # [B·N, M] or [B, M, N] float32
    v_x = pair if pair is not None else v
    features = x.float() if x.dtype == torch.float16 else x
    v_z, z_columns = (pair, torch.cat([prepared, prepared])) if (
        pair is not None and prepared.dtype == torch.bfloat16) else (v, prepared.float())
    if folds:
        partials = _product(torch.mm, v_x.t(), features.reshape(batch * n, d), f32_precision)  # [S·M, D]
        coef_z = _product(torch.mm, v_z, z_columns, f32_precision)  # [B·N, D]
        coef_z_strides = (n * coef_z.stride(0), coef_z.stride(0), coef_z.stride(1))
    else:
        partials = _product(torch.bmm, v_x, features, f32_precision).sum(0)  # Σ_b of [B, S·M, D], fixed order
        z_t = z_columns.t().expand(batch, d, z_columns.shape[0])  # [B, D, K]
        coef_z = _product(torch.bmm, z_t, v_z, f32_precision)  # [B, D, N]
        coef_z_strides = (coef_z.stride(0), coef_z.stride(2), coef_z.stride(1))
    grad_z = torch.empty((m, d), dtype=prototypes.dtype, device=x.device)
    grad_x = torch.empty_like(x)
    col_tiles = cdiv(d, COLS_BLOCK)
    _gsp_gemm_backward_finish_kernel[(m + col_tiles * cdiv(batch * n, ROWS_BLOCK),)](
        partials, partials.shape[0] // m, col_sum, batch, row_coefs,
        prepared, z_scale, grad_z,
        coef_z, *coef_z_strides,
        x, *x.stride(), grad_pooled, grad_x, *grad_x.stride(),
        batch * n, n, m, d, col_tiles,
        BLOCK_ZD=prototype_block_d(d), BLOCK_B=prototype_block_b(batch),
        NORMALIZE=NORMALIZE_CODES[options.normalize], BLOCK_R=ROWS_BLOCK, BLOCK_D=COLS_BLOCK, num_warps=4,
    )
    return grad_x, grad_z
