"""Environments written for other libraries, run unmodified (issue 34). A TRL-style class
(``GRPOTrainer(environment_factory=...)``): its methods become tools, ``reset`` starts the
episode, reward functions read the instances; it trains with GRPO and is evaluated by
``rlhfkit eval``."""

from __future__ import annotations

import math

import agent_env
import pytest
from agent_kit import agent_cfg

from rlhfkit.config import ConfigError, EvalRunConfig, load_config
from rlhfkit.envs import TRLEnv, make_factory
from rlhfkit.stages.evaluate import run_eval
from rlhfkit.stages.ppo import run_ppo
from rlhfkit.train.logger import read_metrics


def test_a_trl_style_class_becomes_our_environment_with_its_methods_as_tools():
    factory, name = make_factory("agent_env:IncrementEnv", [], "hermes", 5.0)
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
        make_factory("agent_env:Undocumented", [], "hermes", 5.0)


def test_a_trl_style_class_trains_with_grpo_and_is_evaluated(tmp_path, tiny_chat_lm):
    """Unmodified: the class and a reward function that reads ``environments`` (TRL's shape),
    through ``rlhfkit ppo`` with GRPO and then ``rlhfkit eval``."""
    cfg = agent_cfg(
        tmp_path, tiny_chat_lm, "env=agent_env:IncrementEnv", "reward_fn=agent_env:counter_reward",
        "ppo.estimator=grpo", "rollout.samples_per_prompt=4", "rollout.max_turns=2",
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
