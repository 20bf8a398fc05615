"""Short arithmetic facts for RL with verifiable rewards on SmolLM2-135M-Instruct (issue 31),
generated here (nothing is downloaded): which of two two-digit numbers is larger, the sum and
the product of two one-digit numbers, each answered in a few tokens. The base model answers
about a third of them (docs/real-models.md: pass@1 0.29 / 0.42 / 0.30 at temperature 0.7), so
RL has correct samples in most groups of 8 to learn from.

Three files, each a chat prompt plus its gold ``answer``, ``skill`` and ``numbers``, graded by
``reward`` (``verify:math`` for sums and products, ``grade_comparison`` for comparisons):

    train.jsonl         the training templates, on the training numbers
    heldout.jsonl       the same templates on numbers never trained on
    heldout_new.jsonl   other wordings (templates never seen in training), on held-out numbers

A problem's identity is its skill and its numbers in either order ("9 + 5" is "5 + 9"); the held-out identities are a fixed quarter of
each skill's, the same for every seed (seeds vary the training, not the test), and no training
row holds one (checked).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

INSTRUCTION = "Answer in one short sentence."

# skill -> (its numbers, the answer, the training wording, the held-out-only wording)
Skill = tuple[list[tuple[int, int]], Callable[[int, int], int], str, str]
SKILLS: dict[str, Skill] = {
    "larger": (
        [(a, b) for a in range(10, 100) for b in range(a + 1, 100)],
        max,
        "Which is larger, {a} or {b}?",
        "Of the numbers {a} and {b}, which one is bigger?",
    ),
    "sum": (
        [(a, b) for a in range(2, 10) for b in range(a, 10)],
        lambda a, b: a + b,
        "What is {a} + {b}?",
        "Add {a} and {b}. What do you get?",
    ),
    "product": (
        [(a, b) for a in range(2, 10) for b in range(a, 10)],
        lambda a, b: a * b,
        "What is {a} times {b}?",
        "Multiply {a} by {b}. What is the result?",
    ),
}


def _row(text: str, a: int, b: int, answer: int, skill: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"{text} {INSTRUCTION}"}],
        "answer": str(answer),
        "skill": skill,
        "numbers": [a, b],
    }


def split_identities(seed: int = 1234) -> dict[str, tuple[list, list]]:
    """skill -> (training numbers, held-out numbers): a fixed quarter held out."""
    out = {}
    for skill, (numbers, _, _, _) in SKILLS.items():
        pool = list(numbers)
        random.Random(f"{seed}-{skill}").shuffle(pool)
        k = len(pool) // 4
        out[skill] = (pool[k:], pool[:k])
    return out


def write_task(out: str | Path, n_train: int = 2048, n_heldout: int = 64) -> dict[str, Path]:
    """The three files (n_heldout rows each, the skills in turn); returns their paths."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    split = split_identities()
    rng = random.Random(0)
    names = list(SKILLS)
    train, heldout, new = [], [], []
    for i in range(n_train):
        skill = names[i % len(names)]
        numbers, answer, wording, _ = SKILLS[skill]
        a, b = _either(rng, rng.choice(split[skill][0]))
        train.append(_row(wording.format(a=a, b=b), a, b, answer(a, b), skill))
    for i in range(n_heldout):
        skill = names[i % len(names)]
        numbers, answer, wording, other = SKILLS[skill]
        held = split[skill][1]
        a, b = _either(rng, held[(i // len(names)) % len(held)])
        heldout.append(_row(wording.format(a=a, b=b), a, b, answer(a, b), skill))
        a, b = _either(rng, held[(i // len(names) + len(held) // 2) % len(held)])
        new.append(_row(other.format(a=a, b=b), a, b, answer(a, b), skill))
    check_disjoint(train, heldout + new)
    paths = {}
    for name, rows in (("train", train), ("heldout", heldout), ("heldout_new", new)):
        paths[name] = d / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _either(rng: random.Random, pair: tuple[int, int]) -> tuple[int, int]:
    return (pair[1], pair[0]) if rng.random() < 0.5 else pair


def identity(row: dict) -> tuple[str, tuple[int, ...]]:
    """A row's identity: its skill and its numbers, sorted."""
    words = [w.strip("?.,") for w in row["prompt"][-1]["content"].split()]
    return row["skill"], tuple(sorted(int(w) for w in words if w.isdigit()))


def check_disjoint(train: list[dict], heldout: list[dict]) -> None:
    """No held-out identity (skill, numbers) in the training rows."""
    seen = {identity(r) for r in train}
    both = [r for r in heldout if identity(r) in seen]
    if both:
        raise ValueError(f"held-out problems also in training: {both[:3]}")


def _alone(number: str) -> str:
    """A regex for ``number`` standing alone: "3.4" holds neither 3 nor 4."""
    return rf"(?<![\d.]){number}(?![\d.]\d)"


_NUMBER = _alone(r"\d+")
_MORE = "larger|bigger|greater|higher"
_LESS = "smaller|less|lower"


def _says(response: str, x: int, y: int, words: str) -> bool:
    """``response`` states "x is (a) <words> (number) than y"."""
    pattern = (
        rf"{_alone(str(x))}\s+is\s+(?:a\s+|the\s+)?(?:{words})"
        rf"(?:\s+(?:number|one|value))?\s+than\s+{_alone(str(y))}"
    )
    return re.search(pattern, response, flags=re.IGNORECASE) is not None


def grade_comparison(response: str, a: int, b: int) -> float:
    """1 when ``response`` answers "which of a and b is larger" right: it names the larger
    number and not the smaller ("97.", "The answer is 97."), or it states the comparison the
    right way round ("97 is larger than 39", "39 is smaller than 97") and not the wrong way.
    math-verify reads a response's last number, so "39 is a larger number than 97." would pass
    it (the reward hack seed 1 found, docs/real-models.md); here it fails."""
    hi, lo = max(a, b), min(a, b)
    named = {int(x) for x in re.findall(_NUMBER, response)} & {a, b}
    if named == {hi}:
        return 1.0
    right = _says(response, hi, lo, _MORE) or _says(response, lo, hi, _LESS)
    wrong = _says(response, lo, hi, _MORE) or _says(response, hi, lo, _LESS)
    return float(right and not wrong)


def reward(
    prompts: list[str], responses: list[str], answer: list[str], skill: list[str],
    numbers: list[list[int]],
) -> list[float]:  # fmt: skip
    """The recipe's reward (``reward_fn=rlhfkit.demo.facts:reward``) and its evaluations' grade,
    binary: a comparison by ``grade_comparison``, a sum or product by ``verify:math`` against
    the gold (math-verify; it rejects the operation restated, "2 + 7 is only 11")."""
    from rlhfkit.rewards import verify

    scores = verify.math(prompts, responses, answer)
    return [
        grade_comparison(r, *n) if k == "larger" else s
        for r, n, k, s in zip(responses, numbers, skill, scores, strict=True)
    ]
