"""The native module ``gsp_kernels._C`` (csrc/, built by setup.py through CMake), if it was built,
and its build report: the `cuda` backend's kernels live there."""

from __future__ import annotations

try:
    import gsp_kernels._C as _C  # the extension module itself, not the package

    NATIVE_IMPORT_ERROR: str | None = None
except ImportError as exc:  # skipped build (GSP_SKIP_NATIVE=1) or a broken one
    _C = None
    NATIVE_IMPORT_ERROR = str(exc)


def build_info() -> dict:
    """How `_C` was built: ``{"native": bool, "with_cuda": bool, "cuda_archs": ..., ...}``.

    Without a native module, ``native`` is False and ``reason`` says why.
    """
    if _C is None:
        return {"native": False, "with_cuda": False, "reason": NATIVE_IMPORT_ERROR}
    return {"native": True, **_C.build_info()}
