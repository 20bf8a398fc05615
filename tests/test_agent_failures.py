"""Agents (issues 22, 36): what goes wrong in an episode and what the run does about it. An env
that raises, times out or answers what is not a step is an error naming the env, the step and the
prompt, or with ``env.on_error: skip`` a dropped episode that is never scored nor trained on;
long observations are cut; settings an episode cannot serve are config errors."""

from __future__ import annotations

import math

import agent_env
import pytest
import torch
from agent_kit import EosBoost, OneStep, agent_cfg, items, sample_kw, settings

from rlhfkit.config import ConfigError, PPOConfig, load_config
from rlhfkit.data.build import load_prompts
from rlhfkit.envs import EnvError, as_step
from rlhfkit.rl.update import advantages, rl_update
from rlhfkit.rollout.collect import ScoreNormalizer
from rlhfkit.rollout.episodes import (
    cap_observation,
    run_episodes,
)
from rlhfkit.stages.ppo import load_models, run_ppo
from rlhfkit.train.logger import read_metrics


class Raises:
    def reset(self, row):
        if row["id"] == 2:
            raise KeyError("task 2 is missing")
        return row["prompt"]

    def step(self, text):
        return None, 1.0, True


class Stuck(OneStep):
    """A step that does not return until the test releases it."""

    release = None  # a threading.Event, set by the test

    def step(self, text):
        Stuck.release.wait(60)
        return None, 1.0, True


class NumberObservation(OneStep):
    def step(self, text):
        return 42, 0.0, False


class NanReward(OneStep):
    def step(self, text):
        return None, math.nan, True


def test_an_env_that_raises_names_the_env_and_the_prompt(chat):
    tok, policy = chat
    with pytest.raises(
        EnvError, match=r"env test-env: reset for the prompt \(p.jsonl:3\) 'say green :': KeyError"
    ):
        run_episodes(policy, tok, items(tok), settings(Raises), sample_kw(tok))


def test_on_error_skip_drops_the_episode_and_counts_it(chat):
    tok, policy = chat
    ep = run_episodes(policy, tok, items(tok), settings(Raises, on_error="skip"), sample_kw(tok))
    assert ep.counts["skipped"] == 1 and ep.skipped.tolist() == [False, False, True, False]
    assert not ep.action_mask[2].any() and ep.action_mask[[0, 1, 3]].any(1).all()
    assert ep.env_reward == [1.0, 1.0, 0.0, 1.0]


def test_skipped_episodes_through_the_update(tmp_path, tiny_chat_lm):
    """Issue 36: with env.on_error: skip, a skipped episode's placeholder score entered the
    running normaliser, and dynamic sampling could cut a group in half. Through collect, the
    advantages, the update and the metrics: skipped rows are never scored, stay with the group
    they were sampled in (every group of the buffer has n rows), get no advantage, and are left
    out of the normaliser and of score/mean."""
    from rlhfkit.rl.metrics import rollout_metrics
    from rlhfkit.rollout.collect import PromptStream, collect, parent_groups

    cfg = agent_cfg(
        tmp_path, tiny_chat_lm, "env=agent_env:make_skips_some", "env.on_error=skip",
        "rollout.max_turns=2", "rollout.max_total_tokens=32", "ppo.estimator=grpo",
        "rollout.samples_per_prompt=4", "rollout.filter_groups=true", "ppo.reward_norm=running",
    )  # fmt: skip
    scored = []

    def reward(prompts, responses):
        scored.append(len(responses))
        return agent_env.hash_reward(prompts, responses)

    torch.manual_seed(0)
    models = load_models(cfg, None, reward)
    prompts, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    norm = ScoreNormalizer("running", None, 0.0)
    exp, t = collect(models, prompts, PromptStream(len(prompts), 0), cfg, norm)
    skipped = exp.group < 0
    assert t.env["skipped"] > 0 and skipped.any()
    assert sum(scored) == t.episodes - t.env["skipped"]  # a skipped episode is never scored
    assert norm.running.count == t.episodes - t.env["skipped"]
    _, sizes = torch.unique(parent_groups(exp.group, 4), return_counts=True)
    assert (sizes == 4).all()  # whole groups, skipped rows included
    assert not exp.loss_mask[skipped].any() and (exp.raw_scores[skipped] == 0).all()
    advantages(exp, 0.0, cfg.ppo)
    assert (exp.advantages[skipped] == 0).all()
    stats = rl_update(models.learner, exp, cfg, 0.0, True)
    assert math.isfinite(stats["loss/policy"])
    m = rollout_metrics(exp, t, 0.0, 0, 1.0, 1.0)
    assert m["score/mean"] == pytest.approx(float(exp.raw_scores[~skipped].mean()))
    assert m["response/length"] == pytest.approx(float(exp.loss_mask.sum()) / len(exp))
    env_tokens = float((exp.response_mask & ~exp.loss_mask).sum())
    assert env_tokens > 0 and m["response/env_length"] == pytest.approx(env_tokens / len(exp))


def test_a_step_past_its_timeout_is_an_error_at_once(chat):
    """The error comes while the stuck step is still running: the rollout does not wait for
    its thread (a step that never returns would otherwise hang the run)."""
    import threading

    tok, policy = chat
    Stuck.release = threading.Event()
    try:
        with pytest.raises(EnvError, match="step 1 .* TimeoutError: no answer within 0.2 s"):
            run_episodes(policy, tok, items(tok, 2), settings(Stuck, timeout=0.2), sample_kw(tok))
        stuck = [t for t in threading.enumerate() if t.name.startswith("rlhfkit-env")]
        assert stuck and all(t.is_alive() for t in stuck)  # still inside step()
    finally:
        Stuck.release.set()


def test_a_non_text_observation_is_an_error_said_once_with_its_type(chat):
    """Issue 36: the message used to wrap itself ("env x: step 1 ...: EnvError: env x: step 1
    ..."); it now names the env, the step, the prompt and the type returned, once."""
    tok, policy = chat
    with pytest.raises(EnvError) as e:
        run_episodes(policy, tok, items(tok, 1), settings(NumberObservation), sample_kw(tok))
    msg = str(e.value)
    assert msg.startswith("env test-env: step 1 for the prompt (p.jsonl:1) 'say red :'")
    assert "observation must be a string or chat messages" in msg and "got int: '42'" in msg
    assert msg.count("env test-env") == 1 and "EnvError" not in msg


class LongObservation(OneStep):
    """Answers every turn with a 5,000-character tool output, for two turns."""

    def __init__(self):
        self.n = 0

    def step(self, text):
        self.n += 1
        return {"role": "tool", "content": "good " * 1000}, 0.0, self.n >= 2


def test_a_long_observation_is_cut_with_a_marker_and_counted(chat):
    """Issue 36: a long tool output ended the episode as truncated and the model never read it;
    it is now cut to env.max_observation_chars with a marker, and the episode goes on."""
    tok, policy = chat
    boosted = EosBoost(policy, tok.eos_token_id, bias=20.0)  # every turn ends at once
    cfg = settings(LongObservation, max_total_tokens=400, max_observation_chars=30)
    torch.manual_seed(0)
    ep = run_episodes(boosted, tok, items(tok, 2), cfg, sample_kw(tok))
    assert ep.counts["observations_cut"] == 2 and ep.counts["truncated"] == 0
    good = tok.convert_tokens_to_ids("good")
    env_tokens = ep.gen.tokens[0][~ep.action_mask[0]][: int(ep.gen.lengths[0])]
    assert int((env_tokens == good).sum()) == 6  # "good " x 6 = the first 30 characters
    counts = {"observations_cut": 0}
    (msg,) = cap_observation([{"role": "tool", "content": "good " * 1000}], 30, counts)
    assert msg == {"role": "tool", "content": "good " * 6 + "... [cut 4970 characters]"}
    assert counts == {"observations_cut": 1}
    uncut = settings(LongObservation, max_total_tokens=400, max_observation_chars=0)
    ep = run_episodes(boosted, tok, items(tok, 2), uncut, sample_kw(tok))
    assert ep.counts["truncated"] == 2 and ep.counts["observations_cut"] == 0  # never read


def test_a_non_finite_env_reward_reaches_the_guard(tmp_path, tiny_chat_lm):
    cfg = agent_cfg(tmp_path, tiny_chat_lm, "env=agent_env:make_nan", "run.iterations=1")
    run_ppo(cfg)
    (row,) = read_metrics(tmp_path / "ppo")
    assert row["nonfinite/skipped"] == 1 and math.isnan(row["score/mean"])


def test_openenv_style_results_are_accepted():
    class Obs:  # an OpenEnv observation: reward and done on the observation itself
        done, reward = True, 2.0

    class StepResult:  # an OpenEnv client's result
        observation, reward, done = "next", None, False

    assert as_step(Obs(), "w") == (None, 2.0, True)
    assert as_step(StepResult(), "w") == ([{"role": "user", "content": "next"}], 0.0, False)
    with pytest.raises(EnvError, match="w: step returned int"):
        as_step(3, "w")


def test_env_config_keys_are_checked(tmp_path, tiny_lm):
    with pytest.raises(
        ConfigError, match="rollout.max_turns: more than one turn needs an environment"
    ):
        agent_cfg(tmp_path, tiny_lm, "reward_fn=a:b", "rollout.max_turns=2")
    with pytest.raises(ConfigError, match="env.factory / env.tools: set only one"):
        agent_cfg(tmp_path, tiny_lm, "env.factory=a:b", "env.tools=[a:c]")
    with pytest.raises(ConfigError, match="max_total_tokens \\(4\\) must be >= "):
        agent_cfg(tmp_path, tiny_lm, "env=a:b", "rollout.max_total_tokens=4")
    cfg = agent_cfg(tmp_path, tiny_lm, "env=tests_env:make")  # the shorthand
    assert cfg.env.factory == "tests_env:make" and cfg.has_reward()
    cfg = agent_cfg(tmp_path, tiny_lm, "env=tests_env:make", "env.timeout=5")  # and sub-keys
    assert cfg.env.factory == "tests_env:make" and cfg.env.timeout == 5
    (tmp_path / "c.yaml").write_text("env: tests_env:make\n")  # a YAML shorthand, then a key
    cfg = load_config(PPOConfig, tmp_path / "c.yaml", ["env.on_error=skip"])
    assert cfg.env.factory == "tests_env:make" and cfg.env.on_error == "skip"
    with pytest.raises(ConfigError, match="'ppo.gamma' is not a section"):
        agent_cfg(tmp_path, tiny_lm, "env=a:b", "ppo.gamma=1", "ppo.gamma.x=2")


def test_settings_an_episode_cannot_serve_are_config_errors(tmp_path, tiny_lm):
    """Issue 36: a turn that ends on a stop string has no end-of-turn token before the env's
    turn (the context would not match the chat template), and ignore_eos silently gave
    one-turn episodes: both are rejected when the config loads."""
    with pytest.raises(ConfigError, match="rollout.stop_strings: a turn that ends on a stop"):
        agent_cfg(tmp_path, tiny_lm, "env=a:b", "rollout.stop_strings=[END]")
    with pytest.raises(ConfigError, match="rollout.ignore_eos: with an env every model turn"):
        agent_cfg(tmp_path, tiny_lm, "env=a:b", "rollout.ignore_eos=true")
    cfg = agent_cfg(tmp_path, tiny_lm, "rollout.stop_strings=[END]", "rollout.ignore_eos=true")
    assert cfg.rollout.stop_strings == ["END"]  # single turn: both still allowed


def test_null_unsets_a_presets_key_and_says_which_keys_it_cannot_unset(tmp_path, tiny_lm):
    """Issue 36: reward_model=null gave "expected a string, got None"."""
    (tmp_path / "preset.yaml").write_text(
        "reward_model: runs/rm/final\nrollout:\n  stop_strings: [x]\n"
    )
    cfg = load_config(
        PPOConfig,
        tmp_path / "preset.yaml",
        ["reward_model=null", "reward_fn=a:b", "rollout.stop_strings=~"],
    )
    assert cfg.reward_model == "" and cfg.reward_fn == "a:b" and cfg.rollout.stop_strings == []
    with pytest.raises(
        ConfigError,
        match=r"ppo.kl_coef: null unsets only keys that can be empty; .*default is 0.05",
    ):
        load_config(PPOConfig, None, ["ppo.kl_coef=null"])
