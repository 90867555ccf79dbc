// pybind11 module gsp_kernels._C: the build report (and, with CUDA, the kernel entry points).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "gsp_math.h"

namespace py = pybind11;

#ifndef GSP_WITH_CUDA
#define GSP_WITH_CUDA 0
#endif

#if GSP_WITH_CUDA
#include "gsp_cuda.h"
#endif

static py::dict build_info() {
  py::dict info;
  info["with_cuda"] = static_cast<bool>(GSP_WITH_CUDA);
  info["cxx_compiler"] = std::string(GSP_CXX_COMPILER);
  info["build_type"] = std::string(GSP_BUILD_TYPE);
#if GSP_WITH_CUDA
  info["cuda_compiler"] = std::string(GSP_CUDA_COMPILER);
  info["cuda_archs"] = std::string(GSP_CUDA_ARCHS_STR);
#else
  info["cuda_compiler"] = py::none();
  info["cuda_archs"] = py::none();
#endif
  return info;
}

// The CUDA kernels' solve of Σ_i σ(u + ℓ_i) = μN run on the host with the same helpers
// (sequential sums). Returns (u, iterations); μ >= 1 gives (+inf, 0).
static std::pair<float, int> newton_solve_host(const std::vector<float>& ell, double mu, double tol, int max_iter) {
  if (ell.empty()) throw std::invalid_argument("ell must not be empty");
  if (!(mu > 0.0 && mu <= 1.0)) throw std::invalid_argument("mu must be in (0, 1]");
  if (mu >= 1.0) return {std::numeric_limits<float>::infinity(), 0};
  const float n_mu = static_cast<float>(static_cast<double>(ell.size()) * mu);
  const float logit_mu = static_cast<float>(std::log(mu) - std::log1p(-mu));
  float ell_min = ell[0], ell_max = ell[0], ell_sum = 0.0f;
  for (float v : ell) {
    ell_min = gsp::nan_min(ell_min, v);
    ell_max = gsp::nan_max(ell_max, v);
    ell_sum += v;
  }
  gsp::NewtonState state = gsp::newton_start(logit_mu, ell_min, ell_max, ell_sum / static_cast<float>(ell.size()));
  const float tol_target = static_cast<float>(tol * static_cast<double>(n_mu));
  const float log_target = static_cast<float>(std::log(static_cast<double>(ell.size()) * mu));
  for (int it = 0; it < max_iter; ++it) {
    float mass = 0.0f, slope = 0.0f;
    for (float v : ell) {
      const float s = gsp::sigmoid(state.u + v);
      mass += s;
      slope += s * (1.0f - s);
    }
    if (gsp::newton_iterate(state, mass, n_mu, log_target, slope, tol_target, static_cast<float>(tol))) {
      return {state.u, it + 1};
    }
  }
  return {state.u, max_iter};
}

// The kernels' snapped cost of one (feature, prototype) pair from normalized norms and dot.
static float cost_host(float xx_hat, float zz_hat, float dot_hat, const std::string& cost) {
  if (cost != "euclidean" && cost != "sqeuclidean") throw std::invalid_argument("unknown cost " + cost);
  return gsp::cost_from_dot(xx_hat, zz_hat, dot_hat, cost == "euclidean" ? gsp::kEuclidean : gsp::kSqEuclidean);
}

#if GSP_WITH_CUDA
// (data_ptr, dtype code, B, N, D, stride_b, stride_n, stride_d) from Python.
using ViewTuple = std::tuple<std::uintptr_t, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

static gsp::FeatureView to_view(const ViewTuple& t) {
  gsp::FeatureView v;
  std::tie(v.data, v.dtype, v.batch, v.n, v.dim, v.stride_b, v.stride_n, v.stride_d) = t;
  return v;
}
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "gsp-kernels native module (no torch linkage)";
  m.def("build_info", &build_info, "How this module was built: CUDA or not, architectures, compilers.");
  m.def("sigmoid_host", &gsp::sigmoid, "The kernels' logistic sigmoid in float32, on the host.");
  m.def("cost_host", &cost_host, "The kernels' snapped cost from normalized norms and dot, on the host.");
  m.def("newton_solve_host", &newton_solve_host, py::arg("ell"), py::arg("mu"), py::arg("tol"), py::arg("max_iter"),
        "The kernels' bracketed Newton solve of one sample in float32 on the host: (u, iterations).");
#if GSP_WITH_CUDA
  m.attr("MAX_FEATURES") = gsp::kMaxFeatures;
  m.attr("MAX_PROTOTYPES") = gsp::kMaxPrototypes;
  m.attr("MAX_DIM") = gsp::kMaxDim;
  m.def("prepare_prototypes", &gsp::prepare_prototypes, "Normalized prototypes, squared norms and divisors (fp32).");
  m.def(
      "forward",
      [](const ViewTuple& x, std::uintptr_t z_hat, std::uintptr_t z_sq_norm, int64_t m, int normalize, int cost,
         double mu, double gamma, int products, int max_iter, double tol, std::uintptr_t scratch,
         std::uintptr_t pooled, std::uintptr_t attr, std::uintptr_t weights, std::uintptr_t u, std::uintptr_t stream,
         int device) {
        gsp::forward(to_view(x), z_hat, z_sq_norm, m, normalize, cost, mu, gamma, products, max_iter, tol, scratch,
                     pooled, attr, weights, u, stream, device);
      },
      "GSP forward kernel on `stream` (all tensors as device addresses).");
  m.def(
      "backward",
      [](const ViewTuple& x, const ViewTuple& grad_x, std::uintptr_t grad_pooled, std::uintptr_t grad_attr,
         std::uintptr_t grad_weights, std::uintptr_t u, std::uintptr_t z_hat, std::uintptr_t z_sq_norm, int64_t m,
         int normalize, int cost, double mu, double gamma, int products, std::uintptr_t coef,
         std::uintptr_t coef_colsum, std::uintptr_t stream, int device) {
        gsp::backward(to_view(x), to_view(grad_x), grad_pooled, grad_attr, grad_weights, u, z_hat, z_sq_norm, m,
                      normalize, cost, mu, gamma, products, coef, coef_colsum, stream, device);
      },
      "GSP backward kernel on `stream`: coef = W / d_x, its column sums, and grad_x.");
#endif
}
