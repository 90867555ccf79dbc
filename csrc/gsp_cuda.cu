// CUDA backend of GSP (docs/math.md): one block per sample, float32 accumulation throughout; the cost
// GEMM in exact float32 FMA (default) or on the TF32 tensor cores (one product, or 3xTF32).
//
// Forward (one launch after the prototype preparation): the cost GEMM x·ẑᵀ into per-sample
// global scratch, per-feature costs and logsumexp ℓ, the bracketed Newton solve of u, then
// weights, attr and pooled. Backward (one launch): the same GEMM, the implicit-gradient
// scalars, the coefficient matrix W (written as W / d_x for the prototype GEMM that Python runs
// through cuBLAS) and the feature gradient through a second GEMM with a fused epilogue.
// All reductions run in a fixed order: results are bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "gsp_cuda.h"
#include "gsp_math.h"

namespace gsp {
namespace kernels {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// SIMT GEMM tiling: a block computes a kTile × kTile output tile, kTileK deep per step; each
// thread owns a 4 × 4 micro-tile (rows 4·ty.., columns 4·tx..).
constexpr int kTile = 64;
constexpr int kTileK = 16;
constexpr int kTilePad = 4;  // keeps rows 16-byte aligned for float4 reads
constexpr int kLoadsPerThread = kTile * kTileK / kThreads;
static_assert(kLoadsPerThread * kThreads == kTile * kTileK, "tile loads must divide evenly");
static_assert((kTile / 4) * (kTile / 4) == kThreads, "one 4x4 micro-tile per thread");

struct __align__(16) GemmSmem {
  float a[kTileK][kTile + kTilePad];  // A tile, k-major: a[k][row]
  float b[kTileK][kTile + kTilePad];  // B tile, k-major: b[k][col]
};

// Everything a kernel needs, by value.
struct Params {
  const void* x;  // features, element type T
  int64_t x_stride_b, x_stride_n, x_stride_d;
  int n, dim, m;
  const float* z_hat;      // [M, D]
  const float* z_sq_norm;  // [M]
  int normalize, cost;
  float gamma, n_mu, logit_mu, target, log_target, tol_target, tol;
  int max_iter;
  bool gap;        // μ = 1: u = +inf, σ ≡ 1
  float* scratch;  // [B, N, M]: dots, then costs (forward) or W / d_x (backward)
  // forward outputs
  void* pooled;   // [B, D]
  void* attr;     // [B, M]
  void* weights;  // [B, N]
  float* u;       // [B]
  // backward inputs and outputs
  const float* grad_pooled;   // [B, D]
  const float* grad_attr;     // [B, M]
  const float* grad_weights;  // [B, N]
  const float* u_saved;       // [B]
  float* coef_colsum;         // [B, M]
  void* grad_x;               // element type T
  int64_t gx_stride_b, gx_stride_n, gx_stride_d;
};

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;  // butterfly: every lane holds the same bits
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Block-wide sums of (a, b), the same in every thread, in a fixed order. red: [2 * kWarps].
__device__ void block_sum2(float& a, float& b, float* red) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    red[warp] = a;
    red[kWarps + warp] = b;
  }
  __syncthreads();
  a = 0.0f;
  b = 0.0f;
  for (int w = 0; w < kWarps; ++w) {
    a += red[w];
    b += red[kWarps + w];
  }
  __syncthreads();
}

// Block-wide min, max (NaN-propagating) and sum of per-feature values v[0, n). red: [3 * kWarps].
__device__ void block_min_max_sum(const float* v, int n, float& lo, float& hi, float& sum, float* red) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  lo = INFINITY;
  hi = -INFINITY;
  sum = 0.0f;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    lo = nan_min(lo, v[i]);
    hi = nan_max(hi, v[i]);
    sum += v[i];
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    lo = nan_min(lo, __shfl_xor_sync(kFullMask, lo, offset));
    hi = nan_max(hi, __shfl_xor_sync(kFullMask, hi, offset));
    sum += __shfl_xor_sync(kFullMask, sum, offset);
  }
  if (lane == 0) {
    red[warp] = lo;
    red[kWarps + warp] = hi;
    red[2 * kWarps + warp] = sum;
  }
  __syncthreads();
  lo = INFINITY;
  hi = -INFINITY;
  sum = 0.0f;
  for (int w = 0; w < kWarps; ++w) {
    lo = nan_min(lo, red[w]);
    hi = nan_max(hi, red[kWarps + w]);
    sum += red[2 * kWarps + w];
  }
  __syncthreads();
}

// Tile coordinates of the e-th element of a kTile × kTileK operand tile, walking k first when
// the operand is contiguous along k (coalesced either way).
__device__ __forceinline__ void tile_coords(int e, bool k_contiguous, int& outer, int& k) {
  if (k_contiguous) {
    outer = e / kTileK;
    k = e % kTileK;
  } else {
    outer = e % kTile;
    k = e / kTile;
  }
}

// The register prefetch of both tile GEMMs: each thread loads its share of one k-step of the
// A (kTile × kTileK) and B (kTileK × kTile) tiles into registers, zero outside rows × cols ×
// depth, while the previous step is multiplied, then stores it into shared memory.
template <class LoadA, class LoadB>
struct TileStaging {
  const LoadA& load_a;
  const LoadB& load_b;
  bool a_k_contiguous, b_k_contiguous;
  int rows, cols, depth, row0, col0;
  float a_next[kLoadsPerThread], b_next[kLoadsPerThread];

  __device__ __forceinline__ void fetch(int k0) {
#pragma unroll
    for (int j = 0; j < kLoadsPerThread; ++j) {
      int outer, k;
      tile_coords(threadIdx.x + j * kThreads, a_k_contiguous, outer, k);
      a_next[j] = (row0 + outer < rows && k0 + k < depth) ? load_a(row0 + outer, k0 + k) : 0.0f;
      tile_coords(threadIdx.x + j * kThreads, b_k_contiguous, outer, k);
      b_next[j] = (col0 + outer < cols && k0 + k < depth) ? load_b(k0 + k, col0 + outer) : 0.0f;
    }
  }

  __device__ __forceinline__ void store(GemmSmem& sm) const {
#pragma unroll
    for (int j = 0; j < kLoadsPerThread; ++j) {
      int outer, k;
      tile_coords(threadIdx.x + j * kThreads, a_k_contiguous, outer, k);
      sm.a[k][outer] = a_next[j];
      tile_coords(threadIdx.x + j * kThreads, b_k_contiguous, outer, k);
      sm.b[k][outer] = b_next[j];
    }
  }
};

// acc[r][c] = Σ_{k < depth} A(row0 + 4ty + r, k) · B(k, col0 + 4tx + c), zero outside
// rows × cols. With kRowSquares, row_sq[r] = Σ_k A(row0 + 4ty + r, k)². Loads of the next
// k-step are issued before the current one is multiplied (register prefetch).
template <bool kRowSquares, class LoadA, class LoadB>
__device__ void gemm_tile(GemmSmem& sm, int rows, int cols, int depth, int row0, int col0, const LoadA& load_a,
                          bool a_k_contiguous, const LoadB& load_b, bool b_k_contiguous, float (&acc)[4][4],
                          float (&row_sq)[4]) {
  const int tx = threadIdx.x % (kTile / 4), ty = threadIdx.x / (kTile / 4);
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    row_sq[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = 0.0f;
  }
  TileStaging<LoadA, LoadB> staging{load_a, load_b, a_k_contiguous, b_k_contiguous, rows, cols, depth, row0, col0};
  staging.fetch(0);
  for (int k0 = 0; k0 < depth; k0 += kTileK) {
    __syncthreads();  // the previous step's readers are done with the tiles
    staging.store(sm);
    __syncthreads();
    if (k0 + kTileK < depth) staging.fetch(k0 + kTileK);
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      const float4 a4 = *reinterpret_cast<const float4*>(&sm.a[kk][4 * ty]);
      const float4 b4 = *reinterpret_cast<const float4*>(&sm.b[kk][4 * tx]);
      const float a[4] = {a4.x, a4.y, a4.z, a4.w};
      const float b[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        if (kRowSquares) row_sq[r] = fmaf(a[r], a[r], row_sq[r]);
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
      }
    }
  }
  __syncthreads();  // tiles free for the next call
}

// Cost-GEMM arithmetic: exact float32 FMA, one TF32 tensor-core product, or three (3xTF32:
// a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi with hi = tf32(v), lo = tf32(v − hi), ~float32 accuracy).
enum Products : int { kIeee = 0, kTf32 = 1, kTf32x3 = 2 };

// v rounded to TF32 (nearest, ties away), as float bits with the 13 low mantissa bits cleared so
// that v − tf32(v) is the exact remainder used by the 3xTF32 split.
__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(v));
  return bits & 0xffffe000u;
}

// c += a · b for one m16n8k8 TF32 tile (a: 4 registers, b: 2, c: 4; PTX fragment layout).
__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Tensor-core version of gemm_tile for the cost GEMM. Warp w owns rows 16·(w % 4) .. +16 and
// columns 32·(w / 4) .. +32 of the tile as four m16n8 tiles; thread (group g = lane / 4,
// t = lane % 4) holds acc[j] = C[g, 8j + 2t], C[g, 8j + 2t + 1], C[g + 8, 8j + 2t], C[g + 8, 8j + 2t + 1]
// relative to that corner. With kRowSquares, threads 0..63 accumulate row_sq = Σ_k A(row0 + tid, k)².
template <int kProducts, bool kRowSquares, class LoadA, class LoadB>
__device__ void gemm_tile_mma(GemmSmem& sm, int rows, int cols, int depth, int row0, int col0, const LoadA& load_a,
                              bool a_k_contiguous, const LoadB& load_b, bool b_k_contiguous, float (&acc)[4][4],
                              float& row_sq) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int warp_row = 16 * (warp % 4), warp_col = 32 * (warp / 4);
  row_sq = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[j][c] = 0.0f;
  }
  TileStaging<LoadA, LoadB> staging{load_a, load_b, a_k_contiguous, b_k_contiguous, rows, cols, depth, row0, col0};
  staging.fetch(0);
  for (int k0 = 0; k0 < depth; k0 += kTileK) {
    __syncthreads();  // the previous step's readers are done with the tiles
    staging.store(sm);
    __syncthreads();
    if (k0 + kTileK < depth) staging.fetch(k0 + kTileK);
    if (kRowSquares && threadIdx.x < kTile) {
#pragma unroll
      for (int kk = 0; kk < kTileK; ++kk) row_sq = fmaf(sm.a[kk][threadIdx.x], sm.a[kk][threadIdx.x], row_sq);
    }
#pragma unroll 1
    for (int kk = 0; kk < kTileK; kk += 8) {
      const float a_val[4] = {sm.a[kk + t][warp_row + g], sm.a[kk + t][warp_row + g + 8],
                              sm.a[kk + t + 4][warp_row + g], sm.a[kk + t + 4][warp_row + g + 8]};
      uint32_t a_hi[4], a_lo[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        a_hi[r] = to_tf32(a_val[r]);
        if (kProducts == kTf32x3) a_lo[r] = to_tf32(a_val[r] - __uint_as_float(a_hi[r]));
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float b_val[2] = {sm.b[kk + t][warp_col + 8 * j + g], sm.b[kk + t + 4][warp_col + 8 * j + g]};
        uint32_t b_hi[2], b_lo[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          b_hi[r] = to_tf32(b_val[r]);
          if (kProducts == kTf32x3) b_lo[r] = to_tf32(b_val[r] - __uint_as_float(b_hi[r]));
        }
        if (kProducts == kTf32x3) {  // small terms first
          mma_tf32(acc[j], a_lo, b_hi);
          mma_tf32(acc[j], a_hi, b_lo);
        }
        mma_tf32(acc[j], a_hi, b_hi);
      }
    }
  }
  __syncthreads();  // tiles free for the next call
}

// dots[i, k] = x_i · ẑ_k (raw x) for one sample; row_sq[i] = ‖x_i‖² (shared memory).
template <typename T, int kProducts>
__device__ void compute_dots(const Params& p, const T* xb, float* dots, GemmSmem& sm, float* row_sq) {
  const int64_t sn = p.x_stride_n, sd = p.x_stride_d;
  const float* z_hat = p.z_hat;
  const int dim = p.dim, m = p.m;
  auto load_x = [=](int i, int d) { return to_float<T>(xb[i * sn + d * sd]); };
  auto load_z = [=](int d, int k) { return z_hat[static_cast<int64_t>(k) * dim + d]; };
  auto store = [&](int i, int k, float value) {
    if (i < p.n && k < m) dots[static_cast<int64_t>(i) * m + k] = value;
  };
  const bool x_d_contiguous = sd == 1;
  const int row_tiles = (p.n + kTile - 1) / kTile, col_tiles = (m + kTile - 1) / kTile;
  for (int tile = 0; tile < row_tiles * col_tiles; ++tile) {
    const int row0 = (tile / col_tiles) * kTile, col0 = (tile % col_tiles) * kTile;
    float acc[4][4];
    if (kProducts == kIeee) {
      const int tx = threadIdx.x % (kTile / 4), ty = threadIdx.x / (kTile / 4);
      float sq[4];
      if (col0 == 0) {
        gemm_tile<true>(sm, p.n, m, dim, row0, col0, load_x, x_d_contiguous, load_z, true, acc, sq);
      } else {
        gemm_tile<false>(sm, p.n, m, dim, row0, col0, load_x, x_d_contiguous, load_z, true, acc, sq);
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int i = row0 + 4 * ty + r;
        if (col0 == 0 && tx == 0 && i < p.n) row_sq[i] = sq[r];
#pragma unroll
        for (int c = 0; c < 4; ++c) store(i, col0 + 4 * tx + c, acc[r][c]);
      }
    } else {
      const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
      float sq;
      if (col0 == 0) {
        gemm_tile_mma<kProducts, true>(sm, p.n, m, dim, row0, col0, load_x, x_d_contiguous, load_z, true, acc, sq);
        if (threadIdx.x < kTile && row0 + static_cast<int>(threadIdx.x) < p.n) row_sq[row0 + threadIdx.x] = sq;
      } else {
        gemm_tile_mma<kProducts, false>(sm, p.n, m, dim, row0, col0, load_x, x_d_contiguous, load_z, true, acc, sq);
      }
      const int i = row0 + 16 * (warp % 4) + lane / 4;
      const int k = col0 + 32 * (warp / 4) + 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        store(i, k + 8 * j, acc[j][0]);
        store(i, k + 8 * j + 1, acc[j][1]);
        store(i + 8, k + 8 * j, acc[j][2]);
        store(i + 8, k + 8 * j + 1, acc[j][3]);
      }
    }
  }
  __syncthreads();
}

// Turns row_sq[i] = ‖x_i‖² into ‖x̂_i‖² and fills row_div[i] = d_x. A row whose float32 sum of
// squares overflowed is summed again by its thread as x_i·2⁻⁷⁰ (kRowScale): ‖x̂_i‖² then comes from
// the scaled sum, never from ‖x_i‖².
template <typename T>
__device__ void normalize_rows(const Params& p, const T* xb, float* row_sq, float* row_div) {
  for (int i = threadIdx.x; i < p.n; i += kThreads) {
    float sq = row_sq[i], scale = 1.0f;
    if (sq == INFINITY) {
      sq = 0.0f;
      scale = kRowScale;
      for (int d = 0; d < p.dim; ++d) {
        const float v = to_float<T>(xb[i * p.x_stride_n + d * p.x_stride_d]) * kInvRowScale;
        sq = fmaf(v, v, sq);
      }
    }
    const float scaled_div = scaled_norm_divisor(sq, scale, p.normalize);  // d_x / scale
    row_div[i] = scaled_div * scale;
    row_sq[i] = (sq / scaled_div) / scaled_div;
  }
  __syncthreads();
}

// ℓ = logsumexp_k(−γ c_k) of one feature row, computed by one warp from the row's dots.
// With kStoreCosts the dots are replaced by the costs (same lane reads, then writes).
template <bool kStoreCosts>
__device__ float row_logsumexp(const Params& p, float* row, float xx_hat, float div) {
  const int lane = threadIdx.x % 32;
  float row_max = -INFINITY;
  for (int k = lane; k < p.m; k += 32) {
    const float c = cost_from_dot(xx_hat, p.z_sq_norm[k], row[k] / div, p.cost);
    if (kStoreCosts) row[k] = c;
    row_max = fmaxf(row_max, -p.gamma * c);
  }
  row_max = warp_max(row_max);
  float total = 0.0f;
  for (int k = lane; k < p.m; k += 32) {
    const float c = kStoreCosts ? row[k] : cost_from_dot(xx_hat, p.z_sq_norm[k], row[k] / div, p.cost);
    total += expf(-p.gamma * c - row_max);
  }
  return row_max + logf(warp_sum(total));
}

// Root u of Σ_i σ(u + ℓ_i) = μN for this block's sample (identical in every thread).
__device__ float solve_u(const Params& p, const float* row_ell, float* red) {
  if (p.gap) return INFINITY;
  float ell_min, ell_max, ell_sum;
  block_min_max_sum(row_ell, p.n, ell_min, ell_max, ell_sum, red);
  NewtonState state = newton_start(p.logit_mu, ell_min, ell_max, ell_sum / static_cast<float>(p.n));
  for (int it = 0; it < p.max_iter; ++it) {
    float mass = 0.0f, slope = 0.0f;
    for (int i = threadIdx.x; i < p.n; i += kThreads) {
      const float s = sigmoid(state.u + row_ell[i]);
      mass += s;
      slope += s * (1.0f - s);
    }
    block_sum2(mass, slope, red);
    if (newton_iterate(state, mass, p.target, p.log_target, slope, p.tol_target, p.tol)) break;
  }
  return state.u;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) prepare_prototypes_kernel(const T* z, int dim, int64_t stride_m,
                                                                        int64_t stride_d, int normalize,
                                                                        float* z_hat, float* z_sq_norm,
                                                                        float* z_divisor) {
  __shared__ float red[2 * kWarps];
  const int k = blockIdx.x;
  const T* row = z + k * stride_m;
  // ‖z_k‖² in float32, and as the squares of z_k·2⁻⁷⁰ (kRowScale) where that overflows.
  float sq = 0.0f, scaled_sq = 0.0f;
  for (int d = threadIdx.x; d < dim; d += kThreads) {
    const float v = to_float<T>(row[d * stride_d]);
    sq = fmaf(v, v, sq);
    scaled_sq = fmaf(v * kInvRowScale, v * kInvRowScale, scaled_sq);
  }
  block_sum2(sq, scaled_sq, red);
  const float scale = sq == INFINITY ? kRowScale : 1.0f;
  const float scaled_div = scaled_norm_divisor(sq == INFINITY ? scaled_sq : sq, scale, normalize);
  const float div = scaled_div * scale;
  float sq_hat = 0.0f, unused = 0.0f;
  for (int d = threadIdx.x; d < dim; d += kThreads) {
    const float v = to_float<T>(row[d * stride_d]) / div;
    z_hat[static_cast<int64_t>(k) * dim + d] = v;
    sq_hat = fmaf(v, v, sq_hat);
  }
  block_sum2(sq_hat, unused, red);
  if (threadIdx.x == 0) {
    z_sq_norm[k] = sq_hat;
    z_divisor[k] = div;
  }
}

template <typename T, int kProducts>
__global__ void __launch_bounds__(kThreads, 2) forward_kernel(const Params p) {
  __shared__ GemmSmem gemm;
  __shared__ float row_sq[kMaxFeatures];   // ‖x_i‖², ‖x̂_i‖², then w_i
  __shared__ float row_div[kMaxFeatures];  // d_x
  __shared__ float row_ell[kMaxFeatures];  // ℓ_i
  __shared__ float red[3 * kWarps];
  const int b = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* xb = static_cast<const T*>(p.x) + b * p.x_stride_b;
  float* costs = p.scratch + static_cast<int64_t>(b) * p.n * p.m;

  compute_dots<T, kProducts>(p, xb, costs, gemm, row_sq);
  normalize_rows<T>(p, xb, row_sq, row_div);
  for (int i = warp; i < p.n; i += kWarps) {
    const float ell = row_logsumexp<true>(p, costs + static_cast<int64_t>(i) * p.m, row_sq[i], row_div[i]);
    if (lane == 0) row_ell[i] = ell;
  }
  __syncthreads();

  const float u = solve_u(p, row_ell, red);
  if (threadIdx.x == 0) p.u[b] = u;
  float* row_w = row_sq;
  T* weights = static_cast<T*>(p.weights) + static_cast<int64_t>(b) * p.n;
  for (int i = threadIdx.x; i < p.n; i += kThreads) {
    const float w = sigmoid(u + row_ell[i]) / p.n_mu;
    row_w[i] = w;
    weights[i] = from_float<T>(w);
  }
  __syncthreads();

  // attr_k = Σ_i w_i A_ki, A_ki = exp(−γ c_ki − ℓ_i): one thread per prototype. Unrolled 16
  // deep like nvcc's choice for the plain load-FMA loops below (it picks 4 for this one), so
  // that 16 independent loads are in flight; the accumulation order is unchanged.
  T* attr = static_cast<T*>(p.attr) + static_cast<int64_t>(b) * p.m;
  for (int k = threadIdx.x; k < p.m; k += kThreads) {
    float a = 0.0f;
#pragma unroll 16
    for (int i = 0; i < p.n; ++i) a = fmaf(row_w[i], expf(-p.gamma * costs[static_cast<int64_t>(i) * p.m + k] - row_ell[i]), a);
    attr[k] = from_float<T>(a);
  }
  // pooled_d = Σ_i w_i x_id: a thread per d when d is contiguous, else a warp per d.
  T* pooled = static_cast<T*>(p.pooled) + static_cast<int64_t>(b) * p.dim;
  if (p.x_stride_d == 1) {
    for (int d = threadIdx.x; d < p.dim; d += kThreads) {
      float y = 0.0f;
      for (int i = 0; i < p.n; ++i) y = fmaf(row_w[i], to_float<T>(xb[i * p.x_stride_n + d]), y);
      pooled[d] = from_float<T>(y);
    }
  } else {
    for (int d = warp; d < p.dim; d += kWarps) {
      float y = 0.0f;
      for (int i = lane; i < p.n; i += 32) y = fmaf(row_w[i], to_float<T>(xb[i * p.x_stride_n + d * p.x_stride_d]), y);
      y = warp_sum(y);
      if (lane == 0) pooled[d] = from_float<T>(y);
    }
  }
}

template <typename T, int kProducts>
__global__ void __launch_bounds__(kThreads, 2) backward_kernel(const Params p) {
  __shared__ GemmSmem gemm;
  __shared__ float row_sq[kMaxFeatures];   // ‖x_i‖², then ‖x̂_i‖²
  __shared__ float row_div[kMaxFeatures];  // d_x
  __shared__ float row_ell[kMaxFeatures];  // ℓ_i
  __shared__ float row_aga[kMaxFeatures];  // ā_i = Σ_k A_ki ga_k, then 1/p_i
  __shared__ float row_sig[kMaxFeatures];  // σ_i, then w_i
  __shared__ float row_e[kMaxFeatures];    // e_i, then β_i p_i (grad_x = (x_i/p_i)(β_i p_i) − Σ_k coef_ki ẑ_k + w_i gy)
  __shared__ float red[3 * kWarps];
  const int b = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* xb = static_cast<const T*>(p.x) + b * p.x_stride_b;
  float* dots = p.scratch + static_cast<int64_t>(b) * p.n * p.m;  // dots, then coef = W / d_x
  const float* gy = p.grad_pooled + static_cast<int64_t>(b) * p.dim;
  const float* ga = p.grad_attr + static_cast<int64_t>(b) * p.m;
  const float* gw = p.grad_weights + static_cast<int64_t>(b) * p.n;
  const float u = p.gap ? INFINITY : p.u_saved[b];

  compute_dots<T, kProducts>(p, xb, dots, gemm, row_sq);
  normalize_rows<T>(p, xb, row_sq, row_div);

  // Per feature (a warp each): ℓ_i, ā_i, x_i·gy, σ_i and e_i.
  for (int i = warp; i < p.n; i += kWarps) {
    float* row = dots + static_cast<int64_t>(i) * p.m;
    const float xx_hat = row_sq[i], div = row_div[i];
    const float ell = row_logsumexp<false>(p, row, xx_hat, div);
    float aga = 0.0f;
    for (int k = lane; k < p.m; k += 32) {
      const float c = cost_from_dot(xx_hat, p.z_sq_norm[k], row[k] / div, p.cost);
      aga = fmaf(expf(-p.gamma * c - ell), ga[k], aga);
    }
    aga = warp_sum(aga);
    float x_gy = 0.0f;
    for (int d = lane; d < p.dim; d += 32) x_gy = fmaf(to_float<T>(xb[i * p.x_stride_n + d * p.x_stride_d]), gy[d], x_gy);
    x_gy = warp_sum(x_gy);
    if (lane == 0) {
      row_ell[i] = ell;
      row_aga[i] = aga;
      row_sig[i] = sigmoid(u + ell);
      row_e[i] = x_gy + aga + gw[i];  // Nμ ∂L/∂σ_i: the 1/(Nμ) goes with σ into w (no overflow at tiny μ)
    }
  }
  __syncthreads();

  // ē = Σ h e / Σ h with h = σ(1 − σ) (0 when Σ h = 0, e.g. μ = 1), e here Nμ times docs/math.md's.
  float h_sum = 0.0f, he_sum = 0.0f;
  for (int i = threadIdx.x; i < p.n; i += kThreads) {
    const float h = row_sig[i] * (1.0f - row_sig[i]);
    h_sum += h;
    he_sum += h * row_e[i];
  }
  block_sum2(h_sum, he_sum, red);
  const float e_bar = h_sum > 0.0f ? he_sum / h_sum : 0.0f;
  // The rounding of ē, removed by a second pass (docs/math.md, Backward): e − ē then keeps its
  // digits where the e_i share a large common part.
  float rounding_sum = 0.0f, unused = 0.0f;
  for (int i = threadIdx.x; i < p.n; i += kThreads) {
    rounding_sum += row_sig[i] * (1.0f - row_sig[i]) * (row_e[i] - e_bar);
  }
  block_sum2(rounding_sum, unused, red);
  const float e_bar_rounding = h_sum > 0.0f ? rounding_sum / h_sum : 0.0f;

  // Per feature: W_ki, coef = W / d_x (in place of the dots), and β_i from Σ_k W_ki and
  // q_i = Σ_k W_ki x̂_i·ẑ_k (the radial part x̂·gx̂ = ‖x̂‖² Σ_k W_ki − q_i).
  for (int i = warp; i < p.n; i += kWarps) {
    float* row = dots + static_cast<int64_t>(i) * p.m;
    const float xx_hat = row_sq[i], div = row_div[i], ell = row_ell[i], aga = row_aga[i];
    const float sig = row_sig[i];
    const float w = sig / p.n_mu;
    const float grad_ell = w * (1.0f - sig) * ((row_e[i] - e_bar) - e_bar_rounding);  // σ(1 − σ)(e − ē)/(Nμ)
    float w_sum = 0.0f, q = 0.0f;
    for (int k = lane; k < p.m; k += 32) {
      const float dot_hat = row[k] / div;
      const float c = cost_from_dot(xx_hat, p.z_sq_norm[k], dot_hat, p.cost);
      const float assign = expf(-p.gamma * c - ell);
      const float grad_cost = -p.gamma * (assign * (grad_ell + w * (ga[k] - aga)));
      float coef_w;
      if (p.cost == kEuclidean) {
        coef_w = c > 0.0f ? grad_cost / c : 0.0f;
      } else {
        coef_w = 2.0f * grad_cost;
      }
      w_sum += coef_w;
      q = fmaf(coef_w, dot_hat, q);
      row[k] = coef_w / div;
    }
    w_sum = warp_sum(w_sum);
    q = warp_sum(q);
    __syncwarp();  // every lane has read row_e[i], row_sig[i] and row_aga[i] before lane 0 overwrites them
    if (lane == 0) {
      const float radial = xx_hat * w_sum - q;
      const float along_x = norm_projects(div, p.normalize) ? w_sum - radial : w_sum;
      const float power = gradient_power(div);  // β = along_x / d², formed as β p (1 for ordinary rows)
      row_e[i] = (along_x / div) / (div / power);
      row_aga[i] = 1.0f / power;
      row_sig[i] = w;
    }
  }
  __syncthreads();

  // Σ_i W_ki per prototype for the prototype gradient (W = coef · d_x).
  float* colsum = p.coef_colsum + static_cast<int64_t>(b) * p.m;
  for (int k = threadIdx.x; k < p.m; k += kThreads) {
    float s = 0.0f;
    for (int i = 0; i < p.n; ++i) s = fmaf(dots[static_cast<int64_t>(i) * p.m + k], row_div[i], s);
    colsum[k] = s;
  }

  // grad_x_id = (β_i p_i)(x_id / p_i) − Σ_k coef_ki ẑ_kd + w_i gy_d: GEMM [N, M] × [M, D] with that epilogue
  // (same arithmetic as the cost GEMM).
  const float* z_hat = p.z_hat;
  const int m = p.m, dim = p.dim;
  const float* coef = dots;
  auto load_coef = [=](int i, int k) { return coef[static_cast<int64_t>(i) * m + k]; };
  auto load_z = [=](int k, int d) { return z_hat[static_cast<int64_t>(k) * dim + d]; };
  T* gxb = static_cast<T*>(p.grad_x) + b * p.gx_stride_b;
  auto store_grad = [&](int i, int d, float coef_z) {
    if (i >= p.n || d >= dim) return;
    const float x_id = to_float<T>(xb[i * p.x_stride_n + d * p.x_stride_d]);
    const float g = fmaf(row_e[i], x_id * row_aga[i], fmaf(row_sig[i], gy[d], -coef_z));
    gxb[i * p.gx_stride_n + d * p.gx_stride_d] = from_float<T>(g);
  };
  const int row_tiles = (p.n + kTile - 1) / kTile, col_tiles = (dim + kTile - 1) / kTile;
  for (int tile = 0; tile < row_tiles * col_tiles; ++tile) {
    const int row0 = (tile / col_tiles) * kTile, col0 = (tile % col_tiles) * kTile;
    float acc[4][4];
    if (kProducts == kIeee) {
      float unused[4];
      gemm_tile<false>(gemm, p.n, dim, m, row0, col0, load_coef, true, load_z, false, acc, unused);
      const int tx = threadIdx.x % (kTile / 4), ty = threadIdx.x / (kTile / 4);
#pragma unroll
      for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int c = 0; c < 4; ++c) store_grad(row0 + 4 * ty + r, col0 + 4 * tx + c, acc[r][c]);
      }
    } else {
      float unused;
      gemm_tile_mma<kProducts, false>(gemm, p.n, dim, m, row0, col0, load_coef, true, load_z, false, acc, unused);
      const int i = row0 + 16 * (warp % 4) + lane / 4;
      const int d = col0 + 32 * (warp / 4) + 2 * (lane % 4);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        store_grad(i, d + 8 * j, acc[j][0]);
        store_grad(i, d + 8 * j + 1, acc[j][1]);
        store_grad(i + 8, d + 8 * j, acc[j][2]);
        store_grad(i + 8, d + 8 * j + 1, acc[j][3]);
      }
    }
  }
}

// Throws with the CUDA error of the last launch, if any.
void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("gsp_kernels CUDA: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

void require(bool ok, const std::string& message) {
  if (!ok) throw std::runtime_error("gsp_kernels CUDA: " + message);
}

void check_view(const FeatureView& x, int64_t m) {
  require(x.data != 0, "null feature pointer");
  require(x.batch >= 1 && x.batch <= 2147483647, "batch size out of range: " + std::to_string(x.batch));
  require(x.n >= 1 && x.n <= kMaxFeatures, "N must be in [1, 1024], got " + std::to_string(x.n));
  require(x.dim >= 1 && x.dim <= kMaxDim, "D must be in [1, 2048], got " + std::to_string(x.dim));
  require(m >= 1 && m <= kMaxPrototypes, "M must be in [1, 256], got " + std::to_string(m));
  require(x.dtype == kFloat32 || x.dtype == kBFloat16 || x.dtype == kFloat16,
          "unsupported dtype code " + std::to_string(x.dtype));
}

// Makes `device` current for this module's runtime (separate from torch's, whose current
// device Python has already set): launches then go to that device's primary context.
void use_device(int device) {
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  require(err == cudaSuccess, std::string("cudaGetDevice failed: ") + cudaGetErrorString(err));
  if (current != device) {
    err = cudaSetDevice(device);
    require(err == cudaSuccess, "cudaSetDevice(" + std::to_string(device) + ") failed: " + cudaGetErrorString(err));
  }
}

void check_products(int products) {
  require(products == kIeee || products == kTf32 || products == kTf32x3,
          "unknown products code " + std::to_string(products));
}

void check_modes(int normalize, int cost) {
  require(normalize == kLipschitz || normalize == kL2 || normalize == kNone,
          "unknown normalize code " + std::to_string(normalize));
  require(cost == kEuclidean || cost == kSqEuclidean, "unknown cost code " + std::to_string(cost));
}

// Kernel parameters shared by forward and backward.
Params common_params(const FeatureView& x, std::uintptr_t z_hat, std::uintptr_t z_sq_norm, int64_t m, int normalize,
                     int cost, double mu, double gamma, std::uintptr_t scratch) {
  require(mu > 0.0 && mu <= 1.0, "transport ratio must be in (0, 1]");
  require(gamma > 0.0 && std::isfinite(gamma), "gamma must be finite and > 0");
  require(z_hat != 0 && z_sq_norm != 0 && scratch != 0, "null prototype or scratch pointer");
  Params p{};
  p.x = reinterpret_cast<const void*>(x.data);
  p.x_stride_b = x.stride_b;
  p.x_stride_n = x.stride_n;
  p.x_stride_d = x.stride_d;
  p.n = static_cast<int>(x.n);
  p.dim = static_cast<int>(x.dim);
  p.m = static_cast<int>(m);
  p.z_hat = reinterpret_cast<const float*>(z_hat);
  p.z_sq_norm = reinterpret_cast<const float*>(z_sq_norm);
  p.normalize = normalize;
  p.cost = cost;
  p.gamma = static_cast<float>(gamma);
  p.n_mu = static_cast<float>(static_cast<double>(x.n) * mu);
  p.gap = mu >= 1.0;
  p.logit_mu = p.gap ? 0.0f : static_cast<float>(std::log(mu) - std::log1p(-mu));
  p.target = p.n_mu;
  p.log_target = p.gap ? 0.0f : static_cast<float>(std::log(static_cast<double>(p.n) * mu));
  p.scratch = reinterpret_cast<float*>(scratch);
  return p;
}

template <template <typename, int> class Kernel, typename T>
void launch_with_products(int products, dim3 grid, dim3 block, cudaStream_t stream, const Params& p) {
  switch (products) {
    case kTf32: Kernel<T, kTf32>::launch(grid, block, stream, p); break;
    case kTf32x3: Kernel<T, kTf32x3>::launch(grid, block, stream, p); break;
    default: Kernel<T, kIeee>::launch(grid, block, stream, p); break;
  }
}

template <template <typename, int> class Kernel>
void launch_per_sample(int dtype, int products, int64_t batch, cudaStream_t stream, const Params& p,
                       const char* what) {
  const dim3 grid(static_cast<unsigned>(batch)), block(kThreads);
  switch (dtype) {
    case kFloat32: launch_with_products<Kernel, float>(products, grid, block, stream, p); break;
    case kBFloat16: launch_with_products<Kernel, __nv_bfloat16>(products, grid, block, stream, p); break;
    default: launch_with_products<Kernel, __half>(products, grid, block, stream, p); break;
  }
  check_launch(what);
}

template <typename T, int kProducts>
struct ForwardLaunch {
  static void launch(dim3 grid, dim3 block, cudaStream_t stream, const Params& p) {
    forward_kernel<T, kProducts><<<grid, block, 0, stream>>>(p);
  }
};

template <typename T, int kProducts>
struct BackwardLaunch {
  static void launch(dim3 grid, dim3 block, cudaStream_t stream, const Params& p) {
    backward_kernel<T, kProducts><<<grid, block, 0, stream>>>(p);
  }
};

}  // namespace kernels
using namespace kernels;

void prepare_prototypes(std::uintptr_t z, int z_dtype, int64_t m, int64_t dim, int64_t stride_m, int64_t stride_d,
                        int normalize, std::uintptr_t z_hat, std::uintptr_t z_sq_norm, std::uintptr_t z_divisor,
                        std::uintptr_t stream, int device) {
  require(z != 0 && z_hat != 0 && z_sq_norm != 0 && z_divisor != 0, "null prototype pointer");
  require(m >= 1 && m <= kMaxPrototypes, "M must be in [1, 256], got " + std::to_string(m));
  require(dim >= 1 && dim <= kMaxDim, "D must be in [1, 2048], got " + std::to_string(dim));
  check_modes(normalize, kEuclidean);
  use_device(device);
  auto* out_hat = reinterpret_cast<float*>(z_hat);
  auto* out_sq = reinterpret_cast<float*>(z_sq_norm);
  auto* out_div = reinterpret_cast<float*>(z_divisor);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(m)), block(kThreads);
  const int d = static_cast<int>(dim);
  switch (z_dtype) {
    case kFloat32:
      prepare_prototypes_kernel<float><<<grid, block, 0, s>>>(reinterpret_cast<const float*>(z), d, stride_m,
                                                              stride_d, normalize, out_hat, out_sq, out_div);
      break;
    case kBFloat16:
      prepare_prototypes_kernel<__nv_bfloat16><<<grid, block, 0, s>>>(
          reinterpret_cast<const __nv_bfloat16*>(z), d, stride_m, stride_d, normalize, out_hat, out_sq, out_div);
      break;
    case kFloat16:
      prepare_prototypes_kernel<__half><<<grid, block, 0, s>>>(reinterpret_cast<const __half*>(z), d, stride_m,
                                                               stride_d, normalize, out_hat, out_sq, out_div);
      break;
    default:
      require(false, "unsupported prototype dtype code " + std::to_string(z_dtype));
  }
  check_launch("prepare_prototypes_kernel");
}

void forward(const FeatureView& x, std::uintptr_t z_hat, std::uintptr_t z_sq_norm, int64_t m, int normalize, int cost,
             double mu, double gamma, int products, int max_iter, double tol, std::uintptr_t scratch,
             std::uintptr_t pooled, std::uintptr_t attr, std::uintptr_t weights, std::uintptr_t u, std::uintptr_t stream,
             int device) {
  check_view(x, m);
  check_products(products);
  check_modes(normalize, cost);
  use_device(device);
  require(max_iter >= 1, "max_iter must be >= 1");
  require(tol > 0.0, "tol must be > 0");
  require(pooled != 0 && attr != 0 && weights != 0 && u != 0, "null output pointer");
  Params p = common_params(x, z_hat, z_sq_norm, m, normalize, cost, mu, gamma, scratch);
  p.max_iter = max_iter;
  p.tol = static_cast<float>(tol);
  p.tol_target = static_cast<float>(tol * static_cast<double>(p.target));
  p.pooled = reinterpret_cast<void*>(pooled);
  p.attr = reinterpret_cast<void*>(attr);
  p.weights = reinterpret_cast<void*>(weights);
  p.u = reinterpret_cast<float*>(u);
  launch_per_sample<ForwardLaunch>(x.dtype, products, x.batch, reinterpret_cast<cudaStream_t>(stream), p, "forward_kernel");
}

void backward(const FeatureView& x, const FeatureView& grad_x_view, std::uintptr_t grad_pooled,
              std::uintptr_t grad_attr, std::uintptr_t grad_weights, std::uintptr_t u, std::uintptr_t z_hat,
              std::uintptr_t z_sq_norm, int64_t m, int normalize, int cost, double mu, double gamma, int products,
              std::uintptr_t coef, std::uintptr_t coef_colsum, std::uintptr_t stream, int device) {
  check_view(x, m);
  check_products(products);
  check_modes(normalize, cost);
  use_device(device);
  require(grad_x_view.data != 0 && grad_x_view.dtype == x.dtype && grad_x_view.batch == x.batch &&
              grad_x_view.n == x.n && grad_x_view.dim == x.dim,
          "grad_x must match x in shape and dtype");
  require(grad_pooled != 0 && grad_attr != 0 && grad_weights != 0 && u != 0 && coef_colsum != 0,
          "null gradient pointer");
  Params p = common_params(x, z_hat, z_sq_norm, m, normalize, cost, mu, gamma, coef);
  p.grad_pooled = reinterpret_cast<const float*>(grad_pooled);
  p.grad_attr = reinterpret_cast<const float*>(grad_attr);
  p.grad_weights = reinterpret_cast<const float*>(grad_weights);
  p.u_saved = reinterpret_cast<const float*>(u);
  p.coef_colsum = reinterpret_cast<float*>(coef_colsum);
  p.grad_x = reinterpret_cast<void*>(grad_x_view.data);
  p.gx_stride_b = grad_x_view.stride_b;
  p.gx_stride_n = grad_x_view.stride_n;
  p.gx_stride_d = grad_x_view.stride_d;
  launch_per_sample<BackwardLaunch>(x.dtype, products, x.batch, reinterpret_cast<cudaStream_t>(stream), p, "backward_kernel");
}

}  // namespace gsp
