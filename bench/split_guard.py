"""GPU check of the Triton backend's split samples before anything is timed.

    python bench/split_guard.py [--repeats 10] [--shapes BxNxDxM,...] [--device cuda]

The forward and the backward's first kernel split a sample across programs; the last program
to arrive (an atomic ticket) reads the others' scratch. A memory-ordering mistake there cannot
show under the CPU interpreter. This runs forward + backward with the split at training shapes
(float32 and bfloat16), several times, and checks that
  * every repeat gives the same bits (a race shows up as results that move between runs), and
  * the split is as close to the float64 reference as one program per sample is
    (``triton_launch.SPLIT_SAMPLES = False``, the fallback), to 2x its error plus a float32 floor.
Prints SPLIT_GUARD_OK or the failures and exits 1; `bench/device_check.sh` then times the rest
of its run with ``GSP_TRITON_SPLIT=0``.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from gsp_kernels import gsp_pool
from gsp_kernels.backends import triton as _triton
from gsp_kernels.backends.triton import launch as triton_launch
from gsp_kernels.testing import Shape, parse_shapes, rel_err

NAMES = ("pooled", "attr", "weights", "grad_x", "grad_prototypes")
# B, N, D, M: the target shape; a small batch with a prime N (tiles of 50, 50, 50 and 47
# features; it builds the same kernel variants as profile_backends.py's B=64, N=196, which Triton's
# cache then shares); the largest N with the most prototypes (16 programs per sample).
SHAPES = (Shape(256, 196, 512, 128), Shape(64, 197, 512, 128), Shape(16, 1024, 128, 256))


def forward_backward(x, prototypes, cotangents):
    """(pooled, attr, weights, grad_x, grad_prototypes) of the triton backend's fused strategy
    (the one that splits samples across programs)."""
    x = x.detach().requires_grad_()
    prototypes = prototypes.detach().requires_grad_()
    with _triton.use_strategy("fused"):
        outputs = gsp_pool(x, prototypes, backend="triton", return_weights=True)
        grads = torch.autograd.grad(outputs, (x, prototypes), [c.to(o.dtype) for c, o in zip(cotangents, outputs)])
    return [t.detach().clone() for t in (*outputs, *grads)]


def reference(x, prototypes, cotangents):
    """The same five tensors from the float64 reference on the same (rounded) inputs and
    cotangents (rounded to x's dtype, as the triton outputs' are)."""
    x64 = x.detach().double().requires_grad_()
    z64 = prototypes.detach().double().requires_grad_()
    outputs = gsp_pool(x64, z64, backend="reference", return_weights=True)
    grads = torch.autograd.grad(outputs, (x64, z64), [c.to(x.dtype).double() for c in cotangents])
    return [t.detach() for t in (*outputs, *grads)]


def check_shape(shape: Shape, dtype, repeats, device):
    """Failure messages for one shape and dtype (empty when the split is sound)."""
    batch, n, d, m = shape
    gen = torch.Generator(device=device).manual_seed(sum(shape))
    x = torch.randn(batch, n, d, device=device, generator=gen).to(dtype)  # [B, N, D]
    prototypes = torch.randn(m, d, device=device, generator=gen).to(dtype)  # [M, D]
    x[:, 0] = prototypes[0]  # a feature equal to a prototype in every sample
    # Cotangents of pooled [B, D], attr [B, M], weights [B, N].
    cotangents = [torch.randn(s, device=device, generator=gen) for s in ((batch, d), (batch, m), (batch, n))]
    failures = []
    triton_launch.SPLIT_SAMPLES = True
    first = forward_backward(x, prototypes, cotangents)
    for run in range(1, repeats):
        again = forward_backward(x, prototypes, cotangents)
        moved = [name for name, a, b in zip(NAMES, first, again) if not torch.equal(a, b)]
        if moved:
            failures.append(f"repeat {run} moved {', '.join(moved)}")
            break
    triton_launch.SPLIT_SAMPLES = False
    try:
        whole = forward_backward(x, prototypes, cotangents)
    finally:
        triton_launch.SPLIT_SAMPLES = True
    want = reference(x, prototypes, cotangents)
    floor = 1e-6 if dtype == torch.float32 else 1e-3
    for name, split_out, whole_out, ref in zip(NAMES, first, whole, want):
        err_split, err_whole = (rel_err(out, ref, zero_ref="inf") for out in (split_out, whole_out))
        # inf: a non-finite output (of either layout), or a non-zero one against an all-zero reference
        if not (math.isfinite(err_split) and math.isfinite(err_whole)) or not err_split <= 2 * err_whole + floor:
            failures.append(f"{name}: error {err_split:.2e} split vs {err_whole:.2e} one program per sample")
    label = f"{shape} {str(dtype)[6:]}"
    print(f"  {label}: {'ok' if not failures else '; '.join(failures)}")
    return [f"{label}: {f}" for f in failures]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="runs per case that must give the same bits")
    parser.add_argument("--shapes", default=",".join(map(str, SHAPES)),
                        help="BxNxDxM, comma-separated (default: the target shape, B=64 with N=197, N=1024)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu runs the Triton interpreter (small shapes)")
    args = parser.parse_args(argv)
    shapes = parse_shapes(args.shapes)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("split_guard: no CUDA device")
    where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"== Triton split samples on {where}: {args.repeats} repeats per case ==")
    failures = [f for shape in shapes for dtype in (torch.float32, torch.bfloat16)
                for f in check_shape(shape, dtype, args.repeats, args.device)]
    if failures:
        print("SPLIT_GUARD_FAILED\n" + "\n".join(failures))
        sys.exit(1)
    print("SPLIT_GUARD_OK")


if __name__ == "__main__":
    main()
