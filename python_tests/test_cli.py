"""The `gsp-kernels` command: check, info, bench --quick, and the training stubs."""

import json
import subprocess
import sys

import pytest
import torch

from gsp_kernels import cli
from gsp_kernels.backends import parse_spec as parse_backend_spec
from gsp_kernels.bench.candidates import PHASES
from gsp_kernels.bench.cost_model import cost_model
from gsp_kernels.check import Case, run_check
from gsp_kernels.testing import Shape

try:
    from gsp_kernels.backends import triton as _triton
    from gsp_kernels.backends.triton import launch as triton_launch
except ImportError:  # no Triton: the report says None
    _triton = None


def test_check_passes_for_the_reference():
    small = (
        Case(2, 13, 10, 5, gamma=5.0, transport_ratio=0.3, clustered=False),
        Case(2, 21, 17, 6, gamma=20.0, transport_ratio=0.7, clustered=True),
        Case(2, 9, 12, 4, gamma=2.0, transport_ratio=1.0, clustered=False),
    )
    rows = run_check(backends=["reference"], cases=small, device="cpu")
    assert {row.dtype for row in rows} == {"float64", "float32", "bfloat16", "float16"}
    assert all(row.status == "pass" for row in rows), [r for r in rows if r.status != "pass"]


@pytest.mark.skipif(_triton is None, reason="triton not installed")
def test_check_runs_each_triton_strategy():
    """Plain 'triton' is checked once per strategy (each really forced), 'triton:gemm' alone."""
    if _triton.availability(torch.device("cpu")) is not None:
        pytest.skip(_triton.availability(torch.device("cpu")))
    tiny = (Case(2, 7, 9, 3, gamma=5.0, transport_ratio=0.3, clustered=False),)
    seen = []
    original = _triton.strategy_for

    def spy(*args):
        seen.append(original(*args))
        return seen[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_triton, "strategy_for", spy)
        rows = run_check(backends=["triton"], dtypes=["float32"], cases=tiny, device="cpu")
    assert [(row.backend, row.precision) for row in rows] == [
        (f"triton:{strategy}", precision) for strategy in _triton.STRATEGIES for precision in ("ieee", "tf32")]
    assert all(row.status == "pass" for row in rows), [r for r in rows if r.status != "pass"]
    assert set(seen) == set(_triton.STRATEGIES)
    rows = run_check(backends=["triton:gemm"], dtypes=["float32"], cases=tiny, device="cpu")
    assert {row.backend for row in rows} == {"triton:gemm"}
    with pytest.raises(ValueError, match="only triton takes a strategy"):
        run_check(backends=["cuda:gemm"], cases=tiny, device="cpu")


def test_check_command_exit_code_and_json(tmp_path, capsys):
    out = tmp_path / "check.json"
    code = cli.main(["check", "--backends", "reference", "--dtypes", "float32,bfloat16", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["passed"] is True
    assert {"backend", "dtype", "precision", "case", "errors", "status", "tolerance"} <= set(report["rows"][0])
    assert "passed, 0 failed" in capsys.readouterr().out


def test_info_lists_backends(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for name in ("reference", "triton", "cuda", "build_info", "torch"):
        assert name in text


def test_bench_quick_json_fields(tmp_path):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--quick", "--backends", "reference", "--shapes", "4x9x16x5", "--repeats", "2", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert {"device", "torch", "timer", "peaks", "rows", "overhead", "params"} <= set(report)
    assert report["triton_split_samples"] is (triton_launch.SPLIT_SAMPLES if _triton else None)
    names = {row["name"] for row in report["rows"]}
    assert {"reference", "paper"} <= names
    for row in report["rows"]:
        assert {"shape", "dtype", "ms", "speedup_vs_paper", "peak_memory_mb", "tflops", "gbps", "floor_ms"} <= set(row)
        assert all(row["ms"][phase] > 0 for phase in PHASES)
    paper = next(row for row in report["rows"] if row["name"] == "paper")
    assert paper["speedup_vs_paper"]["fwd_bwd"] == pytest.approx(1.0)
    assert report["overhead"][0]["backend"] in names
    assert report["overhead"][0]["gsp_pool_us"] > 0
    assert report["overhead"][0]["gsp_pool_fwd_bwd_us"] > report["overhead"][0]["gsp_pool_us"]


def test_bench_backend_with_precision(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--quick", "--backends", "reference,reference@ieee", "--baselines", "", "--shapes", "3x5x7x2",
            "--variants", "plain"]
    assert cli.main([*args, "--repeats", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["name"] for row in report["rows"]] == ["reference", "reference@ieee"]
    # host issue time and CUDA-graph replay: GPU only
    assert all(row["ms"]["fwd_bwd"] > 0 and row["host_ms"] is None for row in report["rows"])
    assert all(set(row["graph_ms"]) == {"fwd", "fwd_bwd"} and not any(row["graph_ms"].values()) for row in report["rows"])
    assert [o["backend"] for o in report["overhead"]] == ["reference"]  # one overhead row per backend


def test_bench_times_masked_and_learned_calls_beside_the_plain_one(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--quick", "--backends", "reference", "--baselines", "", "--shapes", "4x6x8x3", "--repeats", "2"]
    assert cli.main([*args, "--json", str(out)]) == 0
    assert "x plain f+b" in capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["reference", "reference masked", "reference learned"]
    assert [rows[name]["variant"] for name in rows] == ["plain", "masked", "learned"]
    assert rows["reference"]["vs_plain"]["fwd_bwd"] == pytest.approx(1.0)
    assert all(rows[name]["vs_plain"]["fwd_bwd"] > 0 for name in rows)
    assert report["params"]["variants"] == ["plain", "masked", "learned"]


@pytest.mark.skipif(_triton is None, reason="triton not installed")
def test_bench_strategy_rows_force_their_strategy(monkeypatch):
    """A triton:gemm candidate runs the gemm strategy in every phase, triton:fused never."""
    if _triton.availability(torch.device("cpu")) is not None:
        pytest.skip(_triton.availability(torch.device("cpu")))
    from gsp_kernels.backends.triton import gemm as _triton_gemm
    from gsp_kernels.bench.candidates import build_candidates, make_input_sets

    calls = []
    for name in ("forward", "backward"):
        original = getattr(_triton_gemm, name)
        monkeypatch.setattr(_triton_gemm, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    inputs = make_input_sets(Shape(2, 5, 16, 3), torch.float32, torch.device("cpu"))
    (fused, gemm), failed = build_candidates(["triton:fused", "triton:gemm"], [], inputs, newton_iterations=5)
    assert failed == [] and (fused.name, gemm.name) == ("triton:fused", "triton:gemm")
    for phase in PHASES:
        getattr(fused, phase)(0)
    assert calls == []
    for phase in PHASES:
        calls.clear()
        getattr(gemm, phase)(0)
        # bwd's first call also builds the graph it keeps (its forward): under the strategy too
        expected = {"fwd": ["forward"], "bwd": ["forward", "backward"], "fwd_bwd": ["forward", "backward"]}[phase]
        assert calls == expected, phase
    calls.clear()
    gemm.bwd(0)  # the retained graph: the backward alone
    assert calls == ["backward"]


def test_backend_spec_parsing():
    assert parse_backend_spec("cuda") == ("cuda", None, "auto")
    assert parse_backend_spec("triton@tf32x3") == ("triton", None, "tf32x3")
    assert parse_backend_spec("triton:gemm") == ("triton", "gemm", "auto")
    assert parse_backend_spec("triton:fused@ieee") == ("triton", "fused", "ieee")
    with pytest.raises(ValueError, match="precision"):
        parse_backend_spec("cuda@fast")
    with pytest.raises(ValueError, match="only triton takes a strategy"):
        parse_backend_spec("cuda:gemm")
    with pytest.raises(ValueError, match="only triton takes a strategy"):
        parse_backend_spec("triton:cublas")


def test_cost_model_matches_spec():
    model = cost_model(Shape(64, 49, 512, 64), torch.float32)
    assert model["flops"]["fwd"] == 2 * 64 * 49 * 64 * 512
    assert model["flops"]["bwd"] == 3 * model["flops"]["fwd"]
    assert model["bytes"]["fwd"] == 64 * 49 * 512 * 4


def test_shape_parsing():
    assert Shape.parse("64x49x512x64") == Shape(64, 49, 512, 64)
    with pytest.raises(ValueError):
        Shape.parse("64x49x512")


BAD_ARGUMENTS = [
    (["bench", "--shapes", "4x9x16"], "--shapes: shape must be BxNxDxM"),
    (["bench", "--shapes", "axbxcxd"], "--shapes: shape must be BxNxDxM"),
    (["bench", "--backends", "reference,nope"], "--backends: unknown backend(s) 'nope'"),
    (["bench", "--backends", "cuda@fast"], "--backends: precision in backend spec 'cuda@fast'"),
    (["bench", "--dtypes", "float8"], "--dtypes: unknown dtype(s) 'float8'"),
    (["bench", "--baselines", "paper,foo"], "--baselines: unknown baseline(s) 'foo'"),
    (["bench", "--repeats", "0"], "--repeats: expected a positive integer"),
    (["bench", "--peak-tflops", "67,0"], "--peak-tflops: expected FP32"),
    (["check", "--backends", "tpu"], "--backends: unknown backend(s) 'tpu'"),
    (["check", "--dtypes", "float32,int8"], "--dtypes: unknown dtype(s) 'int8'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    """A bad value ends in argparse's usage error (exit 2, the option named), before any work."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_training_subcommands_are_registered():
    parser = cli.build_parser()
    for name in ("train", "demo"):
        args = parser.parse_args([name])
        assert callable(args.func)


@pytest.mark.slow
def test_python_dash_m_runs_info():
    result = subprocess.run([sys.executable, "-m", "gsp_kernels", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "backends on" in result.stdout


@pytest.mark.slow
def test_bench_compile_baseline_runs(tmp_path):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--backends", "reference", "--shapes", "2x5x8x3", "--baselines", "compile", "--repeats", "2",
                     "--newton-iterations", "4", "--json", str(out)])
    assert code == 0
    row = next(r for r in json.loads(out.read_text())["rows"] if r["name"] == "compiled-reference")
    assert row["ms"]["fwd_bwd"] is not None, row["note"]
