"""Register, shared-memory and spill budget of every CUDA kernel, from the ptxas report.

Configures and builds `_C` in a temporary directory from the same CMakeLists.txt (so the
flags are the real ones) with -DGSP_PTXAS_VERBOSE=ON, parses the per-kernel report and fails
on any spill or stack frame, or on registers / shared memory above csrc/ptxas_baseline.json
plus a small margin. Needs nvcc, not a GPU; skipped where nvcc is absent.
Re-record the baseline with GSP_PTXAS_WRITE_BASELINE=1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "csrc" / "ptxas_baseline.json"


def _load_setup_module():
    """setup.py as a module (its setup() call only runs as __main__): one nvcc lookup for both."""
    spec = importlib.util.spec_from_file_location("gsp_kernels_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


find_nvcc = _load_setup_module().find_nvcc

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USAGE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_report(text: str) -> dict[str, dict[str, int]]:
    """{kernel (mangled name @ arch): {registers, smem_bytes, stack_frame, spill_stores, spill_loads}}."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        if match := _ENTRY.search(line):
            current = f"{match.group(1)}@{match.group(2)}"
            kernels[current] = {"registers": 0, "smem_bytes": 0, "stack_frame": 0, "spill_stores": 0, "spill_loads": 0}
        elif current and (match := _FRAME.search(line)):
            frame, stores, loads = map(int, match.groups())
            kernels[current].update(stack_frame=frame, spill_stores=stores, spill_loads=loads)
        elif current and (match := _USAGE.search(line)):
            kernels[current]["registers"] = int(match.group(1))
            kernels[current]["smem_bytes"] = int(match.group(2) or 0)
    return kernels


def test_parse_ptxas_report():
    sample = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 8704 bytes smem, 400 bytes cmem[0]"""
    assert parse_ptxas_report(sample) == {
        "_Z1kv@sm_90": {"registers": 40, "smem_bytes": 8704, "stack_frame": 8, "spill_stores": 4, "spill_loads": 4}
    }


def _build_report(tmp_path: Path, nvcc: str) -> str:
    import pybind11

    build = tmp_path / "build"
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
        "-DGSP_WITH_CUDA=ON", "-DGSP_PTXAS_VERBOSE=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
        f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build / 'lib'}",
    ]
    subprocess.run(configure, check=True, capture_output=True, text=True, timeout=300)
    done = subprocess.run(
        ["cmake", "--build", str(build), "--parallel"], capture_output=True, text=True, timeout=600
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"build failed:\n{output[-6000:]}"
    return output


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found (GSP_NO_CUDA=1 or no CUDA toolkit)")
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ninja") is None, reason="needs cmake and ninja")
def test_kernels_within_ptxas_budget(tmp_path):
    report = parse_ptxas_report(_build_report(tmp_path, find_nvcc()))
    assert report, "no ptxas report found in the build output"
    if os.environ.get("GSP_PTXAS_WRITE_BASELINE") == "1":
        baseline = {"margin": {"registers": 8, "smem_bytes": 256}, "kernels": {}}
        for name, usage in sorted(report.items()):
            baseline["kernels"][name] = {k: usage[k] for k in ("registers", "smem_bytes", "stack_frame")}
        BASELINE.write_text(json.dumps(baseline, indent=2) + "\n")
    baseline = json.loads(BASELINE.read_text())
    margin, recorded = baseline["margin"], baseline["kernels"]
    problems = []
    for name, usage in sorted(report.items()):
        if usage["spill_stores"] or usage["spill_loads"]:
            problems.append(f"{name}: spills {usage['spill_stores']} B stores / {usage['spill_loads']} B loads")
        if name not in recorded:
            problems.append(f"{name}: not in {BASELINE.name} (re-record with GSP_PTXAS_WRITE_BASELINE=1)")
            continue
        base = recorded[name]
        if usage["stack_frame"] > base["stack_frame"]:
            problems.append(f"{name}: stack frame {usage['stack_frame']} B > baseline {base['stack_frame']} B")
        for key in ("registers", "smem_bytes"):
            if usage[key] > base[key] + margin[key]:
                problems.append(f"{name}: {key} {usage[key]} > baseline {base[key]} + {margin[key]}")
    problems += [f"{name}: in the baseline but not built" for name in recorded if name not in report]
    assert not problems, "\n".join(problems)
