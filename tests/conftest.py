"""Shared fixtures: a tiny local Llama and tokenizer (no hub), and synthetic data files."""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

# pytest-xdist's workers share the cores, and the demo's runs keep 2 threads beside another
# worker (tests/test_demo.py): OpenMP threads that spin at each barrier while their peer waits
# for a core burn the time the other worker needs (a 2-thread and a 1-thread training loop on 2
# cores: 66 and 139 steps/s spinning, 159 and 201 passive). Passive waiting changes no result
# (the threads split the work as before). Set before torch loads OpenMP, here and in the
# processes the tests start.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# model.cpu_gemm: auto keeps its kernel choices per machine (models.cpu_gemm.Choices): the suite
# makes its own, in a directory of its own, and leaves the user's ~/.cache/rlhfkit alone
if "RLHFKIT_CACHE_DIR" not in os.environ:
    os.environ["RLHFKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlhfkit-test-cache-")
    atexit.register(shutil.rmtree, os.environ["RLHFKIT_CACHE_DIR"], ignore_errors=True)

from rlhfkit.toy import build_tiny_lm  # noqa: E402

# pytest-xdist (pyproject addopts) runs the suite in one worker per core: each worker, and each
# process its tests start, gets its share of the cores, as two processes on 2 cores need 1 thread each
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)
else:
    torch.set_num_threads(2)

# Under pytest-xdist (pyproject addopts: --dist loadfile --no-loadscope-reorder) each module runs
# on one worker, handed out in collection order: the longest modules go first, so that none of
# them starts last and keeps one worker busy after the other is done (minutes at 1 thread each,
# Zen 1 EPYC). The order within a module is kept.
LONGEST_FIRST = (
    "test_demo.py",
    "test_smollm2.py",
    "test_distributed.py",
    "test_vllm_venv.py",  # waits for vLLM's virtualenv (built beside the suite's start)
    "test_reliability.py",
    "test_agent_runs.py",
    "test_rewards.py",
    "test_ppo.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


COLORS = ["red", "blue", "green", "gold", "pink", "gray"]
WORDS = COLORS + ["copy", ":", "good", "bad", "ok", "say", "the", "a", "word", "user", "assistant"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    return build_tiny_lm(
        tmp_path_factory.mktemp("tiny") / "lm", WORDS, hidden=32, layers=2, heads=2
    )


@pytest.fixture(scope="session")
def tiny_chat_lm(tmp_path_factory) -> Path:
    return build_tiny_lm(
        tmp_path_factory.mktemp("tinychat") / "lm",
        WORDS,
        hidden=32,
        layers=2,
        heads=2,
        chat_template=CHAT_TEMPLATE,
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def copy_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(COLORS) for _ in range(rng.randint(1, 3)))
        rows.append({"prompt": f"copy : {words} :", "completion": words})
    return rows


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Learnable rule: the chosen response says 'good', the rejected one 'bad'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        c = rng.choice(COLORS)
        filler = " ".join(rng.choice(COLORS) for _ in range(rng.randint(0, 2)))
        rows.append(
            {
                "prompt": f"say {c} :",
                "chosen": f"{filler} good {c}".strip(),
                "rejected": f"{filler} bad {c}".strip(),
            }
        )
    return rows


def count_calls(monkeypatch, module, name: str, calls: dict | None = None) -> dict:
    """Replace ``module.name`` by a wrapper that counts its calls in ``calls[name]``."""
    calls = {} if calls is None else calls
    calls.setdefault(name, 0)
    real = getattr(module, name)

    def wrapper(*a, **k):
        calls[name] += 1
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def lm_step(models, ids):
    """Each model's LM loss on ``ids`` (labels = inputs), after its backward, and the model's
    gradient flattened: [(loss, grad), ...]."""
    out = []
    for m in models:
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append((loss.detach(), torch.cat([p.grad.flatten() for p in m.parameters()])))
    return out


def loads_plain(model, path):
    """Save ``model`` with save_pretrained and load it back with plain ``from_pretrained``: the
    same state dict, bit for bit. Returns the loaded model."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(path)
    plain = AutoModelForCausalLM.from_pretrained(path)
    for (k, v), (k2, v2) in zip(
        model.state_dict().items(), plain.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(v, v2)
    return plain


@pytest.fixture(scope="module")
def chat(tiny_chat_lm):
    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_policy, load_tokenizer

    mc = ModelConfig(name_or_path=str(tiny_chat_lm))
    tok = load_tokenizer(mc)
    return tok, load_policy(mc, tok, trainable=False)


def assert_same_run(a_final, b_final, keys=("score/mean",)) -> None:
    """Two PPO runs of the same seed ended alike: the same metrics at every step (``keys``
    exactly, the policy loss to fp32 rounding) and the same final weights (a resumed run against
    one straight through)."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.train.logger import read_metrics

    ma, mb = read_metrics(Path(a_final).parent), read_metrics(Path(b_final).parent)
    assert [r["step"] for r in mb] == [r["step"] for r in ma]
    for ra, rb in zip(ma, mb, strict=True):
        assert all(ra[k] == rb[k] for k in keys)
        assert ra["loss/policy"] == pytest.approx(rb["loss/policy"], abs=1e-6)
    wa = AutoModelForCausalLM.from_pretrained(a_final).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b_final).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
