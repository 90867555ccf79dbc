"""Provenance: results.json and evaluation.json record the package version, the git commit of
the checkout the code runs from, the UTC time, the library versions, the device and the command
line."""

import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

import gsp_kernels
from gsp_kernels.training import provenance as provenance_module
from gsp_kernels.training.provenance import provenance

REPOSITORY = Path(gsp_kernels.__file__).resolve().parents[1]


def _checkout_head() -> str | None:
    if shutil.which("git") is None:
        return None
    done = subprocess.run(["git", "-C", str(REPOSITORY), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def test_the_record_has_every_key_with_plausible_values():
    record = provenance("cpu", ["gsp-kernels", "train", "--lr", "0.5 x"])
    assert set(record) == {"package_version", "git_commit", "git_dirty", "utc_time", "versions", "device", "command_line"}
    assert record["package_version"] == gsp_kernels.__version__
    started = datetime.fromisoformat(record["utc_time"])
    assert started.utcoffset().total_seconds() == 0 and abs((datetime.now(timezone.utc) - started).total_seconds()) < 60
    versions = record["versions"]
    assert set(versions) == {"python", "torch", "torchvision", "timm", "triton", "cuda"}
    assert versions["torch"] == torch.__version__ and versions["cuda"] == torch.version.cuda
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert record["device"]["used"] == "cpu" and record["device"]["name"]
    assert record["command_line"] == "gsp-kernels train --lr '0.5 x'"


def test_the_commit_is_the_checkouts():
    head = _checkout_head()
    if head is None:
        pytest.skip("the package does not run from a git checkout here")
    record = provenance("cpu")
    assert record["git_commit"] == head and isinstance(record["git_dirty"], bool)


def test_no_commit_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance_module, "PACKAGE_DIR", tmp_path / "gsp_kernels")
    (tmp_path / "gsp_kernels").mkdir()
    assert provenance_module.git_state() == {"git_commit": None, "git_dirty": None}
    monkeypatch.setattr(provenance_module, "PACKAGE_DIR", REPOSITORY / "gsp_kernels")

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert provenance_module.git_state() == {"git_commit": None, "git_dirty": None}


@pytest.mark.usefixtures("single_thread")
def test_results_and_evaluation_record_it(tmp_path, capsys):
    pytest.importorskip("pytorch_metric_learning")
    from gsp_kernels import cli

    out = tmp_path / "run"
    tiny = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "20", "--collages-per-digit", "1", "--width", "4",
            "--embedding-dim", "8", "--num-prototypes", "4", "--class-embedding-dim", "4", "--no-progress"]
    assert cli.main(["train", *tiny, "--output-dir", str(out), "--device", "cpu"]) == 0
    assert cli.main(["evaluate", "--checkpoint", str(out), "--output-dir", str(out / "eval")]) == 0
    capsys.readouterr()
    for path in (out / "results.json", out / "eval" / "evaluation.json"):
        record = json.loads(path.read_text())["provenance"]
        assert record["package_version"] == gsp_kernels.__version__ and record["device"]["used"] == "cpu"
        assert record["versions"]["torch"] == torch.__version__ and record["command_line"]
        assert record["git_commit"] == _checkout_head()
