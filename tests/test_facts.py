"""The RLVR recipe's task (``rlhfkit.demo.facts``): gold answers and held-out sets."""

import json
import re

import pytest

from rlhfkit.demo import facts


def _solve(text: str) -> int:
    """An independent solver of the three wordings, from the question's words."""
    a, b = (int(x) for x in re.findall(r"\d+", text))
    if "larger" in text or "bigger" in text:
        return max(a, b)
    if "+" in text or text.startswith("Add"):
        return a + b
    assert "times" in text or text.startswith("Multiply"), text
    return a * b


def test_the_facts_task_has_right_golds_and_held_out_sets_never_trained_on(tmp_path):
    paths = facts.write_task(tmp_path, n_train=600, n_heldout=48)
    rows = {k: [json.loads(x) for x in p.read_text().splitlines()] for k, p in paths.items()}
    assert [len(rows[k]) for k in ("train", "heldout", "heldout_new")] == [600, 48, 48]
    for r in [x for v in rows.values() for x in v]:
        assert r["answer"] == str(_solve(r["prompt"][-1]["content"]))

    # no held-out problem, in either order of its numbers, is a training problem
    def key(r):
        return r["skill"], tuple(sorted(map(int, re.findall(r"\d+", r["prompt"][-1]["content"]))))

    trained = {key(r) for r in rows["train"]}
    assert not trained & {key(r) for r in rows["heldout"] + rows["heldout_new"]}

    # the second held-out set's wordings never appear in training
    def wording(r):
        return re.sub(r"\d+", "N", r["prompt"][-1]["content"])

    assert not {wording(r) for r in rows["train"]} & {wording(r) for r in rows["heldout_new"]}
    assert {r["skill"] for r in rows["heldout"]} == set(facts.SKILLS)
    with pytest.raises(ValueError, match="held-out problems also in training"):
        facts.check_disjoint(rows["train"], rows["train"][:1])
