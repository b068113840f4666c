#!/usr/bin/env bash
# Create .venv and install lookalike into it. torch comes first, pinned to the CPU build:
# a bare `torch` requirement would otherwise pull a multi-GB CUDA build. Where plain PyPI would hand out
# the CUDA build of torch 2.13.0, point TORCH_INDEX_URL at PyTorch's CPU index, e.g.
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/pip install -q -e ".${extras:+[$extras]}"
