"""Every @triton.jit kernel of the `triton` backend: the per-sample forward and backward kernels
that both strategies launch (``launch``), the fused strategy's split-K GEMM and finishing kernel
(``fused``, whose docstring holds the design, launch layout and precision rules), the norms
kernel (the gemm strategy's row norms; both strategies' prepared prototypes) and the gemm
strategy's finishing kernel (``gemm``). The @triton.jit math they share is in ``jit_math``."""

from __future__ import annotations

import triton
import triton.language as tl

from .jit_math import (
    _coef_product,
    _grad_x_epilogue,
    _grad_x_row_coefs,
    _last_to_arrive,
    _overflow_safe_squares,
    _plan_sigma,
    _prepare_prototypes,
    _prototype_grad_program,
    _row_factors,
    _row_sums,
    _sample_tile,
    _snapped_costs,
    _solve_fixed_point,
    _solve_newton,
    _split_half,
    _split_half_dot,
    _tile_products,
    _tile_weights,
)


@triton.jit(do_not_specialize=["max_iter"])
def _gsp_forward_kernel(
    x_ptr, stride_xb, stride_xn, stride_xd,
    z_ptr, stride_zm, stride_zd, z_scale_ptr,  # the prepared prototypes z′ = z / z_scale [M, D], z_scale [M]
    pooled_ptr, attr_ptr, weights_ptr, u_ptr,
    logits_ptr, ell_ptr, arrivals_ptr,  # scratch: [B, N, M], [B, N] float32; [B] int32 zeros
    stride_lb, stride_ln, stride_lm,  # the logits' strides
    x_sq_ptr, x_scale_ptr, z_sq_ptr,  # PARTS > 0: |x|² as (s, scale) [B·N] each, |z′|² [M]
    N, M, D, rows_per_tile, tiles_per_sample,
    gamma, snap, inv_total, target, logit_mu, log_mu, log_target, tol, max_iter,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_ALL_N: tl.constexpr,
    NORMALIZE: tl.constexpr, EUCLIDEAN: tl.constexpr, NEWTON: tl.constexpr, GAP: tl.constexpr,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr, POOL_PRECISION: tl.constexpr,
    SPLIT_HALF: tl.constexpr, NATIVE_HALF_DOT: tl.constexpr, PARTS: tl.constexpr,
):
    """A program per (sample, tile of at most BLOCK_N features): the costs and ℓ of its features;
    the sample's last program to finish then solves u and writes pooled [D], attr [M],
    weights [N] and u. PARTS > 0 (the gemm strategy): the logits scratch holds the products x·z
    on entry, as PARTS column blocks of M, and the logits are written over the first block."""
    sample, _tile, row_start, row_end = _sample_tile(tiles_per_sample, rows_per_tile, N)
    x_sample = x_ptr + sample * stride_xb
    logits_sample = logits_ptr + sample * stride_lb
    ell_sample = ell_ptr + sample * N

    # 1. This tile's logits −γc to scratch, ℓ by online logsumexp over prototype tiles (the
    # loop over D inside is the pipelined one).
    for n0 in tl.range(row_start, row_end, BLOCK_N, num_stages=1):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        running_max = tl.full((BLOCK_N,), -float("inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_N,), tl.float32)
        for m0 in tl.range(0, M, BLOCK_M, num_stages=1):
            protos = m0 + tl.arange(0, BLOCK_M)
            proto_ok = protos < M
            dots, x_sq, x_scale, z_sq, z_scale, _ = _tile_products(
                x_sample, stride_xn, stride_xd, z_ptr, stride_zm, stride_zd, z_scale_ptr, x_sample,
                logits_sample, stride_ln, stride_lm, x_sq_ptr + sample * N, x_scale_ptr + sample * N, x_sq_ptr,
                z_sq_ptr, rows, protos, row_end, M, D, BLOCK_N, BLOCK_M, BLOCK_D, CAST_F32, PRECISION, False, PARTS,
            )
            cost, _, _ = _snapped_costs(dots, x_sq, x_scale, z_sq, z_scale, snap, NORMALIZE, EUCLIDEAN)
            logits = tl.where(proto_ok[None, :], -gamma * cost, -float("inf"))  # [BLOCK_N, BLOCK_M]
            tl.store(
                logits_sample + rows[:, None] * stride_ln + protos[None, :] * stride_lm, logits,
                mask=row_ok[:, None] & proto_ok[None, :],
            )
            new_max = tl.maximum(running_max, tl.max(logits, 1))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(
                tl.exp(logits - new_max[:, None]), 1
            )
            running_max = new_max
        tl.store(ell_sample + rows, running_max + tl.log(running_sum), mask=row_ok)

    # 2-4 in the sample's last program, once every tile's ℓ and logits are in scratch.
    if _last_to_arrive(arrivals_ptr, sample, tiles_per_sample):
        # 2. the root u, with ℓ of the whole sample in registers.
        all_rows = tl.arange(0, BLOCK_ALL_N)
        all_ok = all_rows < N
        ell_all = tl.load(ell_sample + all_rows, mask=all_ok, other=0.0, cache_modifier=".cg")  # [BLOCK_ALL_N]
        if GAP:
            u = float("inf") + tl.zeros((), tl.float32)
        elif NEWTON:
            u = _solve_newton(ell_all, all_ok, target, log_target, logit_mu, N * 1.0, tol, max_iter)
        else:
            u = _solve_fixed_point(ell_all, all_ok, log_mu, log_target, max_iter)
        tl.store(u_ptr + sample, u)
        weight_sum = tl.sum(tl.where(all_ok, _plan_sigma(u, ell_all, GAP), 0.0), 0) * inv_total

        # 3. pooled = Σ_i w_i x_i over D tiles, as a product whose first operand holds the weights
        # in row 0 of [16, BLOCK_N] (tl.dot's smallest tile): the loop over feature tiles is then
        # one that num_stages pipelines (Triton pipelines loads that feed dots), instead of one
        # dependent L2 round trip per x tile. float32-accurate products, whatever PRECISION says.
        weight_row = tl.arange(0, 16)[:, None] == 0  # [16, 1]
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            pooled_rows = tl.zeros((16, BLOCK_D), tl.float32)
            for n0 in range(0, N, BLOCK_N):
                rows = n0 + tl.arange(0, BLOCK_N)
                w, row_ok, _ = _tile_weights(ell_sample, rows, N, u, inv_total, GAP)  # [BLOCK_N]
                x_tile = tl.load(  # [BLOCK_N, BLOCK_D]
                    x_sample + rows[:, None] * stride_xn + cols[None, :] * stride_xd,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                )
                weights16 = tl.where(weight_row, w[None, :], 0.0)  # [16, BLOCK_N]
                if SPLIT_HALF:  # w <= 1 (the weights sum to 1): no float16 overflow
                    pooled_rows = _split_half_dot(weights16, x_tile, pooled_rows, NATIVE_HALF_DOT)
                else:
                    pooled_rows = tl.dot(weights16, x_tile.to(tl.float32), pooled_rows, input_precision=POOL_PRECISION)
            pooled = tl.sum(pooled_rows, 0)  # row 0
            tl.store(pooled_ptr + sample * D + cols, pooled.to(pooled_ptr.dtype.element_ty), mask=col_ok)

        # 4. attr_k = Σ_i w_i A_ki from the logits scratch; weights on the first prototype tile.
        for m0 in range(0, M, BLOCK_M):
            protos = m0 + tl.arange(0, BLOCK_M)
            proto_ok = protos < M
            attr = tl.zeros((BLOCK_M,), tl.float32)
            for n0 in range(0, N, BLOCK_N):
                rows = n0 + tl.arange(0, BLOCK_N)
                w, row_ok, ell = _tile_weights(ell_sample, rows, N, u, inv_total, GAP)
                tl.store(weights_ptr + sample * N + rows, w.to(weights_ptr.dtype.element_ty), mask=row_ok & (m0 == 0))
                logits = tl.load(
                    logits_sample + rows[:, None] * stride_ln + protos[None, :] * stride_lm,
                    mask=row_ok[:, None] & proto_ok[None, :], other=-float("inf"), cache_modifier=".cg",
                )
                assign = tl.exp(logits - ell[:, None])  # A_ki laid out [i, k]
                attr += tl.sum(w[:, None] * assign, 0)
            if not NEWTON:
                attr = attr / weight_sum  # the paper's final update: the attribute sums to 1
            tl.store(attr_ptr + sample * M + protos, attr.to(attr_ptr.dtype.element_ty), mask=proto_ok)


@triton.jit
def _gsp_backward_kernel(
    x_ptr, stride_xb, stride_xn, stride_xd,
    z_ptr, stride_zm, stride_zd, z_scale_ptr,  # the prepared prototypes z′ = z / z_scale [M, D], z_scale [M]
    u_ptr, grad_pooled_ptr, grad_attr_ptr, grad_weights_ptr,  # [B], [B, D], [B, M], [B, N] contiguous
    coef_ptr, row_coefs_ptr,  # out: V′ = V·z_scale [B, N, M] (x·z′ until pass 2), (β p, w, 1/p) [B, 3, N]
    rows_ptr, z_sq_ptr, col_sum_ptr,  # scratch [B, 5, N]; out: |z′|² [B, M], Σ_i W_ki [B, M] float32
    tile_sums_ptr, arrivals_ptr,  # scratch: Σ h, Σ h e per tile [B, tiles, 2] float32; [B] int32 zeros
    stride_cb, stride_cn, stride_cm,  # V's strides
    x_sq_ptr, x_scale_ptr, x_gy_ptr, z_sq_in_ptr,  # PARTS > 0: |x|² as (s, scale), x·gy [B·N], |z′|² [M]
    pair_ptr, stride_vb, stride_vn, stride_vm,  # V_PAIR: V as hi, lo [B, N, 2M] in x's dtype (strided)
    N, M, D, rows_per_tile, tiles_per_sample,
    gamma, snap, inv_total,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    NORMALIZE: tl.constexpr, EUCLIDEAN: tl.constexpr, GAP: tl.constexpr,
    CAST_F32: tl.constexpr, PRECISION: tl.constexpr, PARTS: tl.constexpr, V_PAIR: tl.constexpr,
):
    """A program per (sample, tile of at most BLOCK_N features) for pass 1; the sample's last
    program to finish it runs pass 2: V′ = W z_scale / (d_x d_z) [N, M] (V′ z′ = V z), the column
    sums of W [M], and per feature the coefficients of grad_x = β x − V z + w gy
    (``_grad_x_row_coefs``, ``_grad_x_tile``). PARTS > 0
    (the gemm strategy): V's buffer holds the products x·z on entry, as PARTS column blocks of
    M (``_tile_products``), and V is written over the first block."""
    sample, tile, row_start, row_end = _sample_tile(tiles_per_sample, rows_per_tile, N)
    x_sample = x_ptr + sample * stride_xb
    coef_sample = coef_ptr + sample * stride_cb
    ell_row = rows_ptr + sample * 5 * N  # rows scratch: ℓ, ā, e, |x|² as (s, scale)
    abar_row = ell_row + N
    e_row = ell_row + 2 * N
    x_sq_row = ell_row + 3 * N
    x_scale_row = ell_row + 4 * N
    beta_row = row_coefs_ptr + sample * 3 * N
    w_row = beta_row + N
    inv_power_row = beta_row + 2 * N
    z_sq_sample = z_sq_ptr + sample * M
    col_sum_sample = col_sum_ptr + sample * M
    tile_sums_sample = tile_sums_ptr + sample * tiles_per_sample * 2
    grad_pooled_sample = grad_pooled_ptr + sample * D
    grad_attr_sample = grad_attr_ptr + sample * M
    u = tl.load(u_ptr + sample)

    # Pass 1, this tile's features: raw products to scratch; ℓ and ā online; e_i; Σ h and Σ h e.
    h_sum = tl.zeros((), tl.float32)
    he_sum = tl.zeros((), tl.float32)
    for n0 in tl.range(row_start, row_end, BLOCK_N, num_stages=1):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        running_max = tl.full((BLOCK_N,), -float("inf"), tl.float32)
        running_sum = tl.zeros((BLOCK_N,), tl.float32)
        running_ga = tl.zeros((BLOCK_N,), tl.float32)
        x_sq = tl.zeros((BLOCK_N,), tl.float32)
        x_scale = tl.full((BLOCK_N,), 1.0, tl.float32)
        x_gy = tl.zeros((BLOCK_N,), tl.float32)
        for m0 in tl.range(0, M, BLOCK_M, num_stages=1):
            protos = m0 + tl.arange(0, BLOCK_M)
            proto_ok = protos < M
            dots, x_sq, x_scale, z_sq, z_scale, x_gy = _tile_products(
                x_sample, stride_xn, stride_xd, z_ptr, stride_zm, stride_zd, z_scale_ptr, grad_pooled_sample,
                coef_sample, stride_cn, stride_cm, x_sq_ptr + sample * N, x_scale_ptr + sample * N,
                x_gy_ptr + sample * N, z_sq_in_ptr,
                rows, protos, row_end, M, D, BLOCK_N, BLOCK_M, BLOCK_D, CAST_F32, PRECISION, True, PARTS,
            )
            if PARTS != 1:  # one block of given products is in place already
                tl.store(
                    coef_sample + rows[:, None] * stride_cn + protos[None, :] * stride_cm, dots,
                    mask=row_ok[:, None] & proto_ok[None, :],
                )
            if n0 == 0:
                tl.store(z_sq_sample + protos, z_sq, mask=proto_ok)
            cost, _, _ = _snapped_costs(dots, x_sq, x_scale, z_sq, z_scale, snap, NORMALIZE, EUCLIDEAN)
            logits = tl.where(proto_ok[None, :], -gamma * cost, -float("inf"))
            ga = tl.load(grad_attr_sample + protos, mask=proto_ok, other=0.0).to(tl.float32)  # [BLOCK_M]
            new_max = tl.maximum(running_max, tl.max(logits, 1))
            rescale = tl.exp(running_max - new_max)
            unnormalized = tl.exp(logits - new_max[:, None])
            running_sum = running_sum * rescale + tl.sum(unnormalized, 1)
            running_ga = running_ga * rescale + tl.sum(unnormalized * ga[None, :], 1)
            running_max = new_max
        ell = running_max + tl.log(running_sum)
        abar = running_ga / running_sum  # ā_i = Σ_k A_ki ga_k
        grad_w = tl.load(grad_weights_ptr + sample * N + rows, mask=row_ok, other=0.0).to(tl.float32)
        e = x_gy + abar + grad_w  # Nμ ∂L/∂σ_i: the 1/(Nμ) goes with σ into w (no overflow at tiny μ)
        sigma = _plan_sigma(u, ell, GAP)
        h = tl.where(row_ok, sigma * (1.0 - sigma), 0.0)
        tl.store(ell_row + rows, ell, mask=row_ok)
        tl.store(abar_row + rows, abar, mask=row_ok)
        tl.store(e_row + rows, e, mask=row_ok)
        tl.store(x_sq_row + rows, x_sq, mask=row_ok)
        tl.store(x_scale_row + rows, x_scale, mask=row_ok)
        h_sum += tl.sum(h, 0)
        he_sum += tl.sum(h * e, 0)
    tl.store(tile_sums_sample + 2 * tile, h_sum)
    tl.store(tile_sums_sample + 2 * tile + 1, he_sum)

    # Pass 2 in the sample's last program, once every tile's scratch is written (read from L2,
    # .cg): ē from the tiles' sums in tile order, then per feature tile W and its sums over
    # prototypes, V, β and w.
    if _last_to_arrive(arrivals_ptr, sample, tiles_per_sample):
        h_sum = tl.zeros((), tl.float32)
        he_sum = tl.zeros((), tl.float32)
        for t in range(0, tiles_per_sample):
            h_sum += tl.load(tile_sums_sample + 2 * t, cache_modifier=".cg")
            he_sum += tl.load(tile_sums_sample + 2 * t + 1, cache_modifier=".cg")
        h_sum_safe = tl.maximum(h_sum, 1.1754943508222875e-38)
        e_bar = tl.where(h_sum > 0, he_sum / h_sum_safe, 0.0)
        # The rounding of ē, removed by a second pass over the features (docs/math.md, Backward):
        # e − ē then keeps its digits where the e_i share a large common part.
        e_bar_rounding = tl.zeros((), tl.float32)
        for n0 in tl.range(0, N, BLOCK_N, num_stages=1):
            rows = n0 + tl.arange(0, BLOCK_N)
            row_ok = rows < N
            ell = tl.load(ell_row + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
            e = tl.load(e_row + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
            sigma = _plan_sigma(u, ell, GAP)
            e_bar_rounding += tl.sum(tl.where(row_ok, sigma * (1.0 - sigma) * (e - e_bar), 0.0), 0)
        e_bar_rounding = tl.where(h_sum > 0, e_bar_rounding / h_sum_safe, 0.0)
        for n0 in tl.range(0, N, BLOCK_N, num_stages=1):
            rows = n0 + tl.arange(0, BLOCK_N)
            row_ok = rows < N
            ell = tl.load(ell_row + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
            abar = tl.load(abar_row + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
            e = tl.load(e_row + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
            x_sq = tl.load(x_sq_row + rows, mask=row_ok, other=0.0, cache_modifier=".cg")
            x_scale = tl.load(x_scale_row + rows, mask=row_ok, other=1.0, cache_modifier=".cg")
            sigma = _plan_sigma(u, ell, GAP)
            w = tl.where(row_ok, sigma * inv_total, 0.0)
            grad_ell = w * (1.0 - sigma) * ((e - e_bar) - e_bar_rounding)  # σ(1 − σ)(e − ē)/(Nμ)
            coef_sum = tl.zeros((BLOCK_N,), tl.float32)  # S_i = Σ_k W_ki
            coef_dot = tl.zeros((BLOCK_N,), tl.float32)  # Σ_k W_ki x̂_i·ẑ_k
            x_unit, _ = _row_factors(x_sq, x_scale, NORMALIZE)
            inv_dx = x_unit / x_scale
            for m0 in tl.range(0, M, BLOCK_M, num_stages=1):
                protos = m0 + tl.arange(0, BLOCK_M)
                proto_ok = protos < M
                tile_ok = row_ok[:, None] & proto_ok[None, :]
                tile_ptrs = coef_sample + rows[:, None] * stride_cn + protos[None, :] * stride_cm
                dots = tl.load(tile_ptrs, mask=tile_ok, other=0.0, cache_modifier=".cg")
                z_sq = tl.load(z_sq_sample + protos, mask=proto_ok, other=0.0, cache_modifier=".cg")
                z_scale = tl.load(z_scale_ptr + protos, mask=proto_ok, other=1.0)
                cost, xz, z_unit = _snapped_costs(dots, x_sq, x_scale, z_sq, z_scale, snap, NORMALIZE, EUCLIDEAN)
                ga = tl.load(grad_attr_sample + protos, mask=proto_ok, other=0.0).to(tl.float32)
                assign = tl.where(tile_ok, tl.exp(-gamma * cost - ell[:, None]), 0.0)
                grad_cost = -gamma * assign * (grad_ell[:, None] + w[:, None] * (ga[None, :] - abar[:, None]))
                if EUCLIDEAN:
                    coef = tl.where(cost > 0, grad_cost / tl.where(cost > 0, cost, 1.0), 0.0)
                else:
                    coef = 2.0 * grad_cost
                coef_sum += tl.sum(coef, 1)
                coef_dot += tl.sum(coef * xz, 1)
                previous = tl.load(col_sum_sample + protos, mask=proto_ok & (n0 > 0), other=0.0)
                tl.debug_barrier()  # every thread has read the products and column sums it overwrites
                tl.store(col_sum_sample + protos, previous + tl.sum(coef, 0), mask=proto_ok)
                coef_v = coef * inv_dx[:, None] * z_unit[None, :]
                tl.store(tile_ptrs, coef_v, mask=tile_ok)
                if V_PAIR:
                    v_hi, v_lo = _split_half(coef_v, pair_ptr.dtype.element_ty)
                    pair_ptrs = pair_ptr + sample * stride_vb + rows[:, None] * stride_vn + protos[None, :] * stride_vm
                    tl.store(pair_ptrs, v_hi, mask=tile_ok)
                    tl.store(pair_ptrs + M * stride_vm, v_lo, mask=tile_ok)
            tl.debug_barrier()  # the column sums, read back by the next feature tile

            beta, inv_power = _grad_x_row_coefs(coef_sum, coef_dot, x_sq, x_scale, NORMALIZE)
            tl.store(beta_row + rows, beta, mask=row_ok)
            tl.store(w_row + rows, w, mask=row_ok)
            tl.store(inv_power_row + rows, inv_power, mask=row_ok)


@triton.jit
def _grad_x_tile(
    col_tile, feature_tile, coef_ptr, row_coefs_ptr, z_ptr, stride_zm, stride_zd,
    x_ptr, stride_xb, stride_xn, stride_xd, grad_pooled_ptr, grad_x_ptr, stride_gb, stride_gn, stride_gd,
    total_rows, N, M, D,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT_BF16: tl.constexpr, NATIVE_HALF_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """grad_x = β x − V z + w gy on one [BLOCK_R, BLOCK_D] tile of all B·N features (feature
    r = b·N + i): a GEMM over the prototypes with that epilogue. Thousands of independent
    programs whose loads feed tl.dot (pipelined), where a per-sample loop over D would wait for
    every V and z tile in turn."""
    cols = col_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    feature = feature_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    feature_ok = feature < total_rows
    col_ok = cols < D
    coef_z = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for k0 in range(0, M, BLOCK_K):
        protos = k0 + tl.arange(0, BLOCK_K)
        proto_ok = protos < M
        v_tile = tl.load(  # [BLOCK_R, BLOCK_K]
            coef_ptr + feature[:, None].to(tl.int64) * M + protos[None, :],
            mask=feature_ok[:, None] & proto_ok[None, :], other=0.0,
        )
        z_tile = tl.load(  # [BLOCK_K, BLOCK_D]
            z_ptr + protos[:, None] * stride_zm + cols[None, :] * stride_zd,
            mask=proto_ok[:, None] & col_ok[None, :], other=0.0,
        )
        coef_z = _coef_product(v_tile, z_tile, coef_z, SPLIT_BF16, NATIVE_HALF_DOT, PRECISION)
    _grad_x_epilogue(
        coef_z, feature, feature_ok, cols, col_ok, row_coefs_ptr,
        x_ptr, stride_xb, stride_xn, stride_xd, grad_pooled_ptr, grad_x_ptr, stride_gb, stride_gn, stride_gd, N, D,
    )


@triton.jit
def _gsp_coef_x_kernel(
    coef_ptr, x_ptr, stride_xb, stride_xn, stride_xd, partial_ptr,  # V [B*N, M]; partials [S, M, D]
    total_rows, N, M, D, rows_per_split,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT_BF16: tl.constexpr, NATIVE_HALF_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """Split-K Vᵀ x over all B·N features: one [BLOCK_M, BLOCK_D] tile of one split's partial.

    x is read through its strides (feature r = b·N + i), so a channels-first map needs no
    copy; the splits are summed in a fixed order afterwards, so the result is deterministic.
    """
    protos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    proto_ok = protos < M
    col_ok = cols < D
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, total_rows)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for k0 in range(row_start, row_end, BLOCK_K):
        feature = k0 + tl.arange(0, BLOCK_K)
        feature_ok = feature < row_end
        sample = (feature // N).to(tl.int64)
        row = feature % N
        v_t = tl.load(  # [BLOCK_M, BLOCK_K]: Vᵀ
            coef_ptr + feature[None, :].to(tl.int64) * M + protos[:, None],
            mask=proto_ok[:, None] & feature_ok[None, :], other=0.0,
        )
        x_tile = tl.load(  # [BLOCK_K, BLOCK_D]
            x_ptr + (sample * stride_xb + row * stride_xn)[:, None] + cols[None, :] * stride_xd,
            mask=feature_ok[:, None] & col_ok[None, :], other=0.0,
        )
        acc = _coef_product(v_t, x_tile, acc, SPLIT_BF16, NATIVE_HALF_DOT, PRECISION)
    tl.store(
        partial_ptr + (split * M + protos[:, None]).to(tl.int64) * D + cols[None, :], acc,
        mask=proto_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _gsp_backward_finish_kernel(
    partial_ptr, splits, col_sum_ptr, batch,  # prototype gradient: [S, M, D], [B, M] float32
    coef_ptr, row_coefs_ptr,  # grad_x: V′ [B·N, M], (β p, w, 1/p) [B, 3, N] float32
    z_ptr, stride_zm, stride_zd, z_scale_ptr, grad_z_ptr,  # z′ [M, D] contiguous, z_scale [M]; grad_z [M, D] contiguous
    x_ptr, stride_xb, stride_xn, stride_xd, grad_pooled_ptr, grad_x_ptr, stride_gb, stride_gn, stride_gd,
    total_rows, N, M, D, col_tiles,
    BLOCK_ZD: tl.constexpr, BLOCK_B: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT_BF16: tl.constexpr, NATIVE_HALF_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """The backward's second launch: programs 0..M−1 finish the prototype gradient (one per
    prototype, after the split-K GEMM), the rest compute grad_x tiles (D tiles fastest, so that
    neighbouring programs share V rows in L2)."""
    program = tl.program_id(0)
    if program < M:
        _prototype_grad_program(
            program.to(tl.int64), partial_ptr, splits, col_sum_ptr, batch, z_ptr, z_scale_ptr, grad_z_ptr,
            M, D, BLOCK_ZD, BLOCK_B, NORMALIZE,
        )
    else:
        tile = program - M
        _grad_x_tile(
            tile % col_tiles, tile // col_tiles, coef_ptr, row_coefs_ptr, z_ptr, stride_zm, stride_zd,
            x_ptr, stride_xb, stride_xn, stride_xd, grad_pooled_ptr, grad_x_ptr, stride_gb, stride_gn, stride_gd,
            total_rows, N, M, D, BLOCK_R, BLOCK_K, BLOCK_D, SPLIT_BF16, NATIVE_HALF_DOT, PRECISION,
        )


# ----------------------------------------------------------------------------- the gemm strategy's own kernels


@triton.jit
def _gsp_norms_kernel(
    x_ptr, stride_xb, stride_xn, stride_xd, z_ptr, stride_zm, stride_zd, grad_pooled_ptr,  # gy [B, D]
    x_sq_ptr, x_scale_ptr, x_gy_ptr,  # out: |x|² as (s, scale), x·gy [B·N] float32
    prepared_ptr, z_scale_ptr, z_sq_ptr,  # out: z′ = z / z_scale [M, D] contiguous, z_scale, |z′|² [M] float32
    total_rows, N, M, D, x_programs,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, WITH_GY: tl.constexpr, SCALE_ABOVE: tl.constexpr,
):
    """Programs below x_programs (the gemm strategy; none in the fused one): BLOCK_R features each
    (feature r = b·N + i, read through x's strides); the rest: BLOCK_R prototypes each, prepared
    (``_prepare_prototypes``)."""
    program = tl.program_id(0)
    if program < x_programs:
        feature = program * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = feature < total_rows
        sample = (feature // N).to(tl.int64)
        rows = x_ptr + sample * stride_xb + (feature % N) * stride_xn
        x_sq, x_gy = _row_sums(rows, ok, stride_xd, grad_pooled_ptr + sample * D, D, BLOCK_R, BLOCK_D, WITH_GY)
        x_sq, x_scale = _overflow_safe_squares(x_sq, rows, ok, stride_xd, D, BLOCK_D)
        tl.store(x_sq_ptr + feature, x_sq, mask=ok)
        tl.store(x_scale_ptr + feature, x_scale, mask=ok)
        if WITH_GY:
            tl.store(x_gy_ptr + feature, x_gy, mask=ok)
    else:
        protos = (program - x_programs) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = protos < M
        z_sq, z_scale = _prepare_prototypes(
            z_ptr + protos.to(tl.int64) * stride_zm, ok, stride_zd, prepared_ptr + protos.to(tl.int64) * D, D,
            BLOCK_R, BLOCK_D, SCALE_ABOVE,
        )
        tl.store(z_sq_ptr + protos, z_sq, mask=ok)
        tl.store(z_scale_ptr + protos, z_scale, mask=ok)


@triton.jit
def _gsp_gemm_backward_finish_kernel(
    partial_ptr, splits, col_sum_ptr, batch, row_coefs_ptr,  # [S, M, D], [B, M], (β p, w, 1/p) [B, 3, N] float32
    z_ptr, z_scale_ptr, grad_z_ptr,  # z′ [M, D] contiguous, z_scale [M]; grad_z [M, D] contiguous
    coef_z_ptr, stride_vb, stride_vn, stride_vd,  # V z [B, N, D] float32, strided
    x_ptr, stride_xb, stride_xn, stride_xd, grad_pooled_ptr, grad_x_ptr, stride_gb, stride_gn, stride_gd,
    total_rows, N, M, D, col_tiles,
    BLOCK_ZD: tl.constexpr, BLOCK_B: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Programs 0..M−1: the prototype gradient's epilogue, one prototype each; the rest:
    grad_x = β x − V z + w gy on [BLOCK_R, BLOCK_D] tiles of all B·N features."""
    program = tl.program_id(0)
    if program < M:
        _prototype_grad_program(
            program.to(tl.int64), partial_ptr, splits, col_sum_ptr, batch, z_ptr, z_scale_ptr, grad_z_ptr,
            M, D, BLOCK_ZD, BLOCK_B, NORMALIZE,
        )
    else:
        tile = program - M
        cols = (tile % col_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
        feature = (tile // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        feature_ok = feature < total_rows
        col_ok = cols < D
        sample = (feature // N).to(tl.int64)
        coef_z = tl.load(
            coef_z_ptr + (sample * stride_vb + (feature % N) * stride_vn)[:, None] + cols[None, :] * stride_vd,
            mask=feature_ok[:, None] & col_ok[None, :], other=0.0,
        )
        _grad_x_epilogue(
            coef_z, feature, feature_ok, cols, col_ok, row_coefs_ptr,
            x_ptr, stride_xb, stride_xn, stride_xd, grad_pooled_ptr, grad_x_ptr, stride_gb, stride_gn, stride_gd, N, D,
        )
