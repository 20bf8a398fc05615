"""The SmolLM2 tool recipe's task (``rlhfkit demo --model smollm2 --task tools``): its reward
reads the final turn strictly, its held-out pairs are never trained on, and its SFT traces are
what the tool environment and the reward expect. The end-to-end smoke is in test_smollm2.py."""

import random

import pytest

from rlhfkit.demo import tools_smollm2 as t
from rlhfkit.envs.tools import ToolEnv, parse_hermes


def _score(final: str, a: int = 37, b: int = 58) -> float:
    (s,) = t.reward(["p"], [final], [final], [a * b], [[a, b]])
    return s


@pytest.mark.parametrize(
    "final, expected",
    [
        ("37 times 58 is 2146.", 1.0),
        ("2146", 1.0),
        ("The product is 2,146.", 1.0),  # a thousands separator is one number
        ("37 * 58 = 2146", 1.0),
        ("37 times 58 is 2147.", 0.0),
        ("It is 2146 or 2156.", 0.0),  # a list of guesses does not commit
        ("It is 2156 or 2146.", 0.0),
        ("2146? No: 2156.", 0.0),
        ("2146, so 2146 / 37 = 58", 0.0),  # the last number must be the product
        ("I cannot multiply these numbers.", 0.0),
        ('<tool_call>\n{"name": "multiply", "arguments": {"a": 37, "b": 58}}\n</tool_call>', 0.0),
        ("", 0.0),
    ],
)
def test_the_reward_credits_only_a_final_turn_that_commits_to_the_product(final, expected):
    assert _score(final) == expected


def test_the_reward_reads_the_final_turn_not_the_tool_answer_in_the_episode():
    episode = "<tool_call>...</tool_call>\n2146\nI do not know."  # the tool answered 2146
    (s,) = t.reward(["p"], [episode], ["I do not know."], [2146], [[37, 58]])
    assert s == 0.0


def test_the_held_out_pairs_are_never_in_the_training_pairs():
    train, held, held_new = t.split_pairs(0, 48)
    assert len(held) == len(held_new) == 48
    seen = set(train)
    assert not seen & set(held) and not seen & set(held_new) and not set(held) & set(held_new)
    for a, b in train + held + held_new:
        assert 10 <= a <= 99 and 10 <= b <= 99 and 1000 <= a * b <= 9999
    assert t.split_pairs(0, 48) == (train, held, held_new)  # the same task for every seed


def test_the_task_files_keep_held_out_pairs_and_new_wordings_apart(tmp_path):
    import json

    files = t.write_task(tmp_path, {"sft_pairs": 64, "heldout": 16})
    rows = {k: [json.loads(x) for x in p.open()] for k, p in files.items()}
    trained = {tuple(r["numbers"]) for r in rows["prompts"]}
    trained |= {(m["a"], m["b"]) for m in _calls(rows["sft"])}
    for s in t.SETS:
        assert len(rows[s]) == 16 and not trained & {tuple(r["numbers"]) for r in rows[s]}
        for r in rows[s]:
            a, b = r["numbers"]
            assert r["answer"] == a * b and str(a) in r["prompt"] and str(b) in r["prompt"]
    wording = {w.split("{")[0] for w in t.WORDINGS}
    assert all(r["prompt"].startswith(tuple(wording)) for r in rows["heldout"])
    assert not any(r["prompt"].startswith(tuple(wording)) for r in rows["heldout_new"])


def _calls(rows):
    for r in rows:
        for m in r["prompt"]:
            if m["role"] == "assistant":
                (call,) = parse_hermes(m["content"])
                yield call["arguments"]


def test_sft_traces_call_the_tool_a_share_of_the_time_and_agree_with_the_env_and_reward():
    pairs = t.split_pairs(0, 48)[0][:400]
    rows = t.sft_rows(random.Random(1), pairs, 0.3)
    assert len(rows) == 2 * len(pairs)
    first, second = rows[0::2], rows[1::2]
    calls = [r for r in first if r["completion"].startswith("<tool_call>")]
    assert abs(len(calls) / len(first) - 0.3) < 3 * (0.3 * 0.7 / len(first)) ** 0.5
    env = ToolEnv([t.multiply])
    assert rows[0]["tools"] == env.tools  # the schema the RL episodes show
    for r, (a, b) in zip(first, pairs, strict=True):
        if r in calls:  # the call the environment runs returns the product
            answers, _, done = env.step(r["completion"])
            assert not done and answers[0]["content"] == str(a * b)
        else:  # an answer from memory is wrong, so it earns nothing
            assert _score(r["completion"], a, b) == 0.0
    for r, (a, b) in zip(second, pairs, strict=True):
        assert r["prompt"][-1] == {"role": "tool", "content": str(a * b)}
        assert _score(r["completion"], a, b) == 1.0  # reading the tool's answer is a success


def test_the_held_out_files_do_not_change_with_the_sft_set(tmp_path):
    """The base and SFT evaluations are cached once for every seed: their prompts must be the
    held-out files whatever the SFT size was when they ran."""
    small = t.write_task(tmp_path / "a", {"sft_pairs": 32, "heldout": 16})
    large = t.write_task(tmp_path / "b", {"sft_pairs": 96, "heldout": 16})
    for s in t.SETS:
        assert small[s].read_text() == large[s].read_text()
    assert small["sft"].read_text() != large["sft"].read_text()
