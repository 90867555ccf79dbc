"""The `cuda` backend: the kernels of ``csrc/gsp_cuda.cu`` (the native module, ``native``) behind the
backend contract of ``gsp_kernels.backends``. Math and symbols: docs/math.md.

``_C`` does not link against torch: tensors are passed as device addresses, shapes and element
strides, with the current CUDA stream as an integer. Scratch and outputs are allocated here by
torch (graph-capture safe).

``precision`` selects the arithmetic of the kernels' GEMMs (the cost GEMM, and the
feature-gradient GEMM of the backward): "auto" and "ieee" exact float32 FMA, "tf32" one TF32
tensor-core product, "tf32x3" three (split hi/lo operands, about float32 accuracy). The
prototype-gradient GEMM runs through torch.matmul (cuBLAS, under torch's own TF32 setting).
"""

from __future__ import annotations

import torch

from ..contract import COST_CODES, NORMALIZE_CODES, GSPOptions
from . import native
from .reference import normalize_rows_backward

# The kernels' codes beside the contract's (csrc/gsp_cuda.h): input dtypes, and the arithmetic
# of their GEMMs per precision.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_PRODUCT_CODES = {"auto": 0, "ieee": 0, "tf32": 1, "tf32x3": 2}
# Kernel size limits (also enforced in C++; mirrored here so the check needs no device).
MAX_FEATURES = 1024
MAX_PROTOTYPES = 256
MAX_DIM = 2048
# The module is built for sm_90 machine code plus compute_90 PTX.
_MIN_CAPABILITY = (9, 0)


def _native_reason() -> str | None:
    """Why `_C` cannot launch kernels, or None. Evaluated once at import: torch.compile cannot
    trace calls into the pybind module."""
    if native._C is None:
        return f"gsp_kernels._C is not built ({native.NATIVE_IMPORT_ERROR})"
    if not native._C.build_info().get("with_cuda", False):
        return "gsp_kernels._C was built without CUDA (nvcc not found, or GSP_NO_CUDA=1)"
    return None


_NATIVE_REASON = _native_reason()
_device_reasons: dict[int, str | None] = {}


def _device_reason(index: int) -> str | None:
    """Why the kernels cannot run on CUDA device `index` (cached), or None."""
    if index not in _device_reasons:
        capability = torch.cuda.get_device_capability(index)
        _device_reasons[index] = (
            None
            if capability >= _MIN_CAPABILITY
            else f"needs compute capability >= 9.0 (built for sm_90), device has {capability[0]}.{capability[1]}"
        )
    return _device_reasons[index]


def availability(device: torch.device) -> str | None:
    """None if the kernels can run on `device`, else why not."""
    if _NATIVE_REASON is not None:
        return _NATIVE_REASON
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA devices, not {device.type}"
    if torch.compiler.is_compiling():
        return None  # the device is checked again, eagerly, when the op runs
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return _device_reason(device.index if device.index is not None else torch.cuda.current_device())


def unsupported(x: torch.Tensor, prototypes: torch.Tensor, options: GSPOptions) -> str | None:
    """None if the kernels compute this call, else why not."""
    if options.precision not in _PRODUCT_CODES:
        return f"precision={options.precision!r} is not one of {tuple(_PRODUCT_CODES)}"
    if x.dtype not in _DTYPE_CODES or prototypes.dtype not in _DTYPE_CODES:
        return f"dtypes {x.dtype}/{prototypes.dtype}: the cuda backend takes float32, bfloat16 or float16"
    if options.solver != "newton":
        return f"solver={options.solver!r}: the cuda backend implements the newton solver only"
    if x.dim() != 3 or prototypes.dim() != 2:
        return "x must be [B, N, D] and prototypes [M, D]"
    batch, n, dim = x.shape
    m = prototypes.shape[0]
    if n > MAX_FEATURES or m > MAX_PROTOTYPES or dim > MAX_DIM:
        return (
            f"N={n}, M={m}, D={dim} exceed the kernel limits "
            f"N <= {MAX_FEATURES}, M <= {MAX_PROTOTYPES}, D <= {MAX_DIM}"
        )
    if batch >= 2**31:
        return f"batch {batch} exceeds the grid limit"
    if x.device.type != "cuda" or prototypes.device != x.device:
        return "x and prototypes must be on the same CUDA device"
    return None


def _view(t: torch.Tensor) -> tuple:
    """(address, dtype code, B, N, D, stride_b, stride_n, stride_d) of a [B, N, D] tensor."""
    return (t.data_ptr(), _DTYPE_CODES[t.dtype], *t.shape, *t.stride())


def _prepared_prototypes(prototypes: torch.Tensor, normalize: str, stream: int):
    """ẑ [M, D], ‖ẑ‖² [M] and the divisors [M], float32, from one kernel."""
    m, dim = prototypes.shape
    z_hat = torch.empty((m, dim), dtype=torch.float32, device=prototypes.device)
    z_sq_norm = torch.empty((m,), dtype=torch.float32, device=prototypes.device)
    z_divisor = torch.empty((m,), dtype=torch.float32, device=prototypes.device)
    native._C.prepare_prototypes(
        prototypes.data_ptr(), _DTYPE_CODES[prototypes.dtype], m, dim, *prototypes.stride(),
        NORMALIZE_CODES[normalize], z_hat.data_ptr(), z_sq_norm.data_ptr(), z_divisor.data_ptr(), stream,
        prototypes.device.index,
    )
    return z_hat, z_sq_norm, z_divisor


def _check_inputs(x: torch.Tensor, prototypes: torch.Tensor, options: GSPOptions) -> None:
    """Raise ValueError where the kernels cannot take this call (the op runs eagerly)."""
    reason = unsupported(x, prototypes, options)
    if reason is None:
        reason = availability(x.device)
    if reason is not None:
        raise ValueError(f"cuda backend: {reason}")


def forward(x: torch.Tensor, prototypes: torch.Tensor, options: GSPOptions):
    """Forward kernels -> pooled [B, D], attr [B, M], weights [B, N] (x's dtype), u [B] float32."""
    _check_inputs(x, prototypes, options)
    batch, n, dim = x.shape
    m = prototypes.shape[0]
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        z_hat, z_sq_norm, _ = _prepared_prototypes(prototypes, options.normalize, stream)
        scratch = torch.empty((batch, n, m), dtype=torch.float32, device=x.device)  # per-sample costs
        pooled = torch.empty((batch, dim), dtype=x.dtype, device=x.device)
        attr = torch.empty((batch, m), dtype=x.dtype, device=x.device)
        weights = torch.empty((batch, n), dtype=x.dtype, device=x.device)
        u = torch.empty((batch,), dtype=torch.float32, device=x.device)
        native._C.forward(
            _view(x), z_hat.data_ptr(), z_sq_norm.data_ptr(), m, NORMALIZE_CODES[options.normalize],
            COST_CODES[options.cost], float(options.transport_ratio), float(options.gamma),
            _PRODUCT_CODES[options.precision], int(options.max_iter), float(options.tol), scratch.data_ptr(),
            pooled.data_ptr(), attr.data_ptr(), weights.data_ptr(), u.data_ptr(), stream, x.device.index,
        )
    return pooled, attr, weights, u


def backward(grad_pooled, grad_attr, grad_weights, x: torch.Tensor, prototypes: torch.Tensor, u: torch.Tensor,
             options: GSPOptions):
    """Fused feature-gradient kernel, then the prototype gradient through one cuBLAS GEMM.

    The kernel writes coef = W / d_x [B, N, M] and Σ_i W_ki [B, M]; then
    gẑ_k = ẑ_k Σ_b Σ_i W_ki − Σ_b Σ_i coef_ki x_i and the prototype normalization backward.
    """
    _check_inputs(x, prototypes, options)
    normalize = options.normalize
    batch, n, dim = x.shape
    m = prototypes.shape[0]
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        z_hat, z_sq_norm, z_divisor = _prepared_prototypes(prototypes, normalize, stream)
        gy = grad_pooled.to(torch.float32).contiguous()  # [B, D]
        ga = grad_attr.to(torch.float32).contiguous()  # [B, M]
        gw = grad_weights.to(torch.float32).contiguous()  # [B, N]
        u32 = u.to(torch.float32).contiguous()  # [B]
        coef = torch.empty((batch, n, m), dtype=torch.float32, device=x.device)
        coef_colsum = torch.empty((batch, m), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x)
        native._C.backward(
            _view(x), _view(grad_x), gy.data_ptr(), ga.data_ptr(), gw.data_ptr(), u32.data_ptr(),
            z_hat.data_ptr(), z_sq_norm.data_ptr(), m, NORMALIZE_CODES[normalize], COST_CODES[options.cost],
            float(options.transport_ratio), float(options.gamma), _PRODUCT_CODES[options.precision], coef.data_ptr(),
            coef_colsum.data_ptr(), stream,
            x.device.index,
        )
        features = x.reshape(batch * n, dim).to(torch.float32)  # [B*N, D]
        coef_x = coef.reshape(batch * n, m).t() @ features  # [M, D] = Σ_b Σ_i (W/d_x)_ki x_i
        grad_z_hat = z_hat * coef_colsum.sum(0).unsqueeze(-1) - coef_x  # [M, D]
        grad_z = normalize_rows_backward(grad_z_hat, z_hat, z_divisor.unsqueeze(-1), normalize)
    return grad_x, grad_z.to(prototypes.dtype).contiguous()
