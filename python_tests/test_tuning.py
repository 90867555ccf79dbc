"""Per-device tuned configurations (gsp_kernels.backends.triton.tuning): file format, validation, merge, lookup
rules, the environment override, and `gsp-kernels info`."""

from __future__ import annotations

import json

import pytest
import torch

from gsp_kernels.backends.triton import tuning

PRODUCED = {"date": "2026-12-01", "commit": "abc1234", "gpu": "NVIDIA H200", "driver": "570.1", "torch": "2.11.0",
            "triton": "3.6.0", "cuda": "13.0", "command": "bench/sweep_triton.py"}
FORWARD_TILES = {"BLOCK_N": 32, "BLOCK_M": 16, "BLOCK_D": 16, "num_warps": 2, "num_stages": 1}


def entry(dtype="float32", prototype_dtype=None, precision="auto", batch=256, n=256, m=128, d=512, strategy="fused", **kernels):
    return {"dtype": dtype, "prototype_dtype": prototype_dtype or dtype, "precision": precision, "batch": batch, "n": n,
            "m": m, "d": d, "strategy": strategy, "forward": kernels.get("forward"), "backward": kernels.get("backward"),
            "coef_x": kernels.get("coef_x"), "measured": {"shape": [batch, n, d, m]}}


@pytest.fixture
def clean_cache(monkeypatch):
    monkeypatch.delenv(tuning.ENV_VAR, raising=False)
    tuning.clear_cache()
    yield monkeypatch
    tuning.clear_cache()


def test_buckets_and_file_names():
    assert [tuning.bucket(v) for v in (1, 2, 3, 49, 64, 65, 196)] == [1, 2, 4, 64, 64, 128, 256]
    assert tuning.config_filename("NVIDIA H200", "3.6.0") == "NVIDIA_H200__triton-3.6.json"
    assert tuning.config_filename("NVIDIA H100 80GB HBM3", "3.8.0+git1234") == "NVIDIA_H100_80GB_HBM3__triton-3.8.json"


def test_write_load_round_trip_and_merge(tmp_path):
    first = tuning.write(tmp_path, "NVIDIA H200", "3.6.0", PRODUCED,
                         [entry(strategy="gemm"), entry("bfloat16", batch=64, n=64, m=64, forward=FORWARD_TILES)])
    path = tmp_path / "NVIDIA_H200__triton-3.6.json"
    assert first.path == path and path.is_file()
    loaded = tuning.load(path)
    assert loaded == first and loaded.triton == "3.6" and loaded.produced_by == PRODUCED
    assert {e["strategy"] for e in loaded.entries} == {"gemm", "fused"}
    # A second run replaces the entry with the same key and keeps the other one.
    second = tuning.write(path, "NVIDIA H200", "3.6.1", PRODUCED, [entry(strategy="fused")])
    assert len(second.entries) == 2
    assert [e["strategy"] for e in second.entries if e["dtype"] == "float32"] == ["fused"]
    with pytest.raises(ValueError, match="NVIDIA H100.*another file"):
        tuning.write(path, "NVIDIA H100", "3.6.0", PRODUCED, [entry()])


def test_write_to_a_folder_named_with_a_trailing_separator(tmp_path):
    """A folder that does not exist yet, named as one ("out/"), gets the standard file name
    rather than becoming a file called "out"."""
    written = tuning.write(f"{tmp_path / 'new_folder'}/", "NVIDIA H200", "3.6.0", PRODUCED, [entry()])
    assert written.path == tmp_path / "new_folder" / "NVIDIA_H200__triton-3.6.json" and written.path.is_file()
    named = tuning.write(tmp_path / "named.json", "NVIDIA H200", "3.6.0", PRODUCED, [entry()])
    assert named.path == tmp_path / "named.json" and named.path.is_file()


@pytest.mark.parametrize("bad, message", [
    ({"strategy": "cublas"}, "strategy must be one of"),
    ({"n": 196}, "n must be a power of two"),
    ({"dtype": "float64"}, "dtype must be one of"),
    ({"forward": {"BLOCK_N": 64}}, "forward must be null or an object with exactly"),
    ({"coef_x": {**dict.fromkeys(tuning.GEMM_KEYS, 16), "num_warps": 0}}, "coef_x values must be positive"),
])
def test_malformed_entries_are_refused_naming_the_file(tmp_path, bad, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"schema": 1, "device_name": "X", "triton": "3.6", "entries": [{**entry(), **bad}]}))
    with pytest.raises(ValueError, match=message) as info:
        tuning.load(path)
    assert str(path) in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tuning.load(tmp_path / "missing.json")
    (tmp_path / "text.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        tuning.load(tmp_path / "text.json")
    (tmp_path / "old.json").write_text(json.dumps({"schema": 0, "entries": []}))
    with pytest.raises(ValueError, match="schema 1"):
        tuning.load(tmp_path / "old.json")


def test_lookup_rules(tmp_path):
    config = tuning.write(tmp_path, "GPU", "3.8.0", PRODUCED, [
        entry("float32", precision="auto", batch=256, strategy="gemm"),
        entry("float32", precision="auto", batch=64, strategy="fused"),
        entry("float32", precision="ieee", batch=256, strategy="fused"),
        entry("bfloat16", precision="auto", batch=256, strategy="gemm"),
        entry("bfloat16", "float32", precision="auto", batch=256, strategy="fused"),
    ])
    find = lambda *args: (config.lookup(*args) or {}).get("strategy")  # noqa: E731
    assert find("float32", "float32", "auto", 256, 196, 128, 512) == "gemm"
    assert find("float32", "float32", "auto", 300, 129 + 100, 100, 300) == "gemm"  # same buckets
    assert find("float32", "float32", "auto", 64, 196, 128, 512) == "fused"  # nearest batch bucket
    assert find("float32", "float32", "auto", 8, 196, 128, 512) == "fused"
    assert config.lookup("float32", "float32", "auto", 128, 196, 128, 512)["batch"] == 256  # a tie: the larger
    assert find("float32", "float32", "ieee", 256, 196, 128, 512) == "fused"
    assert find("float32", "float32", "tf32", 256, 196, 128, 512) is None  # no entry for that precision
    assert find("bfloat16", "bfloat16", "ieee", 256, 196, 128, 512) == "gemm"  # precision ignored: exact half products
    assert find("bfloat16", "float32", "auto", 256, 196, 128, 512) == "fused"  # autocast's mixed dtypes: own entry
    assert find("bfloat16", "float32", "ieee", 256, 196, 128, 512) is None  # mixed dtypes use the precision
    assert find("float32", "float32", "auto", 256, 49, 128, 512) is None  # another N bucket
    assert find("float16", "float16", "auto", 256, 196, 128, 512) is None


def test_environment_override_and_describe(tmp_path, clean_cache):
    cpu = torch.device("cpu")
    assert tuning.active(cpu) is None
    assert "not a CUDA device" in tuning.describe(cpu)
    path = tuning.write(tmp_path, "NVIDIA H200", "3.6.0", PRODUCED, [entry(n=16, m=8, d=32, batch=2, strategy="gemm")]).path
    clean_cache.setenv(tuning.ENV_VAR, str(path))
    tuning.clear_cache()
    assert tuning.active(cpu).path == path
    assert tuning.lookup(cpu, torch.float32, torch.float32, "auto", 2, 9, 7, 20)["strategy"] == "gemm"
    text = tuning.describe(cpu)
    assert str(path) in text and "abc1234" in text and tuning.ENV_VAR in text
    clean_cache.setenv(tuning.ENV_VAR, "none")
    tuning.clear_cache()
    assert tuning.active(cpu) is None and tuning.lookup(cpu, torch.float32, torch.float32, "auto", 2, 9, 7, 20) is None
    clean_cache.setenv(tuning.ENV_VAR, str(tmp_path / "missing.json"))
    tuning.clear_cache()
    assert "does not exist" in tuning.describe(cpu)


def test_shipped_files_are_valid():
    """Every file shipped in the package loads, and is named for the GPU and Triton it records."""
    for path in tuning.TUNED_CONFIG_DIR.glob("*.json"):
        config = tuning.load(path)
        assert path.name == tuning.config_filename(config.device_name, config.triton), path
        for key in ("date", "commit", "gpu", "driver", "torch", "triton"):
            assert config.produced_by.get(key), (path, key)


def test_info_names_the_file_in_force(tmp_path, clean_cache, capsys):
    from gsp_kernels import cli

    assert cli.main(["info"]) == 0
    assert "triton tuned configuration: none" in capsys.readouterr().out
    path = tuning.write(tmp_path, "NVIDIA H200", "3.6.0", PRODUCED, [entry()]).path
    clean_cache.setenv(tuning.ENV_VAR, str(path))
    tuning.clear_cache()
    assert cli.main(["info", "--json", str(tmp_path / "info.json")]) == 0
    assert str(path) in json.loads((tmp_path / "info.json").read_text())["triton_tuned_config"]


def test_tuned_entry_reaches_the_triton_kernels(tmp_path, clean_cache):
    """A forced file's strategy and tiles are what the backend launches (and stays exact)."""
    _triton = pytest.importorskip("gsp_kernels.backends.triton")
    if _triton.availability(torch.device("cpu")) is not None:
        pytest.skip(_triton.availability(torch.device("cpu")))

    from gsp_kernels import gsp_pool
    from gsp_kernels.backends import reference as _reference
    from gsp_kernels.backends.triton import fused as triton_fused
    from gsp_kernels.backends.triton import kernels as triton_kernels
    from gsp_kernels.testing import rel_err

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 20, 24, generator=generator)  # buckets: batch 2, n 32, d 32
    z = torch.randn(9, 24, generator=generator)  # m 16
    grads = (torch.randn(2, 24, generator=generator), torch.randn(2, 9, generator=generator))
    small = {"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_D": 16, "num_warps": 2, "num_stages": 1}
    gemm = {"BLOCK_K": 16, "BLOCK_M": 16, "BLOCK_D": 16, "num_warps": 2, "num_stages": 1, "programs_wanted": 8}
    launches = {}

    def run_and_record(monkeypatch):
        launches.clear()
        for name in ("_gsp_forward_kernel", "_gsp_backward_kernel", "_gsp_coef_x_kernel"):
            kernel = getattr(triton_kernels, name)
            original = kernel.run

            def run(*args, _name=name, _original=original, **kwargs):
                launches[_name] = kwargs
                return _original(*args, **kwargs)

            monkeypatch.setattr(kernel, "run", run)
        xg, zg = x.clone().requires_grad_(), z.clone().requires_grad_()
        pooled, attr = gsp_pool(xg, zg, backend="triton")
        torch.autograd.backward((pooled, attr), grads)
        return pooled, attr, xg.grad, zg.grad

    default = triton_fused.tile_config(32, 16, 32, False, False)
    run_and_record(clean_cache)
    assert launches["_gsp_forward_kernel"]["BLOCK_N"] == default["BLOCK_N"] == 32

    path = tuning.write(tmp_path, "any", "3.8", PRODUCED, [
        entry("float32", batch=2, n=32, m=16, d=32, strategy="fused", forward=small, backward=small, coef_x=gemm)]).path
    clean_cache.setenv(tuning.ENV_VAR, str(path))
    tuning.clear_cache()
    outputs = run_and_record(clean_cache)
    for name in ("_gsp_forward_kernel", "_gsp_backward_kernel"):
        assert {k: launches[name][k] for k in small} == small, name
    assert {k: launches["_gsp_coef_x_kernel"][k] for k in ("BLOCK_K", "BLOCK_M", "BLOCK_D")} == {
        "BLOCK_K": 16, "BLOCK_M": 16, "BLOCK_D": 16}
    x64, z64 = x.double().requires_grad_(), z.double().requires_grad_()
    pooled, attr, _, u = _reference.gsp_forward(x64, z64, 0.3, 5.0)
    expected = (pooled, attr, *_reference.gsp_backward(
        grads[0].double(), grads[1].double(), torch.zeros(2, 20, dtype=torch.float64), x64, z64, u, 0.3, 5.0))
    for out, ref in zip(outputs, expected):
        assert rel_err(out, ref) < 1e-5

    # An entry that asks for the gemm strategy sends both directions there; its tiles are the
    # fused kernels' and stay out of the gemm strategy's launches (its own table applies).
    tuning.write(path, "any", "3.8", PRODUCED, [
        entry("float32", batch=2, n=32, m=16, d=32, strategy="gemm", forward=small, backward=small)])
    tuning.clear_cache()
    run_and_record(clean_cache)
    assert _triton.strategy_for(x, z) == "gemm"
    assert set(launches) == {"_gsp_forward_kernel", "_gsp_backward_kernel"}  # products from torch, no split-K GEMM
    from gsp_kernels.backends.triton import gemm as _triton_gemm

    for name, backward in (("_gsp_forward_kernel", False), ("_gsp_backward_kernel", True)):
        own = _triton_gemm.launch_config(20, 9, 24, False, backward=backward)
        assert {k: launches[name][k] for k in small} == {k: own[k] for k in small} != small, name
