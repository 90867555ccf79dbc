"""Where the time goes: per-kernel CUDA time of one forward+backward, per backend and dtype.

    python bench/profile_backends.py [--shapes 256x196x512x128] [--split-shapes 256x196x512x128,64x196x512x128]
                                     [--iters 5]

Prints, for each shape, kernel backend (Triton once per strategy, fused and gemm) and dtype, the wall time of one forward+backward (CUDA events),
the CPU time to issue it (no synchronization), the CUDA kernels that take the GPU time and the
host-side operations that take the CPU time, in µs per iteration, largest first: when the issue
time reaches the wall time, the step is bound by the host (for Triton, the part of the issue
time spent in Triton's own launcher is shown too). Then the Triton kernels' GPU time (CUDA-graph
replay) with samples split across programs against one program per sample
(``launch.SPLIT_SAMPLES``), per shape and dtype, and in bfloat16 with the half kernels'
register cap (two programs per SM) against none (``launch.PROGRAMS_PER_SM``). Also re-runs the Triton
forward on a bfloat16 channels-first map several times and reports whether it is bitwise
stable (a moving result is a race).
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gsp_kernels import available_backends, gsp_pool
from gsp_kernels.bench.timing import graph_replay_ms
from gsp_kernels.testing import Shape, parse_shapes


def make_inputs(shape: Shape, dtype, channels_first=False):
    """Features [B, N, D] (or, channels first, a [B, D, H, W] view of them) and prototypes [M, D]."""
    batch, n, d, m = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, n, d, device="cuda", generator=gen).to(dtype)
    z = torch.randn(m, d, device="cuda", generator=gen).to(dtype)
    if channels_first:
        side = int(round(n**0.5))
        x = x.transpose(1, 2).reshape(batch, d, side, n // side)
    return x.requires_grad_(), z.requires_grad_()


def step(x, z, backend):
    pooled, attr = gsp_pool(x, z, backend=backend)
    (pooled.float().sum() + attr.float().square().sum()).backward()


def profile_backend(shape, dtype, backend, iters, label=None):
    x, z = make_inputs(shape, dtype)
    for _ in range(3):
        step(x, z, backend)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        step(x, z, backend)
    end.record()
    torch.cuda.synchronize()
    wall_us = start.elapsed_time(end) * 1e3 / iters
    torch.cuda.synchronize()
    issue_start = time.perf_counter()
    for _ in range(iters):
        step(x, z, backend)
    issue_us = (time.perf_counter() - issue_start) * 1e6 / iters
    torch.cuda.synchronize()
    launcher = triton_launcher_time(x, z, iters) if backend == "triton" else ""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step(x, z, backend)
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sorted((e for e in events if getattr(e, "self_device_time_total", 0) > 0),
                     key=lambda e: e.self_device_time_total, reverse=True)
    host_ops = sorted((e for e in events if e.self_cpu_time_total > 0), key=lambda e: e.self_cpu_time_total, reverse=True)
    print(f"\n== {label or backend} {str(dtype)[6:]} {shape}: {wall_us:.0f} µs per fwd+bwd (events), "
          f"{issue_us:.0f} µs to issue it (CPU, no sync){launcher}")
    print("  GPU kernels:")
    for e in kernels[:10]:
        print(f"  {e.self_device_time_total / iters:9.1f} µs  x{e.count // iters:<3d} {e.key[:110]}")
    print("  host operations (self CPU time under the profiler, which adds its own per-op cost):")
    for e in host_ops[:12]:
        print(f"  {e.self_cpu_time_total / iters:9.1f} µs  x{e.count // iters:<3d} {e.key[:110]}")


def triton_launcher_time(x, z, iters):
    """', of which N µs in Triton's launcher (k launches)': CPU time inside JITFunction.run per
    forward+backward, issued without synchronization (the rest of the issue time is torch)."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.run
    spent, calls = [0.0], [0]

    def timed_run(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start
            calls[0] += 1

    JITFunction.run = timed_run
    try:
        for _ in range(iters):
            step(x, z, "triton")
    finally:
        JITFunction.run = original
    torch.cuda.synchronize()
    return f", of which {spent[0] * 1e6 / iters:.0f} µs in Triton's launcher ({calls[0] // iters} launches)"


def triton_stability(shape, runs=6):
    """Bitwise stability of the fused strategy's bf16 forward (the one BLOCK_OVERRIDE tiles),
    forced whatever a tuned configuration would pick."""
    from gsp_kernels.backends import triton as triton_backend

    with triton_backend.use_strategy("fused"):
        _triton_stability(shape, runs)


def _triton_stability(shape, runs):
    from gsp_kernels.backends.triton import launch

    for channels_first in (False, True):
        for override in ({}, {"num_stages": 1}):
            launch.BLOCK_OVERRIDE = dict(override) or None
            x, z = make_inputs(shape, torch.bfloat16, channels_first)
            first = [t.float() for t in gsp_pool(x.detach(), z.detach(), backend="triton", return_weights=True)]
            worst = 0.0
            for _ in range(runs - 1):
                again = gsp_pool(x.detach(), z.detach(), backend="triton", return_weights=True)
                worst = max(worst, *((a.float() - b).abs().max().item() for a, b in zip(again, first)))
            layout = "NCHW" if channels_first else "BND"
            print(f"triton bf16 {layout} override={override}: max |run - run0| over {runs} runs = {worst:.3e}")
    launch.BLOCK_OVERRIDE = None


def knob_comparison(title, knob, settings, shapes, dtypes):
    """GPU µs (CUDA-graph replay) of the Triton forward and forward+backward under each setting
    of a module knob of ``gsp_kernels.backends.triton.launch`` (the first is the default), side by side."""
    from gsp_kernels.backends import triton as triton_backend
    from gsp_kernels.backends.triton import launch

    print(f"\n== triton: {title} (GPU µs, graph replay) ==")
    default = getattr(launch, knob)
    for shape in shapes:
        for dtype in dtypes:
            x, z = make_inputs(shape, dtype)
            times = []
            try:
                for setting in settings:
                    setattr(launch, knob, setting)
                    with triton_backend.use_strategy("fused"):  # the knobs are the fused kernels'
                        fwd = graph_replay_ms(lambda _i: gsp_pool(x.detach(), z.detach(), backend="triton"), x.device)
                        fwd_bwd = graph_replay_ms(lambda _i: step(x, z, "triton"), x.device)
                    times.append((fwd * 1e3, fwd_bwd * 1e3))
            finally:
                setattr(launch, knob, default)
            (f_first, fb_first), (f_other, fb_other) = times
            print(f"  {shape} {str(dtype)[6:]}: fwd {f_first:.0f} vs {f_other:.0f} "
                  f"({f_other / f_first:.2f}x), fwd+bwd {fb_first:.0f} vs {fb_other:.0f} ({fb_other / fb_first:.2f}x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="256x196x512x128", help="BxNxDxM, comma-separated: per-kernel profiles")
    parser.add_argument("--split-shapes", default="256x196x512x128,64x196x512x128",
                        help="BxNxDxM, comma-separated: Triton split vs one program per sample (default adds B=64)")
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    shapes, split_shapes = parse_shapes(args.shapes), parse_shapes(args.split_shapes)
    backends = [b for b in available_backends("cuda") if b != "reference"]
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, backends {backends}")
    if "triton" in backends:
        triton_stability(Shape(8, 196, 512, 128))
    for shape in shapes:
        for backend in backends:
            for dtype in (torch.float32, torch.bfloat16):
                if backend != "triton":
                    profile_backend(shape, dtype, backend, args.iters)
                    continue
                from gsp_kernels.backends import triton as triton_backend

                for strategy in triton_backend.STRATEGIES:
                    with triton_backend.use_strategy(strategy):
                        profile_backend(shape, dtype, backend, args.iters, f"triton:{strategy}")
    if "triton" in backends:
        knob_comparison("samples split across programs vs one program per sample", "SPLIT_SAMPLES",
                        (True, False), split_shapes, (torch.float32, torch.bfloat16))
        knob_comparison("half kernels capped to two programs per SM (maxnreg) vs uncapped", "PROGRAMS_PER_SM",
                        (2, 1), shapes, (torch.bfloat16,))


if __name__ == "__main__":
    main()
