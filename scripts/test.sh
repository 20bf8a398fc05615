#!/usr/bin/env bash
# The README's test command: set up the virtualenv, lint, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
# tcmalloc preloaded where installed, as the `rlhfkit` command does (rlhfkit/launch.py)
.venv/bin/python -m rlhfkit.launch .venv/bin/python -m pytest -q "$@"
