"""The sweep's report (bench/sweep_triton.py): config names, per-group summaries, the printed
table, the JSON file, and the tuned-configuration file (``--write-config``) built from them."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
from pathlib import Path

import torch
import triton

from gsp_kernels.backends.triton import tuning

REPO_ROOT = Path(__file__).resolve().parent.parent
KEYS = tuning.TILE_KEYS  # BLOCK_N, BLOCK_M, BLOCK_D, num_warps, num_stages
# The backward's split-K GEMM (_gsp_coef_x_kernel, through triton_fused.GEMM_OVERRIDE).
GEMM_KEYS = tuning.GEMM_KEYS
# The strategy group times forward+backward of each design (the backend's use_strategy) at its defaults.
STRATEGY_KEYS = ("strategy",)


def config_keys(kernel: str) -> tuple[str, ...]:
    return {"coef_x": GEMM_KEYS, "strategy": STRATEGY_KEYS}.get(kernel, KEYS)


def config_key(config: dict) -> str:
    keys = GEMM_KEYS if "BLOCK_K" in config else STRATEGY_KEYS if "strategy" in config else KEYS
    return ",".join(str(config[k]) for k in keys)


def fmt(value, spec=".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def summarize(report: dict) -> list[dict]:
    """Per group: rows sorted by time (failures last), default and best deterministic config."""
    summaries = []
    groups = {}
    for row in report["rows"]:
        groups.setdefault((row["kernel"], row["dtype"], row["precision"]), []).append(row)
    for (kernel, dtype, precision), rows in groups.items():
        rows.sort(key=lambda r: (r["ms"] is None, r["ms"] if r["ms"] is not None else 0.0))
        default = next((r for r in rows if r["is_default"]), None)
        default_err = default["max_rel_err"] if default and default["max_rel_err"] is not None else 0.0

        def usable(r, default_err=default_err):
            if r["ms"] is None or not r["deterministic"] or r["max_rel_err"] is None:
                return False
            return r["accurate"] or r["max_rel_err"] <= 2.0 * default_err

        best = next((r for r in rows if usable(r)), None)
        speedup = None
        if best and default and default["ms"]:
            speedup = default["ms"] / best["ms"]
        summaries.append({
            "kernel": kernel, "dtype": dtype, "precision": precision, "rows": rows,
            "default": default, "best": best, "speedup_over_default": speedup,
        })
    return summaries


def config_header(kernel: str) -> str:
    return {"coef_x": "BLOCK_K,M,D,warps,stages,programs", "strategy": "strategy"}.get(kernel, "BLOCK_N,M,D,warps,stages")


def print_report(report: dict) -> None:
    print(f"\n{report['device']} | torch {report['torch']} | triton {report['triton']} | {report['shape']} | "
          f"{report['elapsed_s']:.0f} s{' (budget reached)' if report['budget_reached'] else ''}")
    for s in summarize(report):
        print(f"\n== {s['kernel']} {s['dtype']} precision={s['precision']}")
        print(f"{config_header(s['kernel']):<34}{'ms':>9}{'x default':>11}{'det':>5}{'max err':>10}  {'acc':<4}note")
        base = s["default"]["ms"] if s["default"] and s["default"]["ms"] else None
        for r in s["rows"]:
            ratio = base / r["ms"] if base and r["ms"] else None
            note = "default " if r["is_default"] else ""
            if r["error"]:
                note += r["error"].splitlines()[0][:70]
            elif r["max_rel_err"] is not None:
                worst = max(r["rel_err"], key=r["rel_err"].get)
                note += f"worst {worst}"
            print(f"{config_key(r['config']):<34}{fmt(r['ms'], '.4f'):>9}{fmt(ratio, '.2f'):>11}"
                  f"{fmt(r['deterministic']):>5}{fmt(r['max_rel_err'], '.2e'):>10}  {fmt(r['accurate']):<4}{note}")
        best = s["best"]
        if best:
            print(f"best deterministic & accurate: {config_key(best['config'])} {best['ms']:.4f} ms, "
                  f"{fmt(s['speedup_over_default'], '.2f')}x the default")
        else:
            print("best deterministic & accurate: none")
    if report["not_run"]:
        print(f"\nnot run (budget): {len(report['not_run'])} configs")


def _jsonable(value):
    """Standard JSON: non-finite floats (errors of non-finite outputs) as the strings inf / nan."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(report: dict, path: str | None) -> None:
    """Atomically (temp file, then rename), so a killed run leaves the last complete file."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(report), indent=1, default=str, allow_nan=False))
    os.replace(tmp, target)


def strict_best(rows: list[dict]) -> dict | None:
    """The fastest row that was bitwise deterministic and within the dtype's tolerance (rows
    sorted by time, as ``summarize`` leaves them)."""
    return next((r for r in rows if r["ms"] is not None and r["deterministic"] and r["accurate"]), None)


def tuned_entries(report: dict, problem) -> list[dict]:
    """One tuned-configuration entry per (dtype, precision) swept: the strategy group's winner
    (the default strategy if that group was not swept) and each tile group's winner where it
    beat the default; nothing that was not deterministic and accurate."""
    by_group = {(s["kernel"], s["dtype"], s["precision"]): s for s in summarize(report)}
    entries = []
    for dtype, precision in dict.fromkeys((s["dtype"], s["precision"]) for s in by_group.values()):
        strategy_group = by_group.get(("strategy", dtype, precision))
        measured = {"shape": [problem.batch, problem.n, problem.d, problem.m], "date": report["date"]}
        if strategy_group:
            winner = strict_best(strategy_group["rows"])
            if winner is None:
                print(f"no tuned entry for {dtype} {precision}: no strategy was deterministic and accurate")
                continue
            strategy = winner["config"]["strategy"]
            measured["strategy_ms"] = {r["config"]["strategy"]: r["ms"] for r in strategy_group["rows"]}
        else:
            strategy = report["defaults"].get(f"strategy {dtype} {precision}", {}).get("strategy", "fused")
        entry = {
            "dtype": dtype.split("+")[0], "prototype_dtype": dtype.split("+")[-1], "precision": precision,
            "batch": tuning.bucket(problem.batch), "n": tuning.bucket(problem.n),
            "m": tuning.bucket(problem.m), "d": tuning.bucket(problem.d), "strategy": strategy,
        }
        for kernel in ("forward", "backward", "coef_x"):
            group = by_group.get((kernel, dtype, precision))
            best = strict_best(group["rows"]) if group else None
            entry[kernel] = None if best is None or best["is_default"] else dict(best["config"])
            if best is not None:
                measured[f"{kernel}_ms"] = {"default": group["default"]["ms"] if group["default"] else None, "best": best["ms"]}
        entry["measured"] = measured
        entries.append(entry)
    return entries


def _command_output(command: list[str]) -> str | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=20, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_tuned_config(report: dict, problem, args: argparse.Namespace) -> dict:
    """Write (merge) --write-config's file; returns {"path", "entries"} for the report."""
    driver = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    commit = args.commit or _command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    produced_by = {
        "date": report["date"], "commit": commit or "unknown (set GSP_COMMIT)", "gpu": report["device"],
        "driver": driver.splitlines()[0] if driver else "unknown", "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "command": "bench/sweep_triton.py " + " ".join(report["argv"]),
    }
    entries = tuned_entries(report, problem)
    written = tuning.write(args.write_config, report["device"], triton.__version__, produced_by, entries)
    print(f"tuned configuration: {len(entries)} entries written to {written.path} ({len(written.entries)} in the file)")
    return {"path": str(written.path), "entries": entries}

