"""The sweep's precompile processes (bench/sweep_triton.py, on a GPU): each compiles its share
of the configs into Triton's on-disk cache by running ``sweep_triton.py --_compile-worker JOBS``
(``sweep_triton.worker_main``), so that the timing loop mostly loads; one JSON line per config
comes back on its stdout."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sweep_configs import Problem
from sweep_report import REPO_ROOT

SWEEP_SCRIPT = Path(__file__).resolve().with_name("sweep_triton.py")


def start_precompile(order: list[tuple], problem: Problem, workers: int, scratch: Path) -> list:
    """Start `workers` processes compiling the configs of `order`, the sweep's (group, config)
    pairs, round-robin into Triton's on-disk cache; collect_precompile() waits for them."""
    jobs = [
        {"index": i, "kernel": g.kernel, "dtype": g.dtype, "precision": g.precision, "config": c}
        for i, (g, c) in enumerate(order)
    ]
    procs = []
    for w in range(workers):
        mine = jobs[w::workers]
        if not mine:
            continue
        job_file = scratch / f"jobs{w}.json"
        job_file.write_text(json.dumps({"problem": problem.__dict__, "jobs": mine}))
        out = open(scratch / f"worker{w}.out", "w")  # noqa: SIM115  (closed in collect_precompile)
        err = open(scratch / f"worker{w}.err", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, str(SWEEP_SCRIPT), "--_compile-worker", str(job_file)],
            stdout=out, stderr=err, cwd=str(REPO_ROOT),
        )
        procs.append((w, proc, out, err))
    print(f"precompile: {len(jobs)} configs on {len(procs)} processes", flush=True)
    return procs


def collect_precompile(procs: list, deadline: float, scratch: Path, jobs: int) -> dict:
    """Wait for the workers until the deadline (then stop them); {index: worker line}."""
    for w, proc, out, err in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by its handle
            proc.wait()
            print(f"  worker {w}: stopped at the precompile deadline", flush=True)
        out.close()
        err.close()
        if proc.returncode not in (0, -9):
            tail = (scratch / f"worker{w}.err").read_text()[-1500:]
            print(f"  worker {w}: exit {proc.returncode}\n{tail}", flush=True)
    done = {}
    for w, *_ in procs:
        for line in (scratch / f"worker{w}.out").read_text().splitlines():
            if line.startswith("JOB "):
                entry = json.loads(line[4:])
                done[entry["index"]] = entry
    seconds = [e["seconds"] for e in done.values()]
    if seconds:
        print(f"precompile: {len(done)}/{jobs} done, median {statistics.median(seconds):.2f} s per config "
              f"(max {max(seconds):.2f} s, {sum(seconds):.0f} s of compile in all)", flush=True)
    return done
