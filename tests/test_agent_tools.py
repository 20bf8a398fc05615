"""Agents (issues 22, 36): tools from plain functions, their schemas, the Hermes parser, and how a
tool environment answers calls that cannot run (errors the model reads, counted, never a stopped
run)."""

from __future__ import annotations

import time

import pytest

from rlhfkit.config import ConfigError
from rlhfkit.envs import ToolEnv, tool_schemas
from rlhfkit.envs.tools import InvalidCall, parse_hermes


def multiply(a: int, b: int) -> int:
    """Multiply two numbers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


def slow(x: int) -> int:
    """Sleep, then answer.

    Args:
        x: a number
    """
    time.sleep(0.5)
    return x


def broken(x: int) -> int:
    """Always fails.

    Args:
        x: a number
    """
    raise ValueError("no such record")


def test_tool_schema_comes_from_type_hints_and_docstring():
    (schema,) = tool_schemas([multiply])
    fn = schema["function"]
    assert fn["name"] == "multiply" and fn["description"] == "Multiply two numbers."
    assert fn["parameters"]["properties"]["a"] == {
        "type": "integer",
        "description": "the first factor",
    }
    assert fn["parameters"]["required"] == ["a", "b"]


def test_tool_schema_error_names_the_function():
    def undocumented(a, b):
        return a

    with pytest.raises(ConfigError, match="undocumented"):
        tool_schemas([undocumented])


def test_hermes_parser_reads_calls_and_flags_bad_ones():
    text = (
        'I will call. <tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
        '<tool_call>{"name": "multiply", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>'
        '<tool_call>{not json}</tool_call><tool_call>[1, 2]</tool_call><tool_call>{"name": 1'
    )
    calls = parse_hermes(text)
    assert calls[0] == {"name": "multiply", "arguments": {"a": 3, "b": 4}}
    assert calls[1] == {"name": "multiply", "arguments": {"a": 1, "b": 2}}  # string arguments
    assert [type(c) for c in calls[2:]] == [InvalidCall] * 3  # bad JSON, not an object, unclosed
    assert "not valid JSON" in calls[2].reason and "not closed" in calls[4].reason
    assert parse_hermes("the answer is 12") == []


def test_tool_env_runs_calls_and_turns_failures_into_error_observations():
    env = ToolEnv([multiply, slow, broken], timeout=0.1)
    assert env.reset({"prompt": "what is 3 x 4", "answer": 12}) == "what is 3 x 4"
    call = '<tool_call>{{"name": "{}", "arguments": {}}}</tool_call>'
    obs, reward, done = env.step(call.format("multiply", '{"a": 3, "b": 4}'))
    want = {"role": "tool", "name": "multiply", "content": "12", "tool_call_id": "000000000"}
    assert obs == [want] and not done
    for name, args, expect in [
        ("slow", '{"x": 1}', "timed out after 0.1 s"),
        ("broken", '{"x": 1}', "raised ValueError: no such record"),
        ("multiply", '{"a": 1}', "'b' is a required property"),  # a missing argument
        ("divide", '{"a": 1}', "there is no tool 'divide'"),  # a made-up tool
    ]:
        (msg,), _, done = env.step(call.format(name, args))
        assert msg["content"].startswith("error:") and expect in msg["content"] and not done
    (msg,), _, _ = env.step("<tool_call>{oops</tool_call>")
    assert "not valid JSON" in msg["content"]
    assert env.counts == {"tool_calls": 3, "tool_errors": 2, "invalid_calls": 3}
    assert env.step("the answer is 12") == (None, None, True)  # no call: the final answer


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: the first term
        b: the second term
    """
    return a + b


def tags(word: str) -> set:
    """The letters of a word, as a set (JSON cannot encode it).

    Args:
        word: a word
    """
    return set(word)


def when(day: int):
    """A date (JSON cannot encode it).

    Args:
        day: the day of the month
    """
    import datetime

    return datetime.date(2026, 1, day)


CALL = '<tool_call>{{"name": "{}", "arguments": {}}}</tool_call>'


def test_wrong_typed_or_unknown_arguments_are_invalid_calls_not_silent_results():
    """Issue 36: add("2", "3") returned "23"; the arguments are now checked against the JSON
    schema the model was shown, and the model reads why."""
    env = ToolEnv([add])
    for args, expect in [
        ('{"a": "2", "b": "3"}', "a: '2' is not of type 'integer'"),
        ('{"a": 2, "b": 3.5}', "b: 3.5 is not of type 'integer'"),
        ('{"a": true, "b": 3}', "a: True is not of type 'integer'"),
        ('{"a": 2, "b": 3, "c": 4}', "Additional properties are not allowed ('c' was unexpected)"),
    ]:
        (msg,), _, _ = env.step(CALL.format("add", args))
        assert msg["content"].startswith("error: the arguments of 'add' do not match its schema")
        assert expect in msg["content"], msg["content"]
    (msg,), _, _ = env.step(CALL.format("add", '{"a": 2, "b": 3}'))
    assert msg["content"] == "5"
    assert env.counts == {"tool_calls": 1, "tool_errors": 0, "invalid_calls": 4}


def test_a_result_json_cannot_encode_is_an_error_message_not_a_dead_run():
    env = ToolEnv([tags, when])
    text = CALL.format("tags", '{"word": "aa"}') + CALL.format("when", '{"day": 3}')
    (a, b), _, done = env.step(text)
    assert (
        a["content"]
        == "error: tags returned a set that JSON cannot encode (Object of type set is not JSON serializable)"
    )
    assert b["content"].startswith("error: when returned a date that JSON cannot encode")
    assert not done and env.counts == {"tool_calls": 2, "tool_errors": 2, "invalid_calls": 0}


def test_a_turns_tool_calls_run_concurrently_under_one_deadline():
    """Issue 36: a turn's calls ran one after another, so six 10 s calls failed a 60 s step.
    Six calls that each wait for all six to arrive (a barrier) can only pass if they run at
    once; one after another, the first would wait alone and fail. Past the turn's deadline
    every call still running is answered with the timeout error."""
    import threading

    barrier = threading.Barrier(6)

    def meet(x: int) -> int:
        """Wait until six calls are running together.

        Args:
            x: a number
        """
        barrier.wait(timeout=10)
        return x

    env = ToolEnv([meet], timeout=30.0)
    msgs, _, _ = env.step("".join(CALL.format("meet", f'{{"x": {i}}}') for i in range(6)))
    assert [m["content"] for m in msgs] == [str(i) for i in range(6)]
    release = threading.Event()

    def hang(x: int) -> int:
        """Wait until the test releases it.

        Args:
            x: a number
        """
        release.wait(timeout=10)
        return x

    env = ToolEnv([multiply, hang], timeout=0.2)
    try:
        text = CALL.format("multiply", '{"a": 2, "b": 3}') + CALL.format("hang", '{"x": 1}') * 3
        msgs, _, _ = env.step(text)
    finally:
        release.set()
    assert msgs[0]["content"] == "6"
    assert [m["content"] for m in msgs[1:]] == ["error: hang timed out after 0.2 s"] * 3
    assert env.counts == {"tool_calls": 4, "tool_errors": 3, "invalid_calls": 0}


def test_an_unclosed_tool_call_does_not_swallow_the_next_valid_one():
    text = '<tool_call>{"name": "add", "arg' + CALL.format("add", '{"a": 1, "b": 2}')
    calls = parse_hermes(text)
    assert calls[0] == {"name": "add", "arguments": {"a": 1, "b": 2}}
    assert len(calls) == 2 and "is not closed" in calls[1].reason


# --------------------------------------------------------------------------- templates (issue 31)

# SmolLM2-Instruct's chat template (ChatML with a default system prompt): no tools section
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# a template with its own tools section (the shape of Qwen 2.5's)
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "</tools><|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# a template that drops system messages and ignores tools: it can never show them
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def _tok(template: str):
    from rlhfkit.toy import build_tokenizer

    return build_tokenizer(["hi", "what", "is"], template)


def test_a_template_without_a_tools_section_gets_the_schemas_in_its_system_prompt():
    """Issue 31: SmolLM2's template drops ``tools`` silently, so the model never saw a tool. The
    schemas now go into the system prompt (the Hermes/Qwen words), with a warning once per
    template; a template with its own tools section is left to render them itself."""
    import json
    import warnings

    from rlhfkit.data import tokenize

    (schema,) = tool_schemas([add])
    tok = _tok(SMOLLM2_TEMPLATE)
    plain = tokenize.render_prompt(tok, "what is 2 + 3")
    assert "add" not in plain and "You are a helpful AI assistant named SmolLM" in plain
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        text = tokenize.render_prompt(tok, "what is 2 + 3", [schema])
        again = tokenize.render_prompt(tok, "what is 4 + 5", [schema])
    assert text.startswith("<|im_start|>system\n# Tools\n") and json.dumps(schema) in text
    assert "<tool_call>" in text and "named SmolLM" not in text  # ours is the system prompt
    assert "what is 4 + 5" in again
    assert sum("has no tools section" in str(w.message) for w in seen) <= 1  # once per template
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = tokenize.render_prompt(tok, own, [schema])
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")  # its text first
    # the completion after such a prompt is still the template's continuation (SFT traces)
    completion = tokenize.render_completion(tok, "what is 2 + 3", "5", "row 1", [schema])
    assert completion == "5<|im_end|>"
    tok = _tok(TOOLS_TEMPLATE)
    text = tokenize.render_prompt(tok, "what is 2 + 3", [schema])
    assert text.startswith("<|im_start|>system\n<tools>") and "# Tools" not in text


def test_a_template_that_cannot_show_tools_is_a_config_error_naming_the_key(tmp_path):
    from rlhfkit.data import tokenize

    tok = _tok(NO_SYSTEM_TEMPLATE)
    with pytest.raises(ConfigError, match=r"env.tools: the chat template of .* renders neither"):
        tokenize.check_tools_shown(tok, "env.tools")
    with pytest.raises(tokenize.ToolsNotShown):
        tokenize.render_prompt(tok, "what is 2 + 3", tool_schemas([add]))
    tokenize.check_tools_shown(_tok(TOOLS_TEMPLATE), "env.tools")  # fine: no error


def test_rlhfkit_ppo_with_tools_stops_before_any_work_on_a_template_that_cannot_show_them(
    tmp_path,
):
    from agent_kit import agent_cfg
    from conftest import WORDS

    from rlhfkit.stages.ppo import run_ppo
    from rlhfkit.toy import build_tiny_lm

    lm = build_tiny_lm(tmp_path / "lm", WORDS, hidden=16, layers=1, heads=2,
                       chat_template=NO_SYSTEM_TEMPLATE)  # fmt: skip
    cfg = agent_cfg(tmp_path, lm, "env.tools=[test_agent_tools:add]")
    with pytest.raises(ConfigError, match="env.tools: the chat template of .* renders neither"):
        run_ppo(cfg)
    assert not (tmp_path / "ppo" / "checkpoints").exists()
