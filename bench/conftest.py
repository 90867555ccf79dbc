"""pytest configuration of the pytest-benchmark suite (bench/test_microbench.py): without a GPU the
Triton kernels run in Triton's interpreter, which must be chosen before triton is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
