#!/usr/bin/env bash
# Set up and run every test: the fast default set, then the slow (real model) and Redis-backed ones.
# Server-backed Qdrant tests run too when LOOKALIKE_TEST_QDRANT_URL is set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
markers="not server"
[ -n "${LOOKALIKE_TEST_QDRANT_URL:-}" ] && markers=""
.venv/bin/python -m pytest -m "$markers" -p no:cacheprovider "$@"
