"""One forward+backward per kernel backend and dtype, for Nsight Compute's hardware counters.

    ncu --clock-control none --profile-from-start off --nvtx --kernel-name-base demangled \\
        --kernel-name "regex:gsp|gemm|nvjet|xmma|cutlass" --section SpeedOfLight --section Occupancy \\
        --section LaunchStats python bench/ncu_case.py [--shape 256x196x512x128]

(``gsp`` names this project's kernels; the others cuBLAS's GEMMs, as bench/device_check.sh runs it.)

Each case (backend, dtype, precision, and for triton the strategy: fused, or gemm with its
products on cuBLAS) runs twice unprofiled (compilation, caches), then once
between cudaProfilerStart/Stop inside an NVTX range named after it, so ncu reports exactly one
forward+backward per case: whether each kernel is bound by memory, compute or latency, and its
achieved occupancy. Without ncu it runs the same work and prints the cases.
"""

from __future__ import annotations

import argparse

import torch

from gsp_kernels import available_backends, gsp_pool
from gsp_kernels.backends import forcing_strategy
from gsp_kernels.testing import shape_argument

# (backend, dtype, precision, Triton strategy): the defaults of both backends, CUDA's tensor-core
# candidate for float32 (`auto` is its exact SIMT path), and both Triton strategies.
CASES = (
    ("cuda", torch.float32, "auto", None),
    ("cuda", torch.float32, "tf32x3", None),
    ("cuda", torch.bfloat16, "auto", None),
    ("triton", torch.float32, "auto", "fused"),
    ("triton", torch.bfloat16, "auto", "fused"),
    ("triton", torch.float32, "auto", "gemm"),
    ("triton", torch.bfloat16, "auto", "gemm"),
)


def forward_backward(x, prototypes, backend, precision):
    x = x.detach().requires_grad_()
    prototypes = prototypes.detach().requires_grad_()
    pooled, attr = gsp_pool(x, prototypes, backend=backend, precision=precision)
    (pooled.float().sum() + attr.float().square().sum()).backward()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=shape_argument, default="256x196x512x128", help="BxNxDxM")
    args = parser.parse_args(argv)
    batch, n, d, m = args.shape
    backends = available_backends("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x32 = torch.randn(batch, n, d, device="cuda", generator=gen)  # [B, N, D]
    z32 = torch.randn(m, d, device="cuda", generator=gen)  # [M, D]
    cudart = torch.cuda.cudart()
    for backend, dtype, precision, strategy in CASES:
        if backend not in backends:
            print(f"{backend}: not available")
            continue
        x, prototypes = x32.to(dtype), z32.to(dtype)
        label = f"{backend}{':' + strategy if strategy else ''} {str(dtype)[6:]} {precision}"
        with forcing_strategy(strategy):
            for _ in range(2):
                forward_backward(x, prototypes, backend, precision)
            torch.cuda.synchronize()
            cudart.cudaProfilerStart()
            torch.cuda.nvtx.range_push(label)
            forward_backward(x, prototypes, backend, precision)
            torch.cuda.nvtx.range_pop()
            torch.cuda.synchronize()
            cudart.cudaProfilerStop()
        print(f"profiled: {label} at {args.shape}")


if __name__ == "__main__":
    main()
