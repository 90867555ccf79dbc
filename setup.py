"""Build `gsp_kernels._C` with CMake + ninja.

Environment switches:
    GSP_SKIP_NATIVE=1   build no native module; the package works with the reference backend.
    GSP_NO_CUDA=1       build `_C` without CUDA even where nvcc is found.
    GSP_CUDA_ARCHS      CMake CUDA architectures (default "90-real;90-virtual": sm_90 + PTX).
    CUDA_HOME / CUDACXX where to look for nvcc (else PATH).
    GSP_BUILD_TYPE      CMake build type (default Release).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    """nvcc from CUDACXX, CUDA_HOME, PATH or /usr/local/cuda; never from torch."""
    if os.environ.get("GSP_NO_CUDA") == "1":
        return None
    candidates = [os.environ.get("CUDACXX")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and Path(c).is_file()), None)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('GSP_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        nvcc = find_nvcc()
        if nvcc:
            args += ["-DGSP_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
            args.append(f"-DGSP_CUDA_ARCHS={os.environ.get('GSP_CUDA_ARCHS', '90-real;90-virtual')}")
        else:
            args.append("-DGSP_WITH_CUDA=OFF")
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel"], cwd=build_dir, check=True)


if __name__ == "__main__":  # pip runs this file as __main__; python_tests/test_ptxas.py imports find_nvcc
    native = os.environ.get("GSP_SKIP_NATIVE") != "1"
    setup(
        ext_modules=[CMakeExtension("gsp_kernels._C")] if native else [],
        cmdclass={"build_ext": CMakeBuild} if native else {},
    )
