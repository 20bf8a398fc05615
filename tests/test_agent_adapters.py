"""Environments written for other libraries, run unmodified (issue 34). A TRL-style class
(``GRPOTrainer(environment_factory=...)``): its methods become tools, ``reset`` starts the
episode, reward functions read the instances; it trains with GRPO and is evaluated by
``rlhfkit eval``."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import agent_env
import pytest
from agent_kit import agent_cfg

from rlhfkit.config import ConfigError, EnvConfig, EvalRunConfig, load_config
from rlhfkit.envs import TRLEnv, make_factory
from rlhfkit.stages.evaluate import run_eval
from rlhfkit.stages.ppo import run_ppo
from rlhfkit.train.logger import read_metrics

# GRPO over two-turn episodes, the settings of every adapter's training run
GRPO_EPISODES = ("ppo.estimator=grpo", "rollout.samples_per_prompt=4", "rollout.max_turns=2")


def test_a_trl_style_class_becomes_our_environment_with_its_methods_as_tools():
    factory, name = make_factory(EnvConfig(factory="agent_env:IncrementEnv"), "hermes")
    env = factory()
    assert isinstance(env, TRLEnv) and name == "agent_env:IncrementEnv"
    (schema,) = env.tools  # reset is not a tool; increment is, described by its docstring
    assert schema["function"]["name"] == "increment"
    assert schema["function"]["parameters"]["properties"]["a"]["type"] == "integer"
    start = env.reset({"prompt": "count to 3", "id": 7})
    assert start == "count to 3\n\nthe counter starts at 0"  # reset's text after the prompt
    chat = env.reset({"prompt": [{"role": "user", "content": "count"}]})
    assert chat == [{"role": "user", "content": "count\n\nthe counter starts at 0"}]
    call = '<tool_call>{"name": "increment", "arguments": {"a": 2}}</tool_call>'
    (msg,), _, done = env.step(call)
    assert msg["content"] == "2" and env.instance.counter == 2 and not done
    (msg,), _, _ = env.step(call.replace("2}", '"2"}'))  # wrong-typed: the model reads why
    assert "is not of type 'integer'" in msg["content"] and env.instance.counter == 2
    assert env.step("done") == (None, None, True)
    assert env.counts == {"tool_calls": 1, "tool_errors": 0, "invalid_calls": 1}


def test_a_trl_style_tool_without_a_docstring_names_the_method():
    with pytest.raises(
        ConfigError, match=r"env.factory \(agent_env:Undocumented\): .*Undocumented.poke"
    ):
        make_factory(EnvConfig(factory="agent_env:Undocumented"), "hermes")


@pytest.mark.slow  # trains GRPO and evaluates: ~5-10 s
def test_a_trl_style_class_trains_with_grpo_and_is_evaluated(tmp_path, tiny_chat_lm):
    """Unmodified: the class and a reward function that reads ``environments`` (TRL's shape),
    through ``rlhfkit ppo`` with GRPO and then ``rlhfkit eval``."""
    cfg = agent_cfg(
        tmp_path, tiny_chat_lm, "env=agent_env:IncrementEnv", "reward_fn=agent_env:counter_reward",
        *GRPO_EPISODES,
        "rollout.max_total_tokens=32", "run.iterations=2",
    )  # fmt: skip
    final = run_ppo(cfg)
    rows = read_metrics(tmp_path / "ppo")
    assert len(rows) == 2 and all(math.isfinite(r["loss/policy"]) for r in rows)
    # every episode's instance was reset once, and the reward read it (counter >= 0)
    assert all(r["score/mean"] >= 1.0 for r in rows) and "env/tool_calls" in rows[0]
    held = tmp_path / "prompts.jsonl"
    ev = load_config(EvalRunConfig, None, [
        f"policy={final}", f"reference={tiny_chat_lm}", "env=agent_env:IncrementEnv",
        "reward_fn=agent_env:counter_reward", f"eval.prompts_file={held}", "max_new_tokens=6",
        "max_turns=2", "max_total_tokens=32", "eval.samples_per_prompt=2",
        f"output_dir={tmp_path / 'eval'}",
    ])  # fmt: skip
    result = run_eval(ev)
    # pass@k over episodes: every episode's reward read a reset instance (>= 1 = pass_score)
    assert result["policy"]["rm_score"] >= 1.0
    assert result["policy"]["pass@1"] == result["policy"]["pass@2"] == 1.0


def test_reward_servers_are_never_sent_the_environment_objects():
    from rlhfkit.rollout.columns import sendable

    cols = {"answer": ["1"], "environments": [agent_env.IncrementEnv()], "final_response": ["x"]}
    assert sendable(cols) == {"answer": ["1"], "final_response": ["x"]}


# --------------------------------------------------------------------------- OpenEnv

pytest.importorskip("openenv", reason="the envs extra (openenv-core) is in the dev install")


def _serve(app, path: str):
    """``app`` served by uvicorn on a free port of 127.0.0.1 in a thread: yields (its URL with
    ``path``, the server); stopped afterwards without waiting for open sessions."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}{path}", server
    server.should_exit = server.force_exit = True
    thread.join(timeout=10)


@pytest.fixture()
def openenv_server():
    """OpenEnv's own server (``create_app``) for the test environment."""
    from openenv.core.env_server.http_server import create_app
    from openenv_env import WordAction, WordGame, WordObservation

    app = create_app(WordGame, WordAction, WordObservation, max_concurrent_envs=64)
    yield from _serve(app, "")


def _word_game_run(tmp_path, lm, *where):
    cfg = agent_cfg(
        tmp_path, lm, *where, *GRPO_EPISODES, "rollout.max_total_tokens=32", "run.iterations=2",
    )  # fmt: skip
    final = run_ppo(cfg)
    return final, read_metrics(tmp_path / "ppo")


@pytest.mark.slow  # trains GRPO and evaluates: ~5-10 s
def test_an_openenv_environment_trains_in_process_and_its_rewards_are_the_goods(
    tmp_path, tiny_chat_lm
):
    """The class itself (``env: module:Class``): one instance per episode in this process, the
    model's text in the action's text field, reward and done read from the observation."""
    from openenv_env import WordGame

    from rlhfkit.envs.openenv import OpenEnvEpisode

    factory, name = make_factory(EnvConfig(factory="openenv_env:WordGame"), "hermes")
    env = factory()
    assert isinstance(env, OpenEnvEpisode) and isinstance(env.session.env, WordGame)
    assert env.reset({"prompt": "hi"}) == "hi\n\nsay good"  # the first observation's text
    assert env.step("good good bad") == ("say good", 2.0, False)
    assert env.step("good") == (None, 1.0, True)  # done after two turns
    final, rows = _word_game_run(tmp_path, tiny_chat_lm, "env=openenv_env:WordGame")
    assert len(rows) == 2 and all(math.isfinite(r["loss/policy"]) for r in rows)
    assert all(r["env/turns"] > 1 for r in rows)  # the env answered the first turn
    ev = load_config(EvalRunConfig, None, [
        f"policy={final}", f"reference={tiny_chat_lm}", "env=openenv_env:WordGame",
        f"eval.prompts_file={tmp_path / 'prompts.jsonl'}", "max_new_tokens=6", "max_turns=2",
        "max_total_tokens=32", "eval.samples_per_prompt=2", f"output_dir={tmp_path / 'eval'}",
    ])  # fmt: skip
    result = run_eval(ev)["policy"]
    for x in result["samples"]:  # the env's reward: the "good"s of the model's own turns
        model_text = re.sub(r"\[env: [^\]]*\]", " ", x["response"])
        assert x["rm"] == float(model_text.split().count("good")), x["response"]
    assert "pass@2" in result


@pytest.mark.slow  # trains GRPO and evaluates: ~5-10 s
def test_an_openenv_server_trains_over_its_websocket_and_is_evaluated(
    tmp_path, tiny_chat_lm, openenv_server
):
    url, _ = openenv_server
    final, rows = _word_game_run(tmp_path, tiny_chat_lm, f"env.url={url}")
    assert len(rows) == 2 and all(r["env/turns"] > 1 for r in rows)
    ev = load_config(EvalRunConfig, None, [
        f"policy={final}", f"reference={tiny_chat_lm}", f"env.url={url}",
        f"eval.prompts_file={tmp_path / 'prompts.jsonl'}", "max_new_tokens=6", "max_turns=2",
        "max_total_tokens=32", "eval.samples_per_prompt=2", "eval.pass_score=1",
        f"output_dir={tmp_path / 'eval'}",
    ])  # fmt: skip
    result = run_eval(ev)
    samples = result["policy"]["samples"]
    assert len(samples) == 2 * 6 and any("[env: " in x["response"] for x in samples)
    # each episode's reward, read from the server's observations, is the "good"s the model
    # wrote in its turns: recomputed from the trajectory with the env's turns left out
    for x in samples:
        model_text = re.sub(r"\[env: [^\]]*\]", " ", x["response"])
        assert x["rm"] == float(model_text.split().count("good")), x["response"]
    passed = [x["rm"] >= 1 for x in samples]
    assert result["policy"]["pass@1"] == pytest.approx(sum(passed) / len(passed))


def test_an_openenv_server_that_is_down_or_dies_is_an_error_naming_its_url(chat, openenv_server):
    """Down at start-up: a config error naming the URL, before any work. Dying mid-episode (the
    server really stops after the episodes' resets): an EnvError naming the URL and the step."""
    import time

    from agent_kit import items, sample_kw, settings

    from rlhfkit.envs import EnvError
    from rlhfkit.rollout.episodes import run_episodes

    url, server = openenv_server
    with pytest.raises(
        ConfigError, match=r"env.url: no OpenEnv server answers at http://127.0.0.1:1"
    ):
        make_factory(EnvConfig(url="http://127.0.0.1:1"), "hermes")
    factory, name = make_factory(EnvConfig(url=url), "hermes")

    class DiesAfterReset:  # the real session; the server is stopped once every episode began
        started = 0

        def __init__(self):
            self.env = factory()

        def reset(self, row):
            start = self.env.reset(row)
            DiesAfterReset.started += 1
            if DiesAfterReset.started == 2:
                server.should_exit = server.force_exit = True
                time.sleep(1.0)  # uvicorn drops its connections
            return start

        def step(self, text):
            return self.env.step(text)

    tok, policy = chat
    with pytest.raises(EnvError, match=rf"env {re.escape(url)}: step 1 for the prompt"):
        run_episodes(
            policy,
            tok,
            items(tok, 2),
            settings(DiesAfterReset, name=name, timeout=20),
            sample_kw(tok),
        )


@pytest.mark.slow  # OpenEnv's server and a 1.5 s step: ~9 s
@pytest.mark.parametrize(
    "game, error",
    [
        ("SlowGame", r"TimeoutError"),  # the client's message timeout is env.timeout
        ("BrokenGame", r"RuntimeError: Server error: 'dict' object has no attribute"),
    ],
)
def test_an_openenv_server_that_times_out_or_answers_no_observation_names_its_url(
    chat, game, error
):
    """Served by OpenEnv's own server: a step past ``env.timeout`` (0.5 s; the step takes 1.5 s), and a
    step whose environment returns a dict the server cannot send as an observation. Each is an
    EnvError naming the URL, the step and the prompt, raised once, not a hang."""
    import openenv_env
    from agent_kit import items, sample_kw, settings
    from openenv.core.env_server.http_server import create_app

    from rlhfkit.envs import EnvError
    from rlhfkit.rollout.episodes import run_episodes

    app = create_app(
        getattr(openenv_env, game), openenv_env.WordAction, openenv_env.WordObservation,
        max_concurrent_envs=8,
    )  # fmt: skip
    served = _serve(app, "")
    url, _ = next(served)
    factory, name = make_factory(EnvConfig(url=url, timeout=0.5), "hermes")
    tok, policy = chat
    try:
        with pytest.raises(
            EnvError, match=rf"env {re.escape(url)}: step 1 for the prompt .*{error}"
        ):
            run_episodes(
                policy, tok, items(tok, 2), settings(factory, name=name, timeout=0.5),
                sample_kw(tok),
            )  # fmt: skip
    finally:
        next(served, None)


def test_an_openenv_action_without_one_text_field_is_a_config_error():
    with pytest.raises(
        ConfigError,
        match=r"env.factory \(openenv_env:NoTextAction\): the action 'TwoFields' needs exactly one",
    ):
        make_factory(EnvConfig(factory="openenv_env:NoTextAction"), "hermes")


# --------------------------------------------------------------------------- MCP tool servers

MCP_COMMAND = f"{sys.executable} {Path(__file__).parent / 'mcp_server.py'}"


def test_an_mcp_servers_tools_are_the_models_tools_with_errors_and_timeouts_counted():
    """stdio: the server started as a command. Schemas from MCP, calls answered by the server,
    arguments checked against MCP's schema, the server's own errors and the per-call timeout
    turned into messages the model reads, all counted as for Python tools."""
    # 3 s: the server's error path once took over 1 s on a loaded 2-core machine (session 15)
    factory, name = make_factory(EnvConfig(mcp=[MCP_COMMAND], tool_timeout=3.0), "hermes")
    env = factory()
    assert name == f"ToolEnv({MCP_COMMAND})"
    by_name = {t["function"]["name"]: t["function"] for t in env.tools}
    assert sorted(by_name) == ["add", "divide", "wait"] and by_name["add"]["description"]
    assert by_name["add"]["parameters"]["properties"]["a"]["type"] == "integer"
    call = '<tool_call>{{"name": "{}", "arguments": {}}}</tool_call>'
    (msg,), _, _ = env.step(call.format("add", '{"a": 2, "b": 3}'))
    assert msg["content"] == "5"
    (msg,), _, _ = env.step(call.format("add", '{"a": "2", "b": 3}'))  # checked before the call
    assert "'2' is not of type 'integer'" in msg["content"]
    (msg,), _, _ = env.step(call.format("divide", '{"a": 1, "b": 0}'))
    assert msg["content"].startswith("error: divide raised RuntimeError: the MCP server")
    assert "answered an error: Error executing tool divide" in msg["content"]
    (msg,), _, _ = env.step(call.format("wait", '{"seconds": 30}'))
    assert msg["content"] == "error: wait timed out after 3 s"
    assert env.counts == {"tool_calls": 3, "tool_errors": 2, "invalid_calls": 1}


def test_an_unreachable_mcp_server_is_a_config_error_naming_it():
    with pytest.raises(
        ConfigError, match=r"env.mcp\[0\]: cannot connect to the MCP server http://127.0.0.1:1/mcp"
    ):
        make_factory(EnvConfig(mcp=["http://127.0.0.1:1/mcp"]), "hermes")


def _assert_tool_env_evaluates(tmp_path, lm, final, where: str) -> None:
    """``rlhfkit eval`` of a trained tool-env policy: 6 prompts x 2 episodes, pass@1 their
    mean of the checker's 0/1 verdicts."""
    ev = load_config(EvalRunConfig, None, [
        f"policy={final}", f"reference={lm}", where,
        "reward_fn=agent_env:counter_free", f"eval.prompts_file={tmp_path / 'prompts.jsonl'}",
        "max_new_tokens=6", "max_turns=2", "max_total_tokens=48", "eval.samples_per_prompt=2",
        f"output_dir={tmp_path / 'eval'}",
    ])  # fmt: skip
    result = run_eval(ev)["policy"]
    passed = [x["rm"] >= 1 for x in result["samples"]]  # pass@k over episodes, n = 2
    assert len(passed) == 12 and result["pass@1"] == pytest.approx(sum(passed) / len(passed))


@pytest.fixture()
def mcp_http():
    """The same server over Streamable HTTP, on a free port of 127.0.0.1 in a thread."""
    import mcp_server

    yield from _serve(mcp_server.app(), "/mcp")


@pytest.mark.slow  # trains GRPO and evaluates: ~5-10 s
def test_an_mcp_server_over_http_trains_with_grpo_is_evaluated_and_may_die(
    tmp_path, tiny_chat_lm, mcp_http
):
    url, server = mcp_http
    cfg = agent_cfg(
        tmp_path, tiny_chat_lm, f"env.mcp=[{url}]", "reward_fn=agent_env:counter_free",
        *GRPO_EPISODES,
        "rollout.max_total_tokens=48", "run.iterations=2",
    )  # fmt: skip
    final = run_ppo(cfg)
    rows = read_metrics(tmp_path / "ppo")
    assert len(rows) == 2 and all(math.isfinite(r["loss/policy"]) for r in rows)
    assert all("env/tool_calls" in r and "env/invalid_calls" in r for r in rows)
    _assert_tool_env_evaluates(tmp_path, tiny_chat_lm, final, f"env.mcp=[{url}]")
    # the server dies: a call is an error message for the model, naming the server; no crash
    factory, _ = make_factory(EnvConfig(mcp=[url], tool_timeout=5.0), "hermes")
    env = factory()
    server.should_exit = server.force_exit = True
    import time

    time.sleep(1.0)
    (msg,), _, _ = env.step('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    assert msg["content"].startswith("error: add ") and url in msg["content"], msg["content"]
    assert env.counts["tool_errors"] == 1


@pytest.fixture()
def calc_server():
    """OpenEnv's own server for an ``MCPEnvironment``, as OpenEnv's MCP examples serve one: the
    action is ``CallToolAction``."""
    from openenv.core.env_server.http_server import create_app
    from openenv.core.env_server.mcp_types import CallToolAction, CallToolObservation
    from openenv_env import CalcEnv

    app = create_app(CalcEnv, CallToolAction, CallToolObservation, max_concurrent_envs=64)
    yield from _serve(app, "")


@pytest.mark.slow  # trains GRPO and evaluates: ~5-10 s each
@pytest.mark.parametrize("served", [False, True], ids=["in-process", "over-http"])
def test_an_openenv_mcp_environments_tools_are_the_models_tools(
    tmp_path, tiny_chat_lm, request, served
):
    """Issue 34: an OpenEnv environment that serves its tools over MCP (ListToolsAction /
    CallToolAction), the class in this process or OpenEnv's server over its WebSocket: the tools
    are the model's, with MCP's schemas; calls run through ToolEnv; it trains and is evaluated."""
    from rlhfkit.envs.openenv import MCPToolsEpisode

    if served:
        url = request.getfixturevalue("calc_server")[0]
        where, env_cfg = f"env.url={url}", EnvConfig(url=url)
    else:
        where, env_cfg = "env=openenv_env:CalcEnv", EnvConfig(factory="openenv_env:CalcEnv")
    factory, _ = make_factory(env_cfg, "hermes")
    env = factory()
    assert isinstance(env, MCPToolsEpisode)
    assert type(env.session).__name__ == ("_RemoteMCP" if served else "_LocalMCP")
    (tool,) = env.tools
    assert tool["function"]["name"] == "add"
    assert tool["function"]["parameters"]["required"] == ["a", "b"]
    assert env.reset({"prompt": "what is 2 + 3"}) == "what is 2 + 3"
    call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    ([msg], reward, done) = env.step(call)
    assert msg["content"] == "5" and reward == 0.0 and not done
    ([msg], _, _) = env.step(call.replace("2,", '"x",'))  # checked against MCP's schema
    assert "'x' is not of type 'integer'" in msg["content"]
    ([msg], _, _) = env.step(call.replace("add", "sub"))  # a name the model made up
    assert "'sub'" in msg["content"] and msg["content"].startswith("error")
    assert env.step("it is 5") == (None, 0.0, True)  # no call: the final answer
    assert env.counts == {"tool_calls": 1, "tool_errors": 0, "invalid_calls": 2}
    env.close()
    cfg = agent_cfg(
        tmp_path, tiny_chat_lm, where, "reward_fn=agent_env:counter_free", *GRPO_EPISODES,
        "rollout.max_total_tokens=48", "run.iterations=1",
    )  # fmt: skip
    final = run_ppo(cfg)
    (row,) = read_metrics(tmp_path / "ppo")
    assert math.isfinite(row["loss/policy"]) and "env/tool_calls" in row
    _assert_tool_env_evaluates(tmp_path, tiny_chat_lm, final, where)
