"""A tiny forward + backward through the cuda and triton backends, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python bench/sanitizer_case.py
    compute-sanitizer --tool racecheck python bench/sanitizer_case.py

Covers a contiguous [B, N, D] input (B=2, N=7, D=33, M=5), a channels-first map read through
its strides, mu = 1, and both cost options: every dtype on the cuda backend, bfloat16 on
triton (its split-product paths; each Triton variant is compiled under the sanitizer, which is
slow), under each of the Triton backend's strategies (fused; gemm, whose Triton kernels read
cuBLAS's products), and on gemm also bfloat16 features with float32 prototypes (the
prototypes split into parts). Then float32 at N=130, M=131, D=97 (several tiles in every GEMM;
two feature tiles per sample in Triton) with each product precision.
Checks the outputs against the float64 reference loosely (the sanitizer's job is memory and
races) and prints SANITIZER_CASE_OK with the backends it ran.
"""

import torch

from gsp_kernels import backend_status, gsp_pool
from gsp_kernels.backends import forcing_strategy


def run_case(x, prototypes, backend, **options):
    """Forward + backward on `backend`; returns the outputs and both gradients."""
    xg = x.detach().clone().requires_grad_()
    zg = prototypes.detach().clone().requires_grad_()
    pooled, attr, weights = gsp_pool(xg, zg, backend=backend, return_weights=True, **options)
    loss = pooled.float().square().sum() + attr.float().sum() + weights.float().square().sum()
    loss.backward()
    torch.cuda.synchronize()
    return pooled, attr, weights, xg.grad, zg.grad


def check_close(x, prototypes, got, mu, **options):
    """Outputs against the float64 reference (the same loss, through autograd of gsp_pool)."""
    ref = run_reference(x, prototypes, mu, **options)
    for name, g, r in zip(("pooled", "attr", "weights", "grad_x", "grad_z"), got, ref):
        # Absolute floor: some references are exactly 0 (mu = 1 leaves the prototypes no gradient).
        err = (g.double().reshape(r.shape) - r).norm() / r.norm().clamp_min(1e-3)
        assert err < 3e-2, f"{name}: rel err {err.item():.2e}"


def run_reference(x, prototypes, mu, **options):
    x64 = x.detach().double().requires_grad_()
    z64 = prototypes.detach().double().requires_grad_()
    pooled, attr, weights = gsp_pool(x64, z64, transport_ratio=mu, backend="reference", return_weights=True, **options)
    (pooled.square().sum() + attr.sum() + weights.square().sum()).backward()
    return pooled, attr, weights, x64.grad, z64.grad


def main():
    status = backend_status("cuda")
    assert status["cuda"].available, f"cuda backend unavailable: {status['cuda'].reason}"
    # (backend, Triton strategy or None, (feature dtype, prototype dtype) pairs)
    runs = [("cuda", None, ((torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.float16,) * 2))]
    if status["triton"].available:
        runs += [("triton", "fused", ((torch.bfloat16,) * 2,)),
                 ("triton", "gemm", ((torch.bfloat16,) * 2, (torch.bfloat16, torch.float32)))]
    ran = []
    for backend, strategy, dtypes in runs:
        with forcing_strategy(strategy):
            run_backend(backend, dtypes)
        ran.append(f"{backend}:{strategy}" if strategy else backend)
    print("SANITIZER_CASE_OK", " ".join(ran))


def run_backend(backend, dtypes):
    """Every case of the module docstring on `backend`, for each (x, prototypes) dtype pair."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for x_dtype, z_dtype in dtypes:
        x = torch.randn(2, 7, 33, device="cuda", generator=gen).to(x_dtype)
        z = torch.randn(5, 33, device="cuda", generator=gen).to(z_dtype)
        x[0, 3] = z[2]
        z[2] = x[0, 3]  # an exact feature/prototype match in both dtypes
        for mu, cost in ((0.3, "euclidean"), (1.0, "sqeuclidean")):
            got = run_case(x, z, backend, transport_ratio=mu, cost=cost)
            check_close(x, z, got, mu, cost=cost)
        x_map = torch.randn(2, 33, 3, 5, device="cuda", generator=gen).to(x_dtype)  # NCHW, N = 15
        got = run_case(x_map, z, backend, transport_ratio=0.5, normalize="l2")
        assert got[3].stride() == x_map.stride()
        check_close(x_map, z, got, 0.5, normalize="l2")
    # Several row, column and k tiles in every GEMM, and the tensor-core products.
    x = torch.randn(2, 130, 97, device="cuda", generator=gen)
    z = torch.randn(131, 97, device="cuda", generator=gen)
    for precision in ("ieee", "tf32", "tf32x3"):
        got = run_case(x, z, backend, precision=precision)
        check_close(x, z, got, 0.3)


if __name__ == "__main__":
    main()
