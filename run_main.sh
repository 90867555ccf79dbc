#!/usr/bin/env bash
# The main job: check every backend that runs here against the float64 reference, then the demo
# (GAP vs GSP metric learning on the embedded collage data: Recall@1, MAP@R and a PNG of the
# weight maps; a few minutes on a CPU). Sets up .venv with scripts/setup_venv.sh; extra
# arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh train
.venv/bin/gsp-kernels check
.venv/bin/gsp-kernels demo "$@"
