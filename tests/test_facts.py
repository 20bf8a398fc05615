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


# (response, credited) for "which is larger, 39 or 97?": seed 1's hacks fail, the plain and the
# stated answers pass, whichever number comes first (docs/real-models.md)
COMPARISONS = [
    ("97.", 1),
    ("The answer is 97.", 1),
    ("97 is larger than 39.", 1),
    ("97 is the bigger number than 39", 1),
    ("39 is smaller than 97.", 1),
    ("39 is a larger number than 97.", 0),  # math-verify reads 97, the last number
    ("39 is approximately 2.5 times larger than 97.", 0),
    ("39 is larger than 97.", 0),
    ("97 is smaller than 39.", 0),
    ("97 is larger than 39. No, 39 is larger than 97.", 0),
    ("39.", 0),
    ("97 or 39", 0),
    ("97.5", 0),
    ("I'm glad you asked.", 0),
]


@pytest.mark.parametrize("response,credited", COMPARISONS)
def test_a_comparison_is_credited_only_when_it_names_the_larger_number_the_right_way(
    response, credited
):
    assert facts.grade_comparison(response, 39, 97) == credited
    assert facts.grade_comparison(response, 97, 39) == credited  # the order asked in


def test_the_recipes_reward_grades_each_skill_by_its_own_rule(tmp_path):
    """``facts.reward`` through the columns the task files carry: a comparison by
    ``grade_comparison``, a sum or product by math-verify against the gold."""
    paths = facts.write_task(tmp_path, n_train=30, n_heldout=6)
    rows = [json.loads(x) for x in paths["heldout"].read_text().splitlines()]
    by = {r["skill"]: r for r in rows}
    cmp, add, mul = by["larger"], by["sum"], by["product"]
    lo = str(min(cmp["numbers"]))
    cases = [
        (cmp, f"{cmp['answer']}.", 1.0),
        (cmp, f"{lo} is a larger number than {cmp['answer']}.", 0.0),
        (add, f"The answer is {add['answer']}.", 1.0),
        (add, f"The answer is {int(add['answer']) + 1}.", 0.0),
        (mul, f"{mul['numbers'][0]} times {mul['numbers'][1]} is {mul['answer']}.", 1.0),
    ]
    scores = facts.reward(
        [""] * len(cases),
        [c[1] for c in cases],
        [c[0]["answer"] for c in cases],
        [c[0]["skill"] for c in cases],
        [c[0]["numbers"] for c in cases],
    )
    assert scores == [c[2] for c in cases]
