"""The kernel benchmark behind `gsp-kernels bench`: forward, backward and forward+backward times
of every backend, beside two baselines measured in the same run: the paper's algorithm (100
fixed-point iterations, eager) and ``torch.compile`` of the reference's forward and analytic
backward with a fixed Newton iteration count.

- ``candidates``: the cases (shapes, dtypes, rotating input sets) and the timed implementations.
- ``timing``: the clocks (do_bench or CUDA events on a GPU, round-robin perf_counter on the CPU),
  host issue time and CUDA-graph replay.
- ``cost_model``: the flops and bytes per phase of docs/math.md, Cost model, the machine peaks and roofline floors.
- ``run``: one run (``run_bench``): rows per shape and dtype, per-call overhead, the JSON report.
- ``report``: the report's tables (``format_report``); ``plot``: its PNG (needs matplotlib).
- ``paper``: the paper's algorithm, the baseline; ``training_step``: a ResNet-50 training step
  with GAP and with GSP per backend (``--training-step``).

bench/test_microbench.py times the same candidates under pytest-benchmark.
"""

from .candidates import BASELINES, DEFAULT_SHAPES, QUICK_SHAPES
from .report import format_report
from .run import run_bench

__all__ = ["BASELINES", "DEFAULT_SHAPES", "QUICK_SHAPES", "format_report", "run_bench"]
