#!/usr/bin/env bash
# The README's main command: set up the virtualenv, then run the offline demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/rlhfkit demo "$@"
