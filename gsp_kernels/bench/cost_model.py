"""The kernel benchmark's cost model and roofline: the flops and minimum bytes per phase
(docs/math.md, Cost model), and the machine peaks (given, H200 datasheet defaults, or measured)
that turn them into floors.

Forward 2·B·N·M·D flops, backward 3x that; bytes B·N·D·sizeof(x) forward, twice that backward
(read x, write grad_x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..testing import Shape
from .timing import median_ms

# H200 SXM peaks: dense FP32 FMA, TF32 and BF16 tensor cores (TFLOP/s), measured copy (GB/s).
H200_PEAK_TFLOPS = {"fp32": 67.0, "tf32": 495.0, "bf16": 990.0}
H200_PEAK_GBPS = 4300.0


def cost_model(shape: Shape, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """The flops and minimum bytes per phase (docs/math.md, Cost model)."""
    forward_flops = 2.0 * shape.batch * shape.n * shape.m * shape.d
    x_bytes = float(shape.batch * shape.n * shape.d * torch.empty((), dtype=dtype).element_size())
    flops = {"fwd": forward_flops, "bwd": 3.0 * forward_flops, "fwd_bwd": 4.0 * forward_flops}
    bytes_moved = {"fwd": x_bytes, "bwd": 2.0 * x_bytes, "fwd_bwd": 3.0 * x_bytes}
    return {"flops": flops, "bytes": bytes_moved}


@dataclass
class Peaks:
    """Machine peaks for the roofline floor, and where they came from."""

    fp32_tflops: float
    tensor_core_tflops: dict[str, float]  # per input dtype name: tf32 for float32, bf16 for bf16...
    gbps: float
    source: str

    def floors_ms(self, flops: float, bytes_moved: float, dtype_name: str) -> dict[str, float]:
        """Roofline floor at FP32 FMA rate and at tensor-core rate (ms)."""
        memory_ms = bytes_moved / (self.gbps * 1e9) * 1e3
        tensor_core = self.tensor_core_tflops.get(dtype_name, self.fp32_tflops)
        return {
            "fp32": max(flops / (self.fp32_tflops * 1e12) * 1e3, memory_ms),
            "tensor_core": max(flops / (tensor_core * 1e12) * 1e3, memory_ms),
        }


def measure_peaks(device: torch.device) -> tuple[float, float, float, float]:
    """Measured matmul TFLOP/s (fp32 IEEE, tf32-or-fp32, bf16) and copy GB/s on `device`."""
    size = 4096 if device.type == "cuda" else 1024
    copy_elements = (256 if device.type == "cuda" else 128) * 2**20 // 4

    def matmul_tflops(dtype: torch.dtype, allow_tf32: bool) -> float:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        try:
            ms = median_ms(lambda _: torch.mm(a, b), device, 1, warmup=2, repeats=5)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        return 2.0 * size**3 / (ms * 1e-3) / 1e12

    fp32 = matmul_tflops(torch.float32, False)
    tf32 = matmul_tflops(torch.float32, True) if device.type == "cuda" else fp32
    bf16 = matmul_tflops(torch.bfloat16, False) if device.type == "cuda" else fp32
    source = torch.empty(copy_elements, device=device)
    target = torch.empty_like(source)
    ms = median_ms(lambda _: target.copy_(source), device, 1, warmup=2, repeats=5)
    gbps = 2.0 * source.numel() * 4 / (ms * 1e-3) / 1e9  # read + write
    return fp32, max(tf32, fp32), max(bf16, fp32), gbps


def resolve_peaks(device: torch.device, peak_tflops: list[float] | None, peak_gbps: float | None) -> Peaks:
    """Given peaks, else H200 defaults on an H200, else measured ones."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if "H200" in name:
        fp32, tf32, bf16, gbps = *H200_PEAK_TFLOPS.values(), H200_PEAK_GBPS
        source = "H200 defaults (dense datasheet peaks, 4.3 TB/s measured copy)"
    else:
        fp32, tf32, bf16, gbps = measure_peaks(device)
        source = f"measured on {name}"
    if peak_tflops:
        fp32, tf32, bf16 = (peak_tflops + [fp32, tf32, bf16][len(peak_tflops):])[:3]
        source += "; --peak-tflops given"
    if peak_gbps:
        gbps = peak_gbps
        source += "; --peak-gbps given"
    tensor_core = {"float32": tf32, "bfloat16": bf16, "float16": bf16, "float64": fp32}
    return Peaks(fp32, tensor_core, gbps, source)
