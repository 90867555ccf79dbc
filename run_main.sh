#!/usr/bin/env bash
# The main job: check every backend that runs here against the float64 reference, then the demo
# (GAP vs GSP metric learning on the embedded collage data: Recall@1, MAP@R and a PNG of the
# weight maps; a few minutes on a CPU). Creates .venv if missing and installs torch==2.13.0
# (the CPU wheel on disk here) and the package; re-running skips the install unless the build
# inputs changed. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")"

EXTRAS="train"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
stamp_file=".venv/.gsp-installed-$EXTRAS"
stamp="$({ find pyproject.toml setup.py CMakeLists.txt csrc -type f 2>/dev/null || true; } | sort | xargs -r sha256sum | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ] || ! .venv/bin/python -c "import gsp_kernels" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet torch==2.13.0
    .venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
    echo "$stamp" > "$stamp_file"
fi
.venv/bin/gsp-kernels check
.venv/bin/gsp-kernels demo "$@"
