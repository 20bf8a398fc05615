#!/usr/bin/env bash
# Creates .venv (if missing) and installs rlhfkit with its dev and demo extras.
# Sourced by scripts/test.sh and scripts/demo.sh so both README commands work on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.rlhfkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev,demo]"
  touch "$stamp"
fi
