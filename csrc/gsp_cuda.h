// Host entry points of the CUDA backend (implemented in gsp_cuda.cu, bound in bindings.cpp).
// Plain C++: tensors arrive as device addresses, shapes and element strides; every launch runs
// on the given stream of the given device (index) and is checked; failures throw std::runtime_error with the CUDA message.
#pragma once

#include <cstdint>

namespace gsp {

// Size limits of the kernels (per-sample shared-memory arrays are sized by kMaxFeatures).
constexpr int64_t kMaxFeatures = 1024;    // N
constexpr int64_t kMaxPrototypes = 256;   // M
constexpr int64_t kMaxDim = 2048;         // D

// Element type codes passed from Python.
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Features x[b, i, d] at x + b*stride_b + i*stride_n + d*stride_d (elements).
struct FeatureView {
  std::uintptr_t data;
  int dtype;
  int64_t batch, n, dim;
  int64_t stride_b, stride_n, stride_d;
};

// Normalized prototypes ẑ [M, D] fp32, their squared norms [M] and divisors [M] (outputs).
void prepare_prototypes(std::uintptr_t z, int z_dtype, int64_t m, int64_t dim, int64_t stride_m,
                        int64_t stride_d, int normalize, std::uintptr_t z_hat, std::uintptr_t z_sq_norm,
                        std::uintptr_t z_divisor, std::uintptr_t stream, int device);

// Cost-GEMM products: 0 exact float32 FMA, 1 TF32 tensor cores, 2 3xTF32 tensor cores.
// Forward. scratch: fp32 [B, N, M]. pooled [B, D], attr [B, M], weights [B, N] contiguous in
// x's dtype; u [B] fp32.
void forward(const FeatureView& x, std::uintptr_t z_hat, std::uintptr_t z_sq_norm, int64_t m, int normalize,
             int cost, double mu, double gamma, int products, int max_iter, double tol, std::uintptr_t scratch,
             std::uintptr_t pooled, std::uintptr_t attr, std::uintptr_t weights, std::uintptr_t u,
             std::uintptr_t stream, int device);

// Backward. grad_pooled [B, D], grad_attr [B, M], grad_weights [B, N]: fp32 contiguous.
// Outputs: coef [B, N, M] fp32 = W / d_x (W of docs/math.md, Backward; d_x the feature's divisor),
// coef_colsum [B, M] fp32 = Σ_i W_ki, grad_x laid out by grad_x_view (x's dtype).
void backward(const FeatureView& x, const FeatureView& grad_x_view, std::uintptr_t grad_pooled,
              std::uintptr_t grad_attr, std::uintptr_t grad_weights, std::uintptr_t u, std::uintptr_t z_hat,
              std::uintptr_t z_sq_norm, int64_t m, int normalize, int cost, double mu, double gamma, int products,
              std::uintptr_t coef, std::uintptr_t coef_colsum, std::uintptr_t stream, int device);

}  // namespace gsp
