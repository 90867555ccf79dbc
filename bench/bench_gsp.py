#!/usr/bin/env python3
"""Benchmark script: the same as `gsp-kernels bench`, e.g. `python bench/bench_gsp.py --quick --json out.json`."""

import sys

from gsp_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
