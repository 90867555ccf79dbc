#!/usr/bin/env bash
# Create .venv if missing and install a torch and torchvision pair that import together
# (torch==2.14.1 with torchvision==0.29.1: on the project's machines pip takes both from the
# local disk; any matching pair works, but a looser pin would download GBs) and the package
# with the given extras. Re-running skips the install unless the build inputs or the extras
# changed. PYTHON picks the interpreter.
#   usage: scripts/setup_venv.sh EXTRAS        (e.g. "test" or "train")
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:?usage: scripts/setup_venv.sh EXTRAS}

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# The native module is built at install: reinstall when its inputs change.
stamp_file=".venv/.gsp-installed-$extras"
stamp="$({ find pyproject.toml setup.py CMakeLists.txt csrc -type f 2>/dev/null || true; } | sort | xargs -r sha256sum | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ] || ! .venv/bin/python -c "import gsp_kernels" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
    .venv/bin/python -m pip install --quiet -e ".[$extras]"
    echo "$stamp" > "$stamp_file"
fi
