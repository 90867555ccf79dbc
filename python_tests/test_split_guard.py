"""bench/split_guard.py on the CPU through the Triton interpreter: it passes on the kernels as
they are, and fails when the split samples lose a feature or results move between repeats."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from gsp_kernels.backends import triton as _triton
from gsp_kernels.backends.triton import launch as triton_launch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "split_guard.py"
# Two tiles per sample (BLOCK_N = 64), and the one-feature corner.
ARGS = ["--device", "cpu", "--shapes", "2x70x8x5,1x1x1x1", "--repeats", "2"]


@pytest.fixture
def guard():
    if _triton.availability(torch.device("cpu")) is not None:
        pytest.skip(_triton.availability(torch.device("cpu")))
    spec = importlib.util.spec_from_file_location("split_guard", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_passes_on_the_kernels(guard, capsys):
    guard.main(ARGS)
    assert "SPLIT_GUARD_OK" in capsys.readouterr().out
    assert triton_launch.SPLIT_SAMPLES, "the guard must leave the split on"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the unwritten scratch
def test_fails_when_a_split_program_drops_a_feature(guard, monkeypatch, capsys):
    sample_tiles = triton_launch.sample_tiles

    def short_tiles(n, block_n):  # one feature fewer per program, only when split
        tiles, per_tile = sample_tiles(n, block_n)
        return (tiles, per_tile - 1) if triton_launch.SPLIT_SAMPLES and tiles > 1 else (tiles, per_tile)

    monkeypatch.setattr(triton_launch, "sample_tiles", short_tiles)
    with pytest.raises(SystemExit) as exit_info:
        guard.main(ARGS)
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "SPLIT_GUARD_FAILED" in out and "2x70x8x5 float32: pooled" in out
    assert "1x1x1x1 float32: ok" in out  # one tile: nothing to drop


def test_fails_when_repeats_move(guard, monkeypatch, capsys):
    forward_backward = guard.forward_backward
    calls = []

    def drifting(x, prototypes, cotangents):
        results = forward_backward(x, prototypes, cotangents)
        calls.append(None)
        if len(calls) == 2:  # the first repeat of the first case
            results[3] = results[3] + torch.finfo(results[3].dtype).eps * results[3].abs().max()
        return results

    monkeypatch.setattr(guard, "forward_backward", drifting)
    with pytest.raises(SystemExit):
        guard.main(ARGS)
    assert "2x70x8x5 float32: repeat 1 moved grad_x" in capsys.readouterr().out


@pytest.mark.parametrize("value, expected", [("0", False), ("1", True)])
def test_environment_turns_the_split_off(value, expected):
    code = "from gsp_kernels.backends.triton import launch; print(launch.SPLIT_SAMPLES)"
    env = {**os.environ, "GSP_TRITON_SPLIT": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(expected)
