// pybind11 module gsp_kernels._C: the build report (and, with CUDA, the kernel entry points).
#include <pybind11/pybind11.h>

#include <string>

namespace py = pybind11;

#ifndef GSP_WITH_CUDA
#define GSP_WITH_CUDA 0
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

PYBIND11_MODULE(_C, m) {
  m.doc() = "gsp-kernels native module (no torch linkage)";
  m.def("build_info", &build_info, "How this module was built: CUDA or not, architectures, compilers.");
}
