#!/usr/bin/env bash
# Run the test suite: sets up .venv (scripts/setup_venv.sh: torch 2.14.1 with torchvision
# 0.29.1, and the package with its test extra), then pytest; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh test
# The whole suite, unless a test path (file, folder or file::test) is among the arguments.
targets=(python_tests)
for arg in "$@"; do
    if [ -e "${arg%%::*}" ]; then targets=(); break; fi
done
exec .venv/bin/python -m pytest "${targets[@]}" -q --timeout=900 "$@"
