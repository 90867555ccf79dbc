"""bench/sweep_triton.py in smoke mode (on the CPU through the Triton interpreter; conftest sets
TRITON_INTERPRET=1 when there is no GPU): every config gives a deterministic, accurate row."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from gsp_kernels.backends import triton as _triton
from gsp_kernels.backends.triton import fused as triton_fused
from gsp_kernels.backends.triton import launch as triton_launch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "sweep_triton.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep_triton", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_smoke_sweep(sweep, tmp_path):
    device = torch.device("cuda" if torch.cuda.is_available() and not triton_launch.INTERPRETED else "cpu")
    if _triton.availability(device) is not None:
        pytest.skip(_triton.availability(device))
    out = tmp_path / "sweep.json"
    returned = sweep.main(["--smoke", "--json", str(out)])
    assert triton_launch.BLOCK_OVERRIDE is None and triton_fused.GEMM_OVERRIDE is None, "the sweep must reset the overrides"

    report = json.loads(out.read_text())
    assert report["rows"] == json.loads(json.dumps(returned["rows"]))  # the file is the final report
    for key in ("device", "torch", "triton", "date", "shape"):
        assert report[key], key
    assert report["shape"] == {"B": 2, "N": 9, "D": 20, "M": 7}
    assert not report["budget_reached"] and report["not_run"] == []

    problem = sweep.Problem(2, 9, 20, 7, 5.0, 0.3, "lipschitz", "euclidean", "newton")
    # The GEMM's second smoke config splits the 18 features in two and D=20 in two tiles.
    gemm = sweep.smoke_configs(problem, "coef_x")[1]
    assert triton_fused.split_k_config(18, 7, 20, gemm["programs_wanted"], gemm["BLOCK_K"], gemm["BLOCK_M"],
                                   gemm["BLOCK_D"])[4] == 2 and gemm["BLOCK_D"] == 16
    for kernel in sweep.KERNELS:
        expected = sweep.smoke_configs(problem, kernel)
        assert len(expected) == 2 and expected[0] != expected[1]
        rows = [r for r in report["rows"] if r["kernel"] == kernel]
        assert sorted(sweep.config_key(r["config"]) for r in rows) == sorted(sweep.config_key(c) for c in expected)
        default = sweep.default_config(problem, kernel, "float32")
        assert [r["config"] for r in rows if r["is_default"]] == [default]
        assert report["defaults"][f"{kernel} float32 auto"] == default
        outputs = {"forward": sweep.FORWARD_OUTPUTS, "strategy": sweep.FORWARD_OUTPUTS + sweep.BACKWARD_OUTPUTS}.get(
            kernel, sweep.BACKWARD_OUTPUTS)
        for row in rows:
            what = f"{kernel} {sweep.config_key(row['config'])}"
            assert row["error"] is None, what
            assert (row["dtype"], row["precision"]) == ("float32", "auto"), what
            assert row["deterministic"] is True and row["det_runs"] >= 2, what
            assert set(row["rel_err"]) == set(outputs), what
            assert all(0.0 <= err < 1e-5 for err in row["rel_err"].values()), (what, row["rel_err"])
            assert row["accurate"] is True and row["ms"] > 0, what

    # Each kernel's summary names a best config and a speedup measured against the default.
    summary = {(s["kernel"], s["dtype"], s["precision"]): s for s in report["summary"]}
    assert set(summary) == {(kernel, "float32", "auto") for kernel in sweep.KERNELS}
    assert {r["config"]["strategy"] for r in report["rows"] if r["kernel"] == "strategy"} == set(_triton.STRATEGIES)
    for s in summary.values():
        assert s["best"] is not None and s["speedup_over_default"] > 0
        assert s["default_ms"] > 0 and s["best_ms"] <= s["default_ms"]


def test_write_config(sweep, tmp_path, monkeypatch):
    """--write-config: per dtype the fastest deterministic and accurate strategy and tiles, in a
    file that the backend then follows; the sweep itself measures against the built-in rules."""
    from gsp_kernels.backends.triton import tuning

    device = torch.device("cuda" if torch.cuda.is_available() and not triton_launch.INTERPRETED else "cpu")
    if _triton.availability(device) is not None:
        pytest.skip(_triton.availability(device))
    monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path / "ignored-while-sweeping.json"))  # would fail if loaded
    report = sweep.main(["--smoke", "--kernels", "strategy,forward", "--dtypes", "float32,bfloat16+float32",
                         "--write-config", str(tmp_path), "--commit", "feed123"])
    assert report["tuned_config"]["path"].startswith(str(tmp_path))
    assert tuning.os.environ[tuning.ENV_VAR].endswith("ignored-while-sweeping.json"), "the sweep restores the variable"
    written = tuning.load(report["tuned_config"]["path"])
    assert written.produced_by["commit"] == "feed123" and written.produced_by["triton"]
    entries = {(e["dtype"], e["prototype_dtype"]): e for e in written.entries}
    assert set(entries) == {("float32", "float32"), ("bfloat16", "float32")}  # the second: the layer under autocast
    assert entries["bfloat16", "float32"]["strategy"] in _triton.STRATEGIES
    entry = entries["float32", "float32"]
    assert (entry["dtype"], entry["precision"], entry["batch"], entry["n"], entry["m"], entry["d"]) == ("float32", "auto", 2, 16, 8, 32)
    rows = {(r["kernel"], sweep.config_key(r["config"])): r for r in report["rows"] if r["dtype"] == "float32"}
    winner = rows["strategy", entry["strategy"]]
    assert winner["deterministic"] and winner["accurate"]
    assert winner["ms"] == min(r["ms"] for (kernel, _), r in rows.items() if kernel == "strategy")
    assert entry["backward"] is None and entry["coef_x"] is None  # not swept: built-in rules
    if entry["forward"] is not None:
        assert rows["forward", sweep.config_key(entry["forward"])]["accurate"]
    assert set(entry["measured"]["strategy_ms"]) == set(_triton.STRATEGIES)

    # The backend follows the file: its strategy for that bucket, the built-in one elsewhere.
    monkeypatch.setenv(tuning.ENV_VAR, str(written.path))
    tuning.clear_cache()
    try:
        x, z = torch.zeros(2, 9, 20), torch.zeros(7, 20)
        assert _triton.strategy_for(x, z) == entry["strategy"]
        assert _triton.tuned_entry(x.bfloat16(), z) == entries["bfloat16", "float32"]
        assert _triton.strategy_for(torch.zeros(2, 40, 20), z) == "fused"
        with _triton.use_strategy("gemm" if entry["strategy"] == "fused" else "fused") as forced:
            assert _triton.strategy_for(x, z) == forced
    finally:
        tuning.clear_cache()
