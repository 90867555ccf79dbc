"""Sweep the Triton GSP kernels' launch configurations: time, bitwise determinism, accuracy.

GPU-time estimate, default sweep (128 configs: 48 forward, 48 backward, 32 coef_x): ~1.5-2 min on an H200 with 12 precompile processes (compile ~1-3 s per config, the small GEMM less, 128 x 2 s / 12 = ~21 s, plus ~10 s of process start), then ~0.3 s per config to check and time (do_bench ~0.1-0.3 s): ~40 s; ~5-6 min if compiled serially (--compile-workers 0), which --budget-s 180 cuts short, round-robin over the groups so each keeps its first candidates.

What it answers, at the target shape B=256 N=196 D=512 M=128 (gamma 5, transport_ratio 0.3,
lipschitz, euclidean, newton, max_iter / tol from gsp_kernels.backends.reference): which
(BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages) is fastest for the forward kernel and for
the backward, which (BLOCK_K, BLOCK_M, BLOCK_D, num_warps, num_stages, programs_wanted) for
the backward's split-K prototype-gradient GEMM ("coef_x", `_gsp_coef_x_kernel`), and which
strategy ("strategy": the fused kernels or the gemm strategy, forward+backward at their
defaults, `_triton.use_strategy`), in float32 (precision auto = tf32x3, and ieee), bfloat16, and
bfloat16 features with float32 prototypes (the GSP layer under autocast), and whether each config
is bitwise deterministic and accurate against a float64 reference. `--write-config` turns the
winners into the tuned-configuration file of gsp_kernels.backends.triton.tuning (bench/sweep_report.py); defaults
are always the built-in rules (a tuned file in force is set aside while sweeping).

How:
- `triton_launch.BLOCK_OVERRIDE` is set to the full config around the timed call only (and reset
  to None in a `finally`). It applies to the forward *and* the backward launch, so the two
  are swept separately: forward configs time `_triton.forward` alone; backward configs time
  `_triton.backward` alone, on a u computed once per (dtype, precision) with the default
  config. The backward's prototype-gradient GEMM (`_gsp_coef_x_kernel`) keeps its default config
  there (included in the backward time) and is swept by the coef_x groups through
  `triton_fused.GEMM_OVERRIDE` instead: they time `_triton.backward` the same way, with the
  backward kernel's default config, so a coef_x speedup is over the whole backward.
  programs_wanted (the split-K's target program count) is 1, 2 (default) or 4 per SM.
- Per config: one call (compile, or load from Triton's cache; compile/launch errors such as
  out-of-resources are recorded and the sweep goes on), --det-runs more calls compared with
  torch.equal on every output, ‖out − ref‖/‖ref‖ per output against a float64 reference
  computed once per dtype (gsp_kernels.backends.reference on the same rounded inputs), then the
  median of triton.testing.do_bench (GPU) or of the determinism runs' wall times
  (time.perf_counter, interpreter). The last output of do_bench's calls is compared too.
- On a GPU, --compile-workers processes first compile every config into Triton's on-disk
  cache (at a small batch with the same specializations), so the timing loop mostly loads.
- "best" in a group = the fastest config that is deterministic and accurate (max relative
  error <= the dtype's tolerance, 1e-5 float32 / 2e-2 bfloat16, or <= 2x the default's
  error), reported with its speedup over the default config measured in the same run.
  Results are written to --json after every config (a killed run keeps what it measured).

Usage:
  python bench/sweep_triton.py --json OUT.json                          # full sweep, GPU
  python bench/sweep_triton.py --dry-run                                # list the configs only
  python bench/sweep_triton.py --kernels forward --dtypes bfloat16 --max-configs 6
  python bench/sweep_triton.py --configs 64,128,64,8,1 --configs 32,128,64,4,2   # given configs
  python bench/sweep_triton.py --kernels coef_x --dtypes bfloat16 --configs 64,128,64,8,3,264
  TRITON_INTERPRET=1 python bench/sweep_triton.py --smoke --json /tmp/s.json   # CPU check

A config is written BLOCK_N,BLOCK_M,BLOCK_D,num_warps,num_stages (forward, backward) or
BLOCK_K,BLOCK_M,BLOCK_D,num_warps,num_stages,programs_wanted (coef_x; programs_wanted is a
count of programs, 264 = 2 per SM on an H200); --configs of one kind select their kernels.

Beside this script: sweep_configs.py (the problem, dtype pairs, candidate tables and config
rules), sweep_workers.py (the precompile processes), sweep_report.py (summaries, the printed
table, the JSON and the tuned-configuration file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# The interpreter is chosen when the Triton kernels are decorated, i.e. imported: without a
# GPU, set it before triton and the package are imported (a no-op if already imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton

REPO_ROOT = Path(__file__).resolve().parent.parent
for _path in (REPO_ROOT, REPO_ROOT / "bench"):  # the package without an install; sweep_report beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from sweep_configs import (  # noqa: E402
    DEFAULT_DTYPES, DTYPES, KERNELS, Problem, candidate_configs, default_config, parse_config, smoke_configs,
    sweep_device,
)
from sweep_report import (  # noqa: E402
    config_header, config_key, config_keys, fmt, print_report, summarize, write_json, write_tuned_config,
)
from sweep_workers import collect_precompile, start_precompile  # noqa: E402

from gsp_kernels.backends import reference as _reference  # noqa: E402
from gsp_kernels.backends import triton as _triton  # noqa: E402
from gsp_kernels.backends.triton import fused as triton_fused  # noqa: E402
from gsp_kernels.backends.triton import launch as triton_launch  # noqa: E402
from gsp_kernels.backends.triton import tuning  # noqa: E402
from gsp_kernels.contract import (  # noqa: E402
    COST_MODES, KERNEL_SOLVERS, NORMALIZE_MODES, PRECISIONS, GSPOptions, check_options, default_max_iter, default_tol,
)
from gsp_kernels.testing import TOLERANCES, Shape, random_inputs, rel_err, shape_argument  # noqa: E402

# docs/math.md's tolerances (Accuracy) on ‖out − ref‖ / ‖ref‖ per features' dtype (at the auto precision).
TOL = {name: TOLERANCES[(name.split("+")[0], "auto")] for name in DTYPES}
FORWARD_OUTPUTS = ("pooled", "attr", "weights", "u")
BACKWARD_OUTPUTS = ("grad_x", "grad_prototypes")
TARGET_SHAPE = "256x196x512x128"
SMOKE_SHAPE = "2x9x20x7"
# Batch of the precompile workers' calls: same specializations as the target (B·N divisible by 16).
WORKER_BATCH = 16


@dataclass
class Group:
    """One (kernel, dtype, precision) sweep with its inputs, reference and candidates."""

    kernel: str
    dtype: str
    precision: str
    configs: list[dict] = field(default_factory=list)
    default: dict | None = None
    inputs: dict | None = None  # tensors, filled by prepare()

    @property
    def key(self) -> str:
        return f"{self.kernel} {self.dtype} {self.precision}"


# ----------------------------------------------------------------------------- inputs and reference


def call_options(problem: Problem, precision: str) -> GSPOptions:
    """The options of the backend's forward and backward for ``problem`` (float32 compute)."""
    return check_options(problem.mu, problem.gamma, problem.normalize, problem.cost, problem.solver,
                         precision=precision, n=problem.n, dtype=torch.float32)


def make_tensors(problem: Problem, batch: int, dtype: str, device: torch.device, seed: int) -> dict:
    """Features and prototypes in `dtype`'s pair on `device`, and cotangents of the three outputs
    in the features' dtype (the outputs')."""
    x, z = random_inputs(batch, problem.n, problem.m, problem.d, seed, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    x_dtype, z_dtype = DTYPES[dtype]
    cot = [torch.randn(shape, generator=gen) for shape in ((batch, problem.d), (batch, problem.m), (batch, problem.n))]
    return {
        "x": x.to(device, x_dtype),
        "z": z.to(device, z_dtype),
        "cotangents": [c.to(device, x_dtype) for c in cot],
    }


def reference_outputs(problem: Problem, tensors: dict) -> dict:
    """float64 forward and backward on the same (rounded) values: {name: tensor}."""
    x64, z64 = tensors["x"].double(), tensors["z"].double()
    pooled, attr, weights, u = _reference.gsp_forward(
        x64, z64, problem.mu, problem.gamma, problem.normalize, problem.cost, problem.solver,
        default_max_iter(problem.solver), default_tol(torch.float64),
    )
    grad_x, grad_z = _reference.gsp_backward(
        *(c.double() for c in tensors["cotangents"]), x64, z64, u,
        problem.mu, problem.gamma, problem.normalize, problem.cost,
    )
    return {"pooled": pooled, "attr": attr, "weights": weights, "u": u, "grad_x": grad_x, "grad_prototypes": grad_z}


def kernel_call(group: Group, problem: Problem, config: dict | None = None):
    """A no-argument function running the group's kernel once, returning its outputs: the tile
    groups time the fused strategy (their overrides' kernels), the strategy group forward then
    backward (on the forward's u) of ``config``'s strategy."""
    t = group.inputs
    options = call_options(problem, group.precision)
    if group.kernel == "strategy":
        def forward_backward():
            with _triton.use_strategy(config["strategy"]):
                outputs = _triton.forward(t["x"], t["z"], options)
                return (*outputs, *_triton.backward(*t["cotangents"], t["x"], t["z"], outputs[3], options))

        return forward_backward
    if group.kernel == "forward":
        def forward():
            with _triton.use_strategy("fused"):
                return _triton.forward(t["x"], t["z"], options)

        return forward

    def backward():
        with _triton.use_strategy("fused"):
            return _triton.backward(*t["cotangents"], t["x"], t["z"], t["u"], options)

    return backward


# ----------------------------------------------------------------------------- measurement


def set_override(config: dict | None, kernel: str = "forward") -> None:
    """The config on the hook its kernel reads (GEMM_OVERRIDE for coef_x; the strategy group's
    configs act through kernel_call); None: both off."""
    tiles = config if config and kernel != "strategy" else None
    triton_launch.BLOCK_OVERRIDE = dict(tiles) if tiles and kernel != "coef_x" else None
    triton_fused.GEMM_OVERRIDE = dict(tiles) if tiles and kernel == "coef_x" else None


def context_ok(device: torch.device) -> bool:
    """False after a sticky CUDA error (e.g. an illegal address): nothing more can run."""
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
        return True
    except Exception:  # noqa: BLE001
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def blank_row(group: Group, config: dict, error: str | None = None) -> dict:
    """A result row of `config` with nothing measured yet (or only `error`)."""
    return {
        "kernel": group.kernel, "dtype": group.dtype, "precision": group.precision, "config": dict(config),
        "is_default": config == group.default, "ms": None, "deterministic": None, "det_runs": 0,
        "rel_err": {}, "max_rel_err": None, "tol": TOL[group.dtype], "accurate": None,
        "first_call_s": None, "error": error,
    }


def measure(group: Group, config: dict, problem: Problem, refs: dict, device: torch.device, args) -> dict:
    """One row: first-call time, determinism, errors and median time of one config."""
    names = {"forward": FORWARD_OUTPUTS, "strategy": FORWARD_OUTPUTS + BACKWARD_OUTPUTS}.get(group.kernel, BACKWARD_OUTPUTS)
    row = blank_row(group, config)
    call = kernel_call(group, problem, config)
    set_override(config, group.kernel)
    try:
        start = time.perf_counter()
        first = call()
        synchronize(device)
        row["first_call_s"] = round(time.perf_counter() - start, 4)
        row["rel_err"] = {name: rel_err(out, refs[name], zero_ref="absolute") for name, out in zip(names, first)}
        row["max_rel_err"] = max(row["rel_err"].values())
        row["accurate"] = row["max_rel_err"] <= TOL[group.dtype]
        deterministic, wall = True, []
        for _ in range(args.det_runs):
            start = time.perf_counter()
            again = call()
            synchronize(device)
            wall.append(time.perf_counter() - start)
            deterministic &= all(torch.equal(a, b) for a, b in zip(first, again))
        row["det_runs"] = args.det_runs
        if device.type == "cuda":
            last = []

            def timed():
                last[:] = [call()]

            try:
                row["ms"] = float(triton.testing.do_bench(timed, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median"))
            except TypeError:  # a triton without return_mode
                row["ms"] = float(triton.testing.do_bench(timed, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.5])[0])
            synchronize(device)
            if last:
                deterministic &= all(torch.equal(a, b) for a, b in zip(first, last[0]))
                row["det_runs"] += 1
        elif wall:
            row["ms"] = statistics.median(wall) * 1e3
        row["deterministic"] = bool(deterministic)
    except Exception as exc:  # noqa: BLE001  (compile, resource or launch failure: record, go on)
        row["error"] = f"{type(exc).__name__}: {exc}"[:600]
    finally:
        set_override(None)
    return row


# ----------------------------------------------------------------------------- precompile workers


def worker_main(job_file: str) -> int:
    """Compile (by launching at a small batch) each job's config into Triton's on-disk cache."""
    spec = json.loads(Path(job_file).read_text())
    problem = Problem(**spec["problem"])
    device = sweep_device()
    batch = min(problem.batch, WORKER_BATCH)
    tensors = {}
    for job in spec["jobs"]:
        kernel, dtype, precision = job["kernel"], job["dtype"], job["precision"]
        if dtype not in tensors:
            tensors[dtype] = make_tensors(problem, batch, dtype, device, seed=0)
            tensors[dtype]["u"] = torch.zeros(batch, device=device)  # any finite u compiles the backward
        group = Group(kernel, dtype, precision, inputs=tensors[dtype])
        start, error, from_triton = time.perf_counter(), None, False
        set_override(job["config"], kernel)
        try:
            kernel_call(group, problem, job["config"])()
            synchronize(device)
        except Exception as exc:  # noqa: BLE001  (recorded; the main loop skips this config)
            error = f"{type(exc).__name__}: {exc}"[:600]
            from_triton = type(exc).__module__.startswith("triton") and "CUDA" not in str(exc)
        finally:
            set_override(None)
        line = {"index": job["index"], "seconds": round(time.perf_counter() - start, 3), "error": error,
                "compile_error": from_triton}
        print("JOB " + json.dumps(line), flush=True)
        if error and not from_triton:  # e.g. a CUDA error: this process's context may be unusable
            return 1
    return 0


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=shape_argument, default=None, help=f"BxNxDxM (default {TARGET_SHAPE}; smoke {SMOKE_SHAPE})")
    p.add_argument("--gamma", type=float, default=5.0)
    p.add_argument("--transport-ratio", type=float, default=0.3)
    p.add_argument("--normalize", default="lipschitz", choices=NORMALIZE_MODES)
    p.add_argument("--cost", default="euclidean", choices=COST_MODES)
    p.add_argument("--solver", default="newton", choices=KERNEL_SOLVERS)
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {', '.join(KERNELS)}")
    p.add_argument("--dtypes", default=None, help=f"comma list of {', '.join(DTYPES)} (features+prototypes; default "
                   f"{DEFAULT_DTYPES}, --smoke: float32)")
    p.add_argument("--precisions", default="auto,ieee", help="float32 precisions (bfloat16 always runs auto)")
    p.add_argument("--configs", type=parse_config, action="append", default=None,
                   help="sweep only these configs (repeatable): BLOCK_N,BLOCK_M,BLOCK_D,num_warps,num_stages for "
                        "forward/backward, BLOCK_K,BLOCK_M,BLOCK_D,num_warps,num_stages,programs_wanted for coef_x")
    p.add_argument("--max-configs", type=int, default=None, help="at most this many configs per group (priority order)")
    p.add_argument("--budget-s", type=float, default=180.0, help="no new config starts after this many seconds")
    p.add_argument("--det-runs", type=int, default=2, help="calls compared bitwise with the first one")
    p.add_argument("--warmup-ms", type=int, default=10, help="do_bench warmup")
    p.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition time")
    p.add_argument("--compile-workers", type=int, default=None,
                   help="processes precompiling the configs on a GPU (default min(12, cpus - 2); 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--write-config", metavar="PATH", default=None,
                   help="write (or merge into) a tuned-configuration file for this GPU and Triton (gsp_kernels.backends.triton.tuning): "
                        "per dtype the fastest deterministic, accurate strategy and tiles; a folder gets the standard name")
    p.add_argument("--commit", default=os.environ.get("GSP_COMMIT"),
                   help="the commit measured, recorded in --write-config's file (default $GSP_COMMIT, else git)")
    p.add_argument("--smoke", action="store_true",
                   help=f"tiny shape {SMOKE_SHAPE}, two configs per kernel, auto precision, float32 unless --dtypes "
                        "(CPU: interpreter)")
    p.add_argument("--dry-run", action="store_true", help="print the groups and configs, run nothing")
    p.add_argument("--_compile-worker", dest="compile_worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    # Defaults are the built-in rules, not a tuned file already in force (workers inherit this).
    saved = os.environ.get(tuning.ENV_VAR)
    os.environ[tuning.ENV_VAR] = "none"
    tuning.clear_cache()
    try:
        return worker_main(args.compile_worker) if args.compile_worker else sweep(args, argv)
    finally:
        if saved is None:
            os.environ.pop(tuning.ENV_VAR, None)
        else:
            os.environ[tuning.ENV_VAR] = saved
        tuning.clear_cache()


def sweep(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """The sweep main() runs: groups, precompile, measurements, report (and tuned file)."""
    t0 = time.monotonic()
    device = sweep_device()
    unavailable = _triton.availability(device)
    if unavailable:
        raise SystemExit(f"triton backend unavailable on {device}: {unavailable}")
    batch, n, d, m = args.shape or Shape.parse(SMOKE_SHAPE if args.smoke else TARGET_SHAPE)
    problem = Problem(batch, n, d, m, args.gamma, args.transport_ratio, args.normalize, args.cost, args.solver)
    kernels = [k for k in args.kernels.split(",") if k]
    dtypes = [t for t in (args.dtypes or ("float32" if args.smoke else DEFAULT_DTYPES)).split(",") if t]
    precisions = [p for p in args.precisions.split(",") if p]
    if args.smoke:
        precisions = ["auto"]
    if device.type == "cpu" and "bfloat16" in dtypes and not args.dry_run:
        print("bfloat16 dropped: the interpreter's tl.dot is not reliable in bfloat16 (float32 and mixed dtypes, whose "
              "dots run in float32, only on the CPU)")
        dtypes = [t for t in dtypes if t != "bfloat16"]
    for name, values, allowed in (("kernels", kernels, KERNELS), ("dtypes", dtypes, DTYPES), ("precisions", precisions, PRECISIONS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"--{name}: unknown {bad}, choose from {list(allowed)}")

    if args.configs:  # configs of one kind (5 or 6 numbers) select the kernels that take them
        kernels = [k for k in kernels if any(set(c) == set(config_keys(k)) for c in args.configs)]
        if not kernels:
            raise SystemExit("--configs: none of them fits the --kernels chosen")

    # Groups, most used path first: bfloat16 and float32 auto, forward, backward, then coef_x.
    groups = []
    for dtype in dtypes:
        for precision in (precisions if dtype == "float32" else ["auto"]):
            for kernel in kernels:
                group = Group(kernel, dtype, precision)
                if args.smoke:
                    group.default = default_config(problem, kernel, dtype)
                    group.configs = smoke_configs(problem, kernel, dtype)
                else:
                    group.default, group.configs = candidate_configs(
                        problem, kernel, dtype, precision, args.max_configs, args.configs
                    )
                groups.append(group)
    groups.sort(key=lambda g: (g.precision == "ieee", g.dtype != "bfloat16", KERNELS.index(g.kernel)))
    # Round-robin over the groups by candidate rank: a budget cut leaves every group its first ones.
    order = []
    for rank in range(max(len(g.configs) for g in groups)):
        order += [(g, g.configs[rank]) for g in groups if rank < len(g.configs)]

    if args.dry_run:
        for group in groups:
            print(f"{group.key}: default {config_key(group.default)}; {len(group.configs)} configs "
                  f"({config_header(group.kernel)}): " + " ".join(config_key(c) for c in group.configs))
        per_kernel = ", ".join(f"{k} {sum(len(g.configs) for g in groups if g.kernel == k)}" for k in kernels)
        print(f"{len(order)} configs in all ({per_kernel})")
        return {"groups": {g.key: g.configs for g in groups}, "order": [(g.key, c) for g, c in order]}

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"B": batch, "N": n, "D": d, "M": m},
        "problem": problem.__dict__,
        "max_iter": default_max_iter(problem.solver), "tol": default_tol(torch.float32),
        "timer": "triton.testing.do_bench median" if device.type == "cuda" else "time.perf_counter median of the determinism runs",
        "budget_s": args.budget_s, "budget_reached": False, "elapsed_s": 0.0,
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "defaults": {g.key: g.default for g in groups},
        "precompile": None, "aborted": None, "rows": [], "not_run": [],
    }
    print(f"sweep on {report['device']}: {problem.label}, {len(order)} configs in {len(groups)} groups, "
          f"budget {args.budget_s:.0f} s", flush=True)

    workers = args.compile_workers
    if workers is None:
        workers = min(12, max(0, (os.cpu_count() or 1) - 2)) if device.type == "cuda" and not args.smoke else 0
    with tempfile.TemporaryDirectory(prefix="sweep_triton_") as scratch:
        compiled, procs = {}, []
        if workers > 0:  # on the CPU only to exercise this path: the interpreter has no cache
            procs = start_precompile(order, problem, workers, Path(scratch))

        # Inputs and the float64 reference, once per dtype; u once per (dtype, precision) from
        # the default config, for the backward and coef_x groups (both time _triton.backward).
        tensors, refs, us = {}, {}, {}
        for dtype in dtypes:
            tensors[dtype] = make_tensors(problem, batch, dtype, device, args.seed)
            refs[dtype] = reference_outputs(problem, tensors[dtype])
        for group in groups:
            group.inputs = dict(tensors[group.dtype])
            if group.kernel != "forward":
                assert triton_launch.BLOCK_OVERRIDE is None and triton_fused.GEMM_OVERRIDE is None
                if (group.dtype, group.precision) not in us:
                    us[group.dtype, group.precision] = _triton.forward(
                        group.inputs["x"], group.inputs["z"], call_options(problem, group.precision)
                    )[3]
                group.inputs["u"] = us[group.dtype, group.precision]
        synchronize(device)
        print(f"inputs and references ready at {time.monotonic() - t0:.1f} s", flush=True)
        if procs:
            compiled = collect_precompile(procs, t0 + 0.6 * args.budget_s, Path(scratch), len(order))
            report["precompile"] = {
                "workers": len(procs), "done": len(compiled), "jobs": len(order),
                "elapsed_s": round(time.monotonic() - t0, 2),
                "seconds": [compiled[i]["seconds"] for i in sorted(compiled)],
            }

        for index, (group, config) in enumerate(order):
            elapsed = time.monotonic() - t0
            if elapsed > args.budget_s:
                report["budget_reached"] = True
                report["not_run"] = [
                    {"kernel": g.kernel, "dtype": g.dtype, "precision": g.precision, "config": c}
                    for g, c in order[index:]
                ]
                print(f"budget of {args.budget_s:.0f} s reached: {len(order) - index} configs not run", flush=True)
                break
            entry = compiled.get(index, {})
            worker_error = entry.get("error") if entry.get("compile_error") else None
            if worker_error:  # failed to compile/launch in the worker: do not pay for it again
                row = blank_row(group, config, error="precompile: " + worker_error)
            else:
                row = measure(group, config, problem, refs[group.dtype], device, args)
            report["rows"].append(row)
            report["elapsed_s"] = round(time.monotonic() - t0, 2)
            write_json(report, args.json)
            status = row["error"][:80] if row["error"] else (
                f"{fmt(row['ms'], '.4f')} ms det={fmt(row['deterministic'])} err={fmt(row['max_rel_err'], '.1e')} "
                f"first={fmt(row['first_call_s'], '.2f')} s"
            )
            print(f"[{report['elapsed_s']:6.1f} s] {group.key:<24} {config_key(config):<20} {status}", flush=True)
            if row["error"] and device.type == "cuda" and not context_ok(device):
                report["aborted"] = f"CUDA context unusable after {group.key} {config_key(config)}: {row['error']}"
                report["not_run"] = [
                    {"kernel": g.kernel, "dtype": g.dtype, "precision": g.precision, "config": c}
                    for g, c in order[index + 1:]
                ]
                print(report["aborted"], flush=True)
                break

    report["elapsed_s"] = round(time.monotonic() - t0, 2)
    report["summary"] = [
        {k: s[k] for k in ("kernel", "dtype", "precision", "speedup_over_default")}
        | {"default": s["default"]["config"] if s["default"] else None,
           "default_ms": s["default"]["ms"] if s["default"] else None,
           "best": s["best"]["config"] if s["best"] else None,
           "best_ms": s["best"]["ms"] if s["best"] else None}
        for s in summarize(report)
    ]
    if args.write_config:
        report["tuned_config"] = write_tuned_config(report, problem, args)
    write_json(report, args.json)
    print_report(report)
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
