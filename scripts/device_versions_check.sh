#!/usr/bin/env bash
# The torch and Triton of the H200 runs (bench/results/*/env_build.log), on a CPU: a venv with
# them, the package built the way bench/device_check.sh builds it, the CPU test suite, and the
# sm_90 register table of every Triton kernel as that Triton builds it. Catches a version
# mismatch without a GPU. Downloads ~1.5 GB (the CUDA build of torch and its libraries, ~5 GB
# installed): not part of CI.
#   usage: scripts/device_versions_check.sh [VENV_DIR]      (default /tmp/gsp-device-versions)
#   TORCH_VERSION, TORCHVISION_VERSION, TRITON_VERSION: default those of the H200 runs, 2.11.0,
#   0.26.0 and 3.6.0. pytorch-metric-learning, which that environment lacks, is installed here so
#   that the whole suite runs (its tests skip there).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/gsp-device-versions}
torch_version=${TORCH_VERSION:-2.11.0}
torchvision_version=${TORCHVISION_VERSION:-0.26.0}
triton_version=${TRITON_VERSION:-3.6.0}

if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
# numpy < 2.3: Triton 3.6's interpreter calls int() on one-element arrays, which NumPy 2.3+ refuses.
# setuptools >= 77 for pyproject's SPDX license string (the H200 environment's is new enough).
# The pins hold for every install below (a constraints file): the test extra's unpinned
# torchvision would otherwise pull the newest torch over them.
pins="$venv/device-pins.txt"
printf '%s\n' "torch==$torch_version" "torchvision==$torchvision_version" "triton==$triton_version" "numpy<2.3" >"$pins"
"$venv/bin/python" -m pip install --quiet -c "$pins" torch torchvision triton numpy \
    "setuptools>=77,<82" pybind11 cmake ninja
# A copy of the committed tree: its native module is built against this torch, not .venv's.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git archive HEAD | tar -x -C "$work"
cd "$work"
"$venv/bin/python" -c "import torch, torchvision, triton; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'triton', triton.__version__)"
# The device's build (no build isolation: against the torch above); the test extra's other
# requirements from pyproject.toml (the pins, held again by -c, already satisfy torch, torchvision,
# triton and numpy).
"$venv/bin/python" -m pip install --quiet -c "$pins" --no-build-isolation -e ".[test]"
"$venv/bin/python" -m pytest python_tests -q -p no:cacheprovider -p no:warnings --timeout=900
cd python_tests
env -u TRITON_INTERPRET "$venv/bin/python" -c \
    "import test_triton; print('\n'.join(test_triton._compile_kernels_for_sm90()))"
