#!/usr/bin/env bash
# Run the test suite. Creates .venv if missing, installs torch==2.13.0 (the CPU wheel on disk
# here) and the package with its test extra, then runs pytest; extra arguments go to pytest.
# Re-running skips the install unless the build inputs changed. PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")"

EXTRAS="test"
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# Reinstall when the build inputs or the extras change (the native module is built at install).
stamp_file=".venv/.gsp-installed-$EXTRAS"
stamp="$({ find pyproject.toml setup.py CMakeLists.txt csrc -type f 2>/dev/null || true; } | sort | xargs -r sha256sum | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ] || ! .venv/bin/python -c "import gsp_kernels" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet torch==2.13.0
    .venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
    echo "$stamp" > "$stamp_file"
fi
# The whole suite, unless a test path (file, folder or file::test) is among the arguments.
targets=(python_tests)
for arg in "$@"; do
    if [ -e "${arg%%::*}" ]; then targets=(); break; fi
done
exec .venv/bin/python -m pytest "${targets[@]}" -q --timeout=900 "$@"
