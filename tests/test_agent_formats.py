"""Tool-call formats beyond Hermes (issue 34): Llama 3.x JSON and Mistral's ``[TOOL_CALLS]``,
each parser picked from the chat template, and each checked on the real chat templates of its
family (written into tests/data/templates, not downloaded): an OpenAI-style ``tool_calls``
message rendered by the template and read back by the parser gives the same calls."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhfkit.envs import ToolEnv, parser_for, tool_schemas
from rlhfkit.envs.tools import InvalidCall, parse_hermes, parse_llama3, parse_mistral
from rlhfkit.toy import build_tokenizer

TEMPLATES = Path(__file__).parent / "data" / "templates"


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: the first term
        b: the second term
    """
    return a + b


def scale(x: float, by: float) -> float:
    """Scale a number.

    Args:
        x: the number
        by: the factor
    """
    return x * by


def _tok(name: str):
    return build_tokenizer(["what", "is"], (TEMPLATES / name).read_text())


@pytest.mark.parametrize(
    "template, parser",
    [("llama3.1.jinja", "llama3"), ("mistral-v3.jinja", "mistral"), ("qwen2.5.jinja", "hermes")],
)
def test_the_parser_is_picked_from_the_chat_template_and_the_key_overrides_it(template, parser):
    chat = (TEMPLATES / template).read_text()
    assert parser_for(chat) == parser
    assert parser_for(chat, "hermes") == "hermes"  # env.tool_parser given: as it is
    assert parser_for(None) == parser_for("{{ messages }}") == "hermes"  # nothing to detect


# (template, parser, the calls of one assistant turn: Llama 3.1 writes one call per turn)
ROUND_TRIPS = [
    ("llama3.1.jinja", parse_llama3, [("add", {"a": 2, "b": 3})]),
    (
        "mistral-v3.jinja",
        parse_mistral,
        [("add", {"a": 2, "b": 3}), ("scale", {"x": 1.5, "by": -2})],
    ),
    ("qwen2.5.jinja", parse_hermes, [("add", {"a": 2, "b": 3}), ("scale", {"x": 1.5, "by": -2})]),
]
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "</s>", "<|im_end|>")  # dropped when a turn is decoded


@pytest.mark.parametrize("template, parse, calls", ROUND_TRIPS)
def test_calls_rendered_by_the_template_read_back_as_the_same_calls(template, parse, calls):
    tok = _tok(template)
    tools = tool_schemas([add, scale])
    user = [{"role": "user", "content": "what is 2 + 3"}]
    turn = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": f"{i:09d}", "type": "function", "function": {"name": n, "arguments": a}}
            for i, (n, a) in enumerate(calls)
        ],
    }
    prompt = tok.apply_chat_template(user, tools=tools, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template([*user, turn], tools=tools, tokenize=False)
    assert full.startswith(prompt) and "add" in prompt  # the template shows the tools
    text = full[len(prompt) :]
    for mark in END_OF_TURN:
        text = text.replace(mark, "")
    assert parse(text) == [{"name": n, "arguments": a} for n, a in calls]


def test_llama3_and_mistral_parsers_flag_what_they_cannot_read():
    assert parse_llama3("The answer is 5.") == []  # an answer, not a call
    assert parse_llama3('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}') == [
        {"name": "add", "arguments": {"a": 1, "b": 2}}
    ]
    two = parse_llama3(
        '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "scale", "parameters": {"x": 1, "by": 2}}'
    )
    assert [c["name"] for c in two] == ["add", "scale"]
    (bad,) = parse_llama3('{"name": "add", "parameters": {"a": 1')
    assert isinstance(bad, InvalidCall) and "not valid JSON" in bad.reason
    (bad,) = parse_llama3('{"parameters": {}}')
    assert isinstance(bad, InvalidCall) and "needs" in bad.reason
    assert parse_mistral("The answer is 5.") == []
    (bad,) = parse_mistral("[TOOL_CALLS] [{oops")
    assert isinstance(bad, InvalidCall) and "not valid JSON" in bad.reason
    # Mistral's v11+ form: name[ARGS]{...}, once per call
    assert parse_mistral(
        '[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]scale[ARGS]{"x": 2, "by": 3}'
    ) == [
        {"name": "add", "arguments": {"a": 1, "b": 2}},
        {"name": "scale", "arguments": {"x": 2, "by": 3}},
    ]


@pytest.mark.parametrize("parser, text", [
    ("llama3", '{"name": "add", "parameters": {"a": 2, "b": 3}}'),
    ("mistral", '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 2, "b": 3}}]'),
])  # fmt: skip
def test_a_tool_env_with_each_parser_runs_the_call_and_counts_bad_ones(parser, text):
    env = ToolEnv([add], parser=parser)
    (msg,), _, done = env.step(text)
    assert msg["content"] == "5" and not done
    env.step(text.replace('"a": 2', '"a": "2"'))  # wrong-typed: an invalid call, counted
    assert env.counts == {"tool_calls": 1, "tool_errors": 0, "invalid_calls": 1}
    assert env.step("5") == (None, None, True)  # no call: the final answer


def test_a_tool_answer_continues_mistrals_template_with_its_call_ids():
    """Mistral's template refuses a tool result without a 9-character call id; ToolEnv numbers
    its answers, so the episode loop can render the environment's turn after the model's."""
    from rlhfkit.rollout.episodes import observation_ids

    tok = _tok("mistral-v3.jinja")
    env = ToolEnv([add], parser="mistral")
    msgs, _, _ = env.step('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 2, "b": 3}}]')
    assert msgs[0]["tool_call_id"] == "000000000"
    assert len(observation_ids(tok, msgs, env.tools)) > 0
    text = tok.apply_chat_template(
        [{"role": "user", "content": "what is 2 + 3"}, *msgs], tokenize=False
    )
    assert '[TOOL_RESULTS] {"content": 5, "call_id": "000000000"}[/TOOL_RESULTS]' in text
    bare = [{k: v for k, v in m.items() if k != "tool_call_id"} for m in msgs]
    with pytest.raises(Exception, match="Tool call IDs should be alphanumeric"):
        observation_ids(tok, bare, env.tools)  # what an answer without an id would do
