"""The RLVR task: generated arithmetic word problems whose gold answers the checker accepts, with
training and held-out problems disjoint."""

import json
import re

from rlhfkit.demo.arithmetic import PROBLEMS, make_splits, write_task
from rlhfkit.rewards import verify


def test_every_template_computes_its_answer_from_its_numbers():
    """An independent reading of each question: the numbers in order, combined as the words say."""
    import random

    ops = {
        "_buy_give": lambda a, b, c: a + b - c,
        "_groups": lambda a, b, c: a * b + c,
        "_share": lambda total, k, extra: total // k + extra,
        "_three_steps": lambda a, b, c, d: a + b + c - d,
        "_price": lambda k, p, paid: paid - k * p,
    }
    rng = random.Random(1)
    for make in PROBLEMS:
        for _ in range(50):
            q, answer = make(rng)
            nums = [int(x) for x in re.findall(r"\d+", q)]
            assert ops[make.__name__](*nums) == answer, q
            assert 0 <= answer < 40


def test_splits_are_disjoint_and_the_checker_accepts_the_gold_answers(tmp_path):
    train, held = make_splits(300, 40, seed=3)
    text = lambda r: r["prompt"][0]["content"]  # noqa: E731
    assert len({text(r) for r in train}) == 300 and len({text(r) for r in held}) == 40
    assert not {text(r) for r in train} & {text(r) for r in held}
    gold = [r["answer"] for r in held]
    assert verify.math([""] * 40, [f"so \\boxed{{{a}}}" for a in gold], gold) == [1.0] * 40
    paths = write_task(tmp_path, 30, 5)
    rows = [json.loads(x) for x in paths["heldout"].read_text().splitlines()]
    assert len(rows) == 5 and all(r["prompt"][0]["role"] == "user" and r["answer"] for r in rows)
