"""An arithmetic word-problem task for RL with verifiable rewards, generated here (nothing is
downloaded): problems of 2-3 steps with small whole numbers (operands below 10, answers
below 30: a 135M model solves some, not most), as chat prompts that ask for the answer
in ``\\boxed{}``, each row carrying its gold ``answer`` for ``rlhfkit.rewards.verify:math``.

Training and held-out problems are disjoint: a problem's identity is its template and numbers,
and the held-out split takes whole identities the training split never holds (checked).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

# "as \\boxed{N}" invited a literal \\boxed{N} from SmolLM2 (docs/rlvr.md, run 1)
INSTRUCTION = "Solve it in a few short steps, then put the final number inside \\boxed{}."
NAMES = [
    "Ana",
    "Ben",
    "Carla",
    "Dev",
    "Emma",
    "Farid",
    "Gita",
    "Hugo",
    "Iris",
    "Jon",
    "Kai",
    "Lena",
]
THINGS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "shells", "cards"]

# (template, answer) builders: each takes an rng and returns (question, integer answer)
Problem = Callable[[random.Random], tuple[str, int]]


def _buy_give(rng: random.Random) -> tuple[str, int]:
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, min(a + b - 1, 9))
    q = f"{n} has {a} {t}. {n} buys {b} more and then gives {c} to a friend. How many {t} does {n} have now?"
    return q, a + b - c


def _groups(rng: random.Random) -> tuple[str, int]:
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    a, b, c = rng.randint(2, 5), rng.randint(2, 5), rng.randint(1, 9)
    q = f"{n} fills {a} boxes with {b} {t} each, then finds {c} more {t}. How many {t} are there in all?"
    return q, a * b + c


def _share(rng: random.Random) -> tuple[str, int]:
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    k, each, extra = rng.randint(2, 5), rng.randint(2, 5), rng.randint(1, 9)
    q = f"{n} has {k * each} {t} and shares them equally among {k} friends. Each friend then gets {extra} more {t}. How many {t} does each friend have?"
    return q, each + extra


def _three_steps(rng: random.Random) -> tuple[str, int]:
    n, t = rng.choice(NAMES), rng.choice(THINGS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9)
    d = rng.randint(1, min(a + b + c - 1, 9))
    q = f"{n} has {a} {t}, gets {b} more, then {c} more, and gives away {d}. How many {t} does {n} have?"
    return q, a + b + c - d


def _price(rng: random.Random) -> tuple[str, int]:
    n = rng.choice(NAMES)
    k, p = rng.randint(2, 4), rng.randint(1, 5)
    paid = 10 if k * p < 10 else 20
    q = f"{n} buys {k} pens at {p} dollars each and pays with {paid} dollars. How much change does {n} get, in dollars?"
    return q, paid - k * p


PROBLEMS: list[Problem] = [_buy_give, _groups, _share, _three_steps, _price]


def prompt_row(question: str, answer: int) -> dict:
    """A prompts-file row: a chat prompt and the gold answer (a column for the checker)."""
    return {
        "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
        "answer": str(answer),
    }


def make_splits(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Distinct problems, then split: no question text is in both."""
    rng = random.Random(seed)
    seen: dict[str, int] = {}
    while len(seen) < n_train + n_heldout:
        q, a = rng.choice(PROBLEMS)(rng)
        seen.setdefault(q, a)
    items = list(seen.items())
    rng.shuffle(items)
    held, train = items[:n_heldout], items[n_heldout:]
    assert not {q for q, _ in held} & {q for q, _ in train}
    return [prompt_row(q, a) for q, a in train], [prompt_row(q, a) for q, a in held]


def write_task(out: str | Path, n_train: int = 512, n_heldout: int = 64, seed: int = 0) -> dict:
    """out/train.jsonl and out/heldout.jsonl; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = make_splits(n_train, n_heldout, seed)
    paths = {"train": out / "train.jsonl", "heldout": out / "heldout.jsonl"}
    for name, rows in (("train", train), ("heldout", held)):
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
