"""The @triton.jit math that both strategies of the `triton` backend share (``fused``: the fused
kernels' docstring; ``gemm``: vendor GEMMs for the products): normalization
divisors, snapped costs, the solve of u, the pooling weights, the hi + lo split of float32
operands for half-precision dots, the arrival ticket of split samples, and the epilogues of
grad_x and of the prototype gradient. Symbols: docs/math.md.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...contract import L2_EPS, NORMALIZE_CODES

# The contract's constants and normalization codes as compile-time constants of the kernels.
L2_EPS_CONST = tl.constexpr(L2_EPS)
LIPSCHITZ = tl.constexpr(NORMALIZE_CODES["lipschitz"])
L2 = tl.constexpr(NORMALIZE_CODES["l2"])
NO_NORMALIZE = tl.constexpr(NORMALIZE_CODES["none"])


# Rows whose float32 sum of squares overflows (norms above √max, 1.8e19) are summed again as
# v·2⁻⁷⁰, exact for every normal element: a norm up to float32's max then squares to at most 2¹¹⁶.
ROW_SCALE = tl.constexpr(2.0**70)
INV_ROW_SCALE = tl.constexpr(2.0**-70)
# Rows of a divisor above this (a power of two) give grad_x's β·x as (x/p)·(β p), p ≈ d_x: β ~ 1/d_x²
# would underflow (``_grad_x_epilogue``); p is at most ROW_POWER_CAP, so that 1/p stays normal.
ROW_POWER_FROM = tl.constexpr(2.0**32)
ROW_POWER_CAP = tl.constexpr(2.0**126)


@triton.jit
def _overflow_safe_squares(sum_sq, row_ptrs, ok, stride_d, D, BLOCK_D: tl.constexpr):
    """(s, scale) of rows [R] with |v|² = s·scale², from their float32 sums of squares sum_sq [R]: s =
    sum_sq and scale = 1 where that is finite; where it overflowed, the squares of v·2⁻⁷⁰ summed again
    and scale 2⁷⁰. The second pass over D (rows at row_ptrs [R], columns at stride_d) runs only in
    blocks of rows that hold such a row."""
    overflowed = sum_sq == float("inf")
    scale = tl.where(overflowed, ROW_SCALE, 1.0)
    if tl.max(overflowed.to(tl.int32), 0) > 0:
        scaled = tl.zeros(sum_sq.shape, tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            v = tl.load(row_ptrs[:, None] + cols[None, :] * stride_d, mask=ok[:, None] & (cols < D)[None, :], other=0.0)
            v = v.to(tl.float32) * INV_ROW_SCALE
            scaled += tl.sum(v * v, 1)
        sum_sq = tl.where(overflowed, scaled, sum_sq)
    return sum_sq, scale


@triton.jit
def _power_of_two_floor(v):
    """The largest power of two <= v, for normal v > 0 (its exponent bits)."""
    return (v.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)


@triton.jit
def _row_divisor(sum_sq, scale, NORMALIZE: tl.constexpr):
    """d / scale of rows v = scale·v′ with |v′|² = sum_sq, scale a power of two: d = max(1, |v|)
    (lipschitz), max(|v|, eps) (l2) or 1 (none). Exact scalings: with scale 1 it is the plain d."""
    if NORMALIZE == LIPSCHITZ:
        return tl.maximum(tl.sqrt(sum_sq), 1.0 / scale)
    elif NORMALIZE == L2:
        return tl.maximum(tl.sqrt(sum_sq), (1.0 / scale) * L2_EPS_CONST)
    else:
        return 1.0 / scale


@triton.jit
def _row_factors(sum_sq, scale, NORMALIZE: tl.constexpr):
    """(scale / d, |v̂|²) of rows given as (s, scale) (``_overflow_safe_squares``): v̂ = v′·(scale / d),
    |v̂|² = s·(scale / d)², neither formed from |v|² (which may overflow)."""
    unit = 1.0 / _row_divisor(sum_sq, scale, NORMALIZE)
    return unit, sum_sq * unit * unit


@triton.jit
def _raw_products(
    x_sample, stride_xn, stride_xd, z_ptr, stride_zm, stride_zd, gy_sample,
    rows, protos, N, M, D,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr, WITH_GY: tl.constexpr,
):
    """x·z [BLOCK_N, BLOCK_M], |x|² [BLOCK_N], |z|² [BLOCK_M] and x·gy [BLOCK_N] over D tiles: the
    loop that the kernel's num_stages software-pipelines (the x and z tiles are staged in shared
    memory, so the sums of squares cost no registers next to the tensor-core operands)."""
    row_ok = rows < N
    proto_ok = protos < M
    dots = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    x_sq = tl.zeros((BLOCK_N,), tl.float32)
    z_sq = tl.zeros((BLOCK_M,), tl.float32)
    x_gy = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x_tile = tl.load(  # [BLOCK_N, BLOCK_D]
            x_sample + rows[:, None] * stride_xn + cols[None, :] * stride_xd,
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        )
        z_tile = tl.load(  # [BLOCK_D, BLOCK_M]: zᵀ
            z_ptr + cols[:, None] * stride_zd + protos[None, :] * stride_zm,
            mask=col_ok[:, None] & proto_ok[None, :], other=0.0,
        )
        x_f32 = x_tile.to(tl.float32)
        z_f32 = z_tile.to(tl.float32)
        if CAST_F32:
            dots = tl.dot(x_f32, z_f32, dots, input_precision=PRECISION)
        else:
            dots = tl.dot(x_tile, z_tile, dots, input_precision=PRECISION)
        x_sq += tl.sum(x_f32 * x_f32, 1)
        z_sq += tl.sum(z_f32 * z_f32, 0)
        if WITH_GY:
            gy = tl.load(gy_sample + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_D]
            x_gy += tl.sum(x_f32 * gy[None, :], 1)
    return dots, x_sq, z_sq, x_gy


@triton.jit
def _tile_products(
    x_sample, stride_xn, stride_xd, z_ptr, stride_zm, stride_zd, z_scale_ptr, gy_sample,
    products_sample, stride_pn, stride_pm, x_sq_sample, x_scale_sample, x_gy_sample, z_sq_ptr,
    rows, protos, N, M, D,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr, WITH_GY: tl.constexpr, PARTS: tl.constexpr,
):
    """For a tile: x·z′ [BLOCK_N, BLOCK_M] with the prepared prototypes z′ = z / z_scale
    (``_prepare_prototypes``), |x|² as (s, scale) and x·gy [BLOCK_N], |z′|² and z_scale [BLOCK_M].
    Computed from x and z′ (PARTS == 0, the fused strategy; ``_raw_products``, then
    ``_overflow_safe_squares``), or read (the gemm strategy): x·z′ from the products [N, PARTS·M]
    through their strides, as the sum of PARTS column blocks (the prototypes split into PARTS
    half-precision parts), and the rest from their rows."""
    row_ok = rows < N
    proto_ok = protos < M
    if PARTS == 0:
        dots, x_sq, z_sq, x_gy = _raw_products(
            x_sample, stride_xn, stride_xd, z_ptr, stride_zm, stride_zd, gy_sample,
            rows, protos, N, M, D, BLOCK_N, BLOCK_M, BLOCK_D, CAST_F32, PRECISION, WITH_GY,
        )
        x_sq, x_scale = _overflow_safe_squares(x_sq, x_sample + rows * stride_xn, row_ok, stride_xd, D, BLOCK_D)
    else:
        tile_ok = row_ok[:, None] & proto_ok[None, :]
        tile_ptrs = products_sample + rows[:, None] * stride_pn + protos[None, :] * stride_pm
        dots = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
        for part in tl.static_range(PARTS):
            dots += tl.load(tile_ptrs + part * M * stride_pm, mask=tile_ok, other=0.0)
        x_sq = tl.load(x_sq_sample + rows, mask=row_ok, other=0.0)
        x_scale = tl.load(x_scale_sample + rows, mask=row_ok, other=1.0)
        z_sq = tl.load(z_sq_ptr + protos, mask=proto_ok, other=0.0)
        if WITH_GY:
            x_gy = tl.load(x_gy_sample + rows, mask=row_ok, other=0.0)
        else:
            x_gy = tl.zeros((BLOCK_N,), tl.float32)
    z_scale = tl.load(z_scale_ptr + protos, mask=proto_ok, other=1.0)
    return dots, x_sq, x_scale, z_sq, z_scale, x_gy


@triton.jit
def _snapped_costs(dots, x_sq, x_scale, z_sq, z_scale, snap, NORMALIZE: tl.constexpr, EUCLIDEAN: tl.constexpr):
    """Costs c and x̂·ẑ [BLOCK_N, BLOCK_M], and z_scale / d_z [BLOCK_M], from the products x·z′ and the
    rows' (s, scale) (``_tile_products``). x̂·ẑ = (x·z′ / x_scale)·(x_scale / d_x)·(z_scale / d_z):
    |x·z′| <= |x|, and no factor over- or underflows; powers of two, so with scales of 1 it is the
    plain (x·z)/(d_x d_z), bit for bit."""
    x_unit, xh_sq = _row_factors(x_sq, x_scale, NORMALIZE)  # [BLOCK_N]
    z_unit, zh_sq = _row_factors(z_sq, z_scale, NORMALIZE)  # [BLOCK_M]
    xz = dots * (1.0 / x_scale)[:, None] * x_unit[:, None] * z_unit[None, :]
    norms = xh_sq[:, None] + zh_sq[None, :]
    sq = norms - 2.0 * xz
    sq = tl.where(sq <= snap * norms, 0.0, sq)  # NaN stays NaN
    if EUCLIDEAN:
        cost = tl.sqrt(sq)
    else:
        cost = sq
    return cost, xz, z_unit


@triton.jit
def _prepare_prototypes(z_rows, ok, stride_zd, out_rows, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                        SCALE_ABOVE: tl.constexpr):
    """z′ = z / z_scale into out_rows [BLOCK_R] (contiguous rows of D), and (|z′|², z_scale) [BLOCK_R]:
    z_scale = 2^k with |z′| < 1 for prototypes whose norm reaches 2^SCALE_ABOVE (k at most 127),
    1 for the others (their z′ is z). A power of two: z′ is exact in z's dtype (or float32), and
    the cost products x·z′ stay within |x|. |z′|² is summed in ``_row_sums``'s order, so it is
    |z|²/z_scale² bit for bit where that does not overflow."""
    sq, _ = _row_sums(z_rows, ok, stride_zd, z_rows, D, BLOCK_R, BLOCK_D, False)
    sq, pre_scale = _overflow_safe_squares(sq, z_rows, ok, stride_zd, D, BLOCK_D)
    # |z| = √sq·pre_scale = m·2^e, m in [1, 2): k = e + 1.
    exponent = ((tl.sqrt(sq).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126
    exponent += tl.where(pre_scale > 1.0, 70, 0)
    exponent = tl.where(exponent > SCALE_ABOVE, tl.minimum(exponent, 127), 0)
    z_scale = ((exponent + 127) << 23).to(tl.float32, bitcast=True)
    half_step = 2.0 / z_scale  # >= 2⁻¹²⁶, normal: z / z_scale as (z · 2 / z_scale) · 0.5
    z_sq = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        tile_ok = ok[:, None] & (cols < D)[None, :]
        v = tl.load(z_rows[:, None] + cols[None, :] * stride_zd, mask=tile_ok, other=0.0).to(tl.float32)
        v = v * half_step[:, None] * 0.5
        tl.store(out_rows[:, None] + cols[None, :], v.to(out_rows.dtype.element_ty), mask=tile_ok)
        z_sq += tl.sum(v * v, 1)
    return z_sq, z_scale


@triton.jit
def _row_sums(row_ptrs, ok, stride_d, gy_ptrs, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, WITH_GY: tl.constexpr):
    """Σ_d v², and Σ_d v·gy (WITH_GY; gy rows contiguous), of the rows at row_ptrs [BLOCK_R], in float32."""
    sq = tl.zeros((BLOCK_R,), tl.float32)
    dot = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        tile_ok = ok[:, None] & (cols < D)[None, :]
        v = tl.load(row_ptrs[:, None] + cols[None, :] * stride_d, mask=tile_ok, other=0.0).to(tl.float32)
        sq += tl.sum(v * v, 1)
        if WITH_GY:
            gy = tl.load(gy_ptrs[:, None] + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            dot += tl.sum(v * gy, 1)
    return sq, dot


@triton.jit
def _sigmoid(t):
    """Logistic sigmoid without overflow: exp of −|t| only."""
    decay = tl.exp(-tl.abs(t))
    return tl.where(t >= 0, 1.0 / (1.0 + decay), decay / (1.0 + decay))


@triton.jit
def _split_half(v, dtype: tl.constexpr):
    """float32 v as hi + lo in a half-precision dtype: ~16 (bfloat16) or ~22 (float16, for
    |v| <= 1) significant bits."""
    v_hi = v.to(dtype)
    return v_hi, (v - v_hi.to(tl.float32)).to(dtype)


@triton.jit
def _split_half_dot(v, other, acc, NATIVE_HALF_DOT: tl.constexpr):
    """acc + v @ other for float32 v and half-precision other (bfloat16 or float16) as two
    products in other's dtype, v = hi + lo (``_split_half``): other is exact, the accumulation
    is float32."""
    v_hi, v_lo = _split_half(v, other.dtype)
    if NATIVE_HALF_DOT:
        acc = tl.dot(v_hi, other, acc)
        acc = tl.dot(v_lo, other, acc)
    else:  # the interpreter's tl.dot misreads bfloat16: the same values through float32
        acc = tl.dot(v_hi.to(tl.float32), other.to(tl.float32), acc, input_precision="ieee")
        acc = tl.dot(v_lo.to(tl.float32), other.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _coef_product(v, other, acc, SPLIT: tl.constexpr, NATIVE_HALF_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + v @ other for float32 v: bfloat16 other as hi + lo products (SPLIT), else in
    float32 at PRECISION."""
    if SPLIT:
        acc = _split_half_dot(v, other, acc, NATIVE_HALF_DOT)
    else:
        acc = tl.dot(v, other.to(tl.float32), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _plan_sigma(u, ell, GAP: tl.constexpr):
    """σ_i = σ(u + ℓ_i); exactly 1 for μ = 1."""
    if GAP:
        return tl.full(ell.shape, 1.0, tl.float32)
    else:
        return _sigmoid(u + ell)


@triton.jit
def _tile_weights(ell_sample, rows, N, u, inv_total, GAP: tl.constexpr):
    """(w_i = σ(u + ℓ_i) / (μN), 0 past N; in-range mask) for the feature rows `rows`, ℓ from
    scratch (other programs wrote it: read from L2, ``.cg``)."""
    row_ok = rows < N
    ell = tl.load(ell_sample + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
    return tl.where(row_ok, _plan_sigma(u, ell, GAP) * inv_total, 0.0), row_ok, ell


@triton.jit
def _solve_newton(ell, ok, target, log_target, logit_mu, n_float, tol, max_iter):
    """Bracketed Newton on log Σ σ(u + ℓ_i) = log μN, the rules of the reference's solve_newton."""
    lo = logit_mu - tl.max(tl.where(ok, ell, -float("inf")), 0)
    hi = logit_mu - tl.min(tl.where(ok, ell, float("inf")), 0)
    u = tl.minimum(tl.maximum(logit_mu - tl.sum(tl.where(ok, ell, 0.0), 0) / n_float, lo), hi)
    it = tl.zeros((), tl.int32)
    active = max_iter > 0
    while active:
        s = tl.where(ok, _sigmoid(u + ell), 0.0)
        residual = tl.sum(s, 0) - target
        slope = tl.sum(s * (1.0 - s), 0)
        # A small or non-finite residual stops before any step: on a plateau of Σσ the slope
        # can vanish, and a bisection from an exact root would leave it.
        settled = (tl.abs(residual) <= tol * target) | (residual != residual) | (tl.abs(residual) == float("inf"))
        hi = tl.where(residual > 0, u, hi)
        lo = tl.where(residual < 0, u, lo)
        mass = residual + target
        u_newton = u - (tl.log(mass) - log_target) * mass / slope  # Newton on log Σσ
        inside = (u_newton >= lo) & (u_newton <= hi)  # False for NaN/inf steps too
        u_next = tl.where(inside, u_newton, 0.5 * (lo + hi))
        u_next = tl.where(settled, u, u_next)
        step = tl.abs(u_next - u)
        u = u_next
        scale = tol * tl.maximum(tl.abs(u), 1.0)
        done = settled | (step <= scale) | ((hi - lo) <= scale)
        it += 1
        active = (done == 0) & (it < max_iter)
    return u


@triton.jit
def _solve_fixed_point(ell, ok, log_mu, log_target, max_iter):
    """The paper's iteration in the log domain: u ← u + log(μN) − log Σ σ(u + ℓ_i)."""
    u = log_mu + tl.zeros((), tl.float32)
    for _ in range(max_iter):
        t = u + ell
        log_sigma = tl.minimum(t, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(t)))
        log_sigma = tl.where(ok, log_sigma, -float("inf"))
        top = tl.max(log_sigma, 0)
        log_mass = top + tl.log(tl.sum(tl.exp(log_sigma - top), 0))
        u = u + (log_target - log_mass)
    return u


@triton.jit
def _sample_tile(tiles_per_sample, rows_per_tile, N):
    """This program's sample (int64), its tile of the sample's features and the tile's feature
    range [row_start, row_end): rows_per_tile features (fewer in the last tile), walked in
    BLOCK_N steps (one step unless ``SPLIT_SAMPLES`` is off)."""
    sample = (tl.program_id(0) // tiles_per_sample).to(tl.int64)
    tile = tl.program_id(0) % tiles_per_sample
    row_start = tile * rows_per_tile
    return sample, tile, row_start, tl.minimum(row_start + rows_per_tile, N)


@triton.jit
def _last_to_arrive(arrivals_ptr, sample, tiles_per_sample):
    """True in the last of a sample's programs to get here: a ticket from the sample's arrival
    counter (zeroed per call). The barrier and the counter's acq_rel (GPU scope) order every
    thread's scratch stores before the ticket, and the last program's loads after it."""
    tl.debug_barrier()
    ticket = tl.atomic_add(arrivals_ptr + sample, 1, sem="acq_rel", scope="gpu")
    return ticket == tiles_per_sample - 1


@triton.jit
def _prototype_grad_tile(partial_ptr, splits, z_row, k, cols, M, D, divisor, w_total):
    """ẑ_k and gẑ_k = ẑ_k Σ W − d_z Σ_s partial_s,k on the columns `cols` [BLOCK_D], from the prepared
    row z′ (contiguous) and divisor = d_z / z_scale: the partials hold Σ V′ x with V′ = V·z_scale."""
    z_hat = tl.load(z_row + cols, mask=cols < D, other=0.0).to(tl.float32) / divisor
    coef_x = tl.zeros(cols.shape, tl.float32)
    for split in range(splits):
        coef_x += tl.load(partial_ptr + (split * M + k) * D + cols, mask=cols < D, other=0.0)
    return z_hat, z_hat * w_total - divisor * coef_x


@triton.jit
def _prototype_grad_program(
    k, partial_ptr, splits, col_sum_ptr, batch, z_ptr, z_scale_ptr, grad_z_ptr, M, D,
    BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, NORMALIZE: tl.constexpr,
):
    """Prototype k (int64): gẑ_k = ẑ_k Σ_b Σ_i W_ki − d_z Σ_s partial_s,k (= Σ W x̂), then the
    normalization backward (gẑ − (ẑ·gẑ) ẑ [projects]) / d_z; every sum in a fixed order. z_ptr: the
    prepared prototypes z′ = z / z_scale [M, D] (``_prepare_prototypes``)."""
    col_total = tl.zeros((BLOCK_B,), tl.float32)
    for b0 in range(0, batch, BLOCK_B):
        samples = b0 + tl.arange(0, BLOCK_B)
        col_total += tl.load(col_sum_ptr + samples.to(tl.int64) * M + k, mask=samples < batch, other=0.0)
    w_total = tl.sum(col_total, 0)
    z_row = z_ptr + k * D
    z_scale = tl.load(z_scale_ptr + k)
    z_sq = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        z = tl.load(z_row + cols, mask=cols < D, other=0.0).to(tl.float32)
        z_sq += z * z
    scaled_divisor = _row_divisor(tl.sum(z_sq, 0), z_scale, NORMALIZE)  # d_z / z_scale
    divisor = scaled_divisor * z_scale  # d_z, exactly
    # Pass 1: the radial part ẑ·gẑ; pass 2 recomputes gẑ (cheaper than a scratch row) and writes.
    radial = tl.zeros((BLOCK_D,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        z_hat, grad_z_hat = _prototype_grad_tile(partial_ptr, splits, z_row, k, cols, M, D, scaled_divisor, w_total)
        radial += z_hat * grad_z_hat
    if NORMALIZE == LIPSCHITZ:
        radial_sum = tl.where(divisor > 1.0, tl.sum(radial, 0), 0.0)
    elif NORMALIZE == L2:
        radial_sum = tl.where(divisor > L2_EPS_CONST, tl.sum(radial, 0), 0.0)
    else:
        radial_sum = 0.0
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        z_hat, grad_z_hat = _prototype_grad_tile(partial_ptr, splits, z_row, k, cols, M, D, scaled_divisor, w_total)
        grad_z = (grad_z_hat - radial_sum * z_hat) / divisor
        tl.store(grad_z_ptr + k * D + cols, grad_z.to(grad_z_ptr.dtype.element_ty), mask=cols < D)


@triton.jit
def _grad_x_row_coefs(coef_sum, coef_dot, x_sq, x_scale, NORMALIZE: tl.constexpr):
    """(β p, 1/p) [rows] of grad_x = β x − V z + w gy, from S = Σ_k W and Σ_k W x̂·ẑ: r = x̂·gx̂ =
    |x̂|² S − Σ_k W x̂·ẑ, β = (S − r·[projects]) / d_x². β x is formed as (x/p)·(β p) with p a power of
    two near d_x for long rows (d_x >= ``ROW_POWER_FROM``), 1 for the others: β alone, ~S / d_x²,
    would underflow."""
    x_unit, xh_sq = _row_factors(x_sq, x_scale, NORMALIZE)
    inv_dx = x_unit / x_scale
    radial = xh_sq * coef_sum - coef_dot
    if NORMALIZE == LIPSCHITZ:
        radial = tl.where(inv_dx < 1.0, radial, 0.0)
    elif NORMALIZE == NO_NORMALIZE:
        radial = radial * 0.0
    power = tl.minimum(_power_of_two_floor(1.0 / x_unit) * x_scale, ROW_POWER_CAP)  # ~ d_x
    power = tl.where(inv_dx * ROW_POWER_FROM <= 1.0, power, 1.0)
    return (coef_sum - radial) * inv_dx * (x_unit * (power / x_scale)), 1.0 / power


@triton.jit
def _grad_x_epilogue(
    coef_z, feature, feature_ok, cols, col_ok, row_coefs_ptr,
    x_ptr, stride_xb, stride_xn, stride_xd, grad_pooled_ptr, grad_x_ptr, stride_gb, stride_gn, stride_gd, N, D,
):
    """grad_x = (x/p)(β p) − V z + w gy on a [rows, cols] tile of all B·N features (feature r = b·N + i),
    from V z [rows, cols] (coef_z) and β p, w, 1/p of the per-sample kernel (row_coefs [B, 3, N])."""
    sample = (feature // N).to(tl.int64)
    row = feature % N
    tile_ok = feature_ok[:, None] & col_ok[None, :]
    beta = tl.load(row_coefs_ptr + sample * 3 * N + row, mask=feature_ok, other=0.0)  # [rows]: β p
    w = tl.load(row_coefs_ptr + (sample * 3 + 1) * N + row, mask=feature_ok, other=0.0)
    inv_power = tl.load(row_coefs_ptr + (sample * 3 + 2) * N + row, mask=feature_ok, other=1.0)  # 1/p
    x_tile = tl.load(
        x_ptr + (sample * stride_xb + row * stride_xn)[:, None] + cols[None, :] * stride_xd, mask=tile_ok, other=0.0
    ).to(tl.float32)
    gy = tl.load(grad_pooled_ptr + sample[:, None] * D + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    grad_x = (x_tile * inv_power[:, None]) * beta[:, None] - coef_z + w[:, None] * gy
    tl.store(
        grad_x_ptr + (sample * stride_gb + row * stride_gn)[:, None] + cols[None, :] * stride_gd,
        grad_x.to(grad_x_ptr.dtype.element_ty), mask=tile_ok,
    )
