// Scalar GSP math shared by the CUDA kernels and the host (docs/math.md, The scalar solve; the
// reference's solve_newton in gsp_kernels/backends/reference.py).
// Includable from plain C++ (GSP_NO_CUDA builds) and from nvcc: only the qualifiers differ.
#pragma once

#include <cfloat>
#include <cmath>

#ifdef __CUDACC__
#define GSP_HD __host__ __device__ __forceinline__
#else
#define GSP_HD inline
#endif

namespace gsp {

// The contract's constants and codes: gsp_kernels/contract.py (python_tests/test_contract.py checks).
constexpr float kCostSnap = 4e-6f;
constexpr float kL2Eps = 1e-12f;

enum Normalize : int { kLipschitz = 0, kL2 = 1, kNone = 2 };
enum Cost : int { kEuclidean = 0, kSqEuclidean = 1 };

// False for NaN and ±inf, in host and device code alike.
GSP_HD bool is_finite(float v) { return fabsf(v) <= FLT_MAX; }

// Min and max that propagate NaN (like torch.amin / amax), unlike fminf / fmaxf.
GSP_HD float nan_min(float a, float b) { return (a < b || a != a) ? a : b; }
GSP_HD float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

GSP_HD float sigmoid(float t) { return 1.0f / (1.0f + expf(-t)); }

// Rows whose float32 sum of squares overflows (norms above √max, 1.8e19) are summed again as
// v·2⁻⁷⁰, exact for every normal element: a norm up to float32's max then squares to at most
// 2¹¹⁶ (the Triton kernels' ROW_SCALE, gsp_kernels/backends/triton/jit_math.py).
constexpr float kRowScale = 0x1p70f;
constexpr float kInvRowScale = 0x1p-70f;

// d / scale of the cost normalization for a row v = scale·v′ with ‖v′‖² = scaled_squared_norm,
// scale a power of two (1 where the plain sum of squares is finite: then it is d itself, bit
// for bit). d = max(1, ‖v‖) (lipschitz), max(‖v‖, eps) (l2) or 1 (none).
GSP_HD float scaled_norm_divisor(float scaled_squared_norm, float scale, int normalize) {
  const float norm = sqrtf(scaled_squared_norm);
  if (normalize == kLipschitz) return fmaxf(norm, 1.0f / scale);
  if (normalize == kL2) return fmaxf(norm, kL2Eps / scale);
  return 1.0f / scale;
}

// The power of two p with which the feature gradient forms β x as (x/p)·(β p): near d for rows of
// divisor at least 2³², where β ~ 1/d² would underflow; 1 below (those rows are unchanged); at
// most 2¹²⁶, so that 1/p is normal.
GSP_HD float gradient_power(float divisor) {
  if (!(divisor >= 0x1p32f)) return 1.0f;
  int exponent;
  frexpf(divisor, &exponent);  // divisor = m·2^exponent, m in [0.5, 1)
  return ldexpf(1.0f, exponent - 1 < 126 ? exponent - 1 : 126);
}

// Whether the normalization backward projects out the radial part for this divisor.
GSP_HD bool norm_projects(float divisor, int normalize) {
  if (normalize == kLipschitz) return divisor > 1.0f;
  if (normalize == kL2) return divisor > kL2Eps;
  return false;
}

// Cost from the normalized squared norms and the normalized dot product, snapped to 0 like
// backends/reference.py squared_costs (an exact feature/prototype match costs exactly 0).
GSP_HD float cost_from_dot(float xx_hat, float zz_hat, float dot_hat, int cost) {
  const float norms = xx_hat + zz_hat;
  float sq = norms - 2.0f * dot_hat;
  sq = sq <= kCostSnap * norms ? 0.0f : sq;  // NaN stays NaN
  return cost == kEuclidean ? sqrtf(sq) : sq;
}

// Bracketed Newton state for Σ_i σ(u + ℓ_i) = μN (one sample).
struct NewtonState {
  float u;
  float lo;
  float hi;
};

// Start: bracket [logit μ − max ℓ, logit μ − min ℓ], u₀ = logit μ − mean ℓ clamped into it.
GSP_HD NewtonState newton_start(float logit_mu, float ell_min, float ell_max, float ell_mean) {
  NewtonState s;
  s.lo = logit_mu - ell_max;
  s.hi = logit_mu - ell_min;
  s.u = nan_min(nan_max(logit_mu - ell_mean, s.lo), s.hi);
  return s;
}

// One iteration from mass = Σσ and slope = Σσ(1 − σ) at s.u, for the target μN (and its log).
// Moves s.u to the Newton step of log Σσ = log μN (nearly linear where the σ are small: one
// step there), or to the bracket midpoint when the step leaves the bracket or is not finite.
// Returns true when the sample has converged (the caller stops; s.u already holds the final u).
// tol_target = tol·μN; tol is the relative tolerance on the step and the bracket.
GSP_HD bool newton_iterate(NewtonState& s, float mass, float target, float log_target, float slope, float tol_target,
                           float tol) {
  const float residual = mass - target;
  // A small (or non-finite) residual stops here, before any step: on a plateau of Σσ the
  // slope can vanish, and a bisection from an exact root would leave it.
  if (fabsf(residual) <= tol_target || !is_finite(residual)) return true;
  if (residual > 0.0f) s.hi = s.u;
  if (residual < 0.0f) s.lo = s.u;
  const float u_newton = s.u - (logf(mass) - log_target) * mass / slope;
  const bool inside = u_newton >= s.lo && u_newton <= s.hi;  // false for NaN steps
  const float u_next = inside ? u_newton : 0.5f * (s.lo + s.hi);
  const float scale = fmaxf(fabsf(s.u), 1.0f);
  const bool done = fabsf(u_next - s.u) <= tol * scale || (s.hi - s.lo) <= tol * scale;
  s.u = u_next;
  return done;
}

}  // namespace gsp
