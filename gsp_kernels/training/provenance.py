"""Where a result came from: ``provenance(device)`` gives the package version, the git commit
of the checkout the code runs from (and whether its tracked files differ from it), the UTC
time, the versions of Python, torch, torchvision, timm, Triton and CUDA, the device and the
command line. ``gsp-kernels train`` and ``evaluate`` record it under "provenance" in
results.json and evaluation.json.
"""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from ..version import __version__

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # gsp_kernels/
GIT_TIMEOUT_S = 5.0


def _git(*args: str) -> str | None:
    """``git -C PACKAGE_DIR args`` stripped, or None when git is absent, fails or hangs."""
    try:
        done = subprocess.run(["git", "--no-optional-locks", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict:
    """{"git_commit": HEAD of the checkout holding this package (None when it runs from an
    installed copy or git is absent), "git_dirty": whether tracked files differ from it (None
    without a commit)}. A repository around an installed copy (a venv inside some project) is
    not the package's: its top folder must be the package's parent."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != PACKAGE_DIR.parent:
        return {"git_commit": None, "git_dirty": None}
    commit = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if changes is None else bool(changes)}


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def library_versions() -> dict:
    """{"python", "torch", "torchvision", "timm", "triton", "cuda" (torch's CUDA build, None for
    a CPU build)}: installed versions, None for a package that is not installed."""
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": _installed_version("torchvision"),
            "timm": _installed_version("timm"), "triton": _installed_version("triton"), "cuda": torch.version.cuda}


def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_description(device: torch.device | str) -> dict:
    """{"used": "cuda:0", "name": "NVIDIA H200"}: the device a run used and its model name."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        name = cpu_name()
    else:
        name = device.type
    return {"used": str(device), "name": name}


def command_line() -> str:
    """This process's command line as a shell would read it: ``sys.argv``, or the interpreter's
    whole line under ``python -m`` (whose ``sys.argv[0]`` is the package's __main__.py)."""
    return shlex.join(sys.orig_argv if Path(sys.argv[0]).name == "__main__.py" else sys.argv)


def provenance(device: torch.device | str, argv: list[str] | None = None) -> dict:
    """{"package_version", "git_commit", "git_dirty", "utc_time" (ISO 8601, now), "versions"
    (``library_versions``), "device" (``device_description``), "command_line" (``argv`` as a
    shell would read it, default ``command_line()``)}."""
    return {
        "package_version": __version__,
        **git_state(),
        "utc_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "device": device_description(device),
        "command_line": command_line() if argv is None else shlex.join(argv),
    }
