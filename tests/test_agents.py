"""Agents (issue 22): environments, tools and multi-turn episodes on the RL core.

The contract tested here: the model's tokens are kept as sampled and the environment's are the
chat template's delta; only the model's tokens get a loss, a KL or an entropy term; the
estimators run over the model's tokens with the environment's transparent; a single-turn
environment is exactly today's rollout and update."""

from __future__ import annotations

import dataclasses
import math
import time

import agent_env
import pytest
import torch
from conftest import COLORS, write_jsonl

from rlhfkit.algos import ESTIMATORS, gae_advantages, pack_left, unpack
from rlhfkit.config import ConfigError, PPOConfig, load_config
from rlhfkit.data.build import PromptItem, load_prompts
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.envs import EnvError, ToolEnv, as_step, tool_schemas
from rlhfkit.envs.tools import InvalidCall, parse_hermes
from rlhfkit.rl.update import advantages, micro_step, minibatch_denominator, rl_update
from rlhfkit.rollout.collect import ScoreNormalizer, SingleTurn, rollout_chunk
from rlhfkit.rollout.episodes import (
    EnvSettings,
    MultiTurn,
    cap_observation,
    observation_ids,
    run_episodes,
)
from rlhfkit.rollout.experience import Experience
from rlhfkit.rollout.forward import join, policy_logprobs
from rlhfkit.stages.ppo import load_models, run_ppo
from rlhfkit.train.logger import read_metrics


def count_good(prompts, responses):
    return [float(r.split().count("good")) for r in responses]


# --------------------------------------------------------------------------- test environments


class OneStep:
    """A single-turn environment: the row's prompt, then done with no reward."""

    def reset(self, row):
        return row["prompt"]

    def step(self, text):
        return None, None, True


class Echo(agent_env.Echo):
    turns = 3


def settings(factory, **kw) -> EnvSettings:
    base = dict(
        factory=factory, name="test-env", max_turns=3, max_new_tokens=6, max_total_tokens=40,
        max_prompt_length=16,
    )  # fmt: skip
    return EnvSettings(**{**base, **kw})


SAMPLE = dict(eos_id=None, pad_id=0, temperature=1.0, top_k=0, top_p=1.0, stop_sequences=[])


def items(tok, n=4) -> list[PromptItem]:
    texts = [f"say {c} :" for c in COLORS[:n]]
    return [
        PromptItem(encode_prompt(tok, t), t, {"id": i}, f"p.jsonl:{i + 1}")
        for i, t in enumerate(texts)
    ]


@pytest.fixture(scope="module")
def chat(tiny_chat_lm):
    from rlhfkit.config import ModelConfig
    from rlhfkit.models import load_policy, load_tokenizer

    mc = ModelConfig(name_or_path=str(tiny_chat_lm))
    tok = load_tokenizer(mc)
    return tok, load_policy(mc, tok, trainable=False)


def sample_kw(tok, eos=True):
    return {**SAMPLE, "eos_id": tok.eos_token_id if eos else None, "pad_id": tok.pad_token_id}


# --------------------------------------------------------------------------- tools


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
    assert obs == [{"role": "tool", "name": "multiply", "content": "12"}] and not done
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


# --------------------------------------------------------------------------- trajectories


def test_observation_delta_continues_the_chat_template_exactly(chat):
    tok, _ = chat
    user = [{"role": "user", "content": "say red :"}]
    reply = tok("red good", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    obs = [{"role": "user", "content": "say good"}]
    delta = observation_ids(tok, obs, None)
    full = encode_prompt(tok, user + [{"role": "assistant", "content": "red good"}] + obs)
    assert encode_prompt(tok, user) + reply + delta == full


class EosBoost(torch.nn.Module):
    """The tiny policy with its EOS logit raised by ``bias``: turns end early and often (a
    random-init model rarely ends a turn), so episodes have several turns."""

    def __init__(self, model, eos: int, bias: float = 3.0):
        super().__init__()
        self.m, self.eos, self.bias, self.config = model, eos, bias, model.config

    def forward(self, **kw):
        out = self.m(**kw)
        out.logits[..., self.eos] += self.bias
        return out


def runs(act: list[bool]) -> list[tuple[bool, int, int]]:
    """(is the model's, start, end) of each run of equal values."""
    out, start = [], 0
    for j in range(1, len(act) + 1):
        if j == len(act) or act[j] != act[start]:
            out.append((act[start], start, j))
            start = j
    return out


def test_episodes_keep_sampled_tokens_and_mark_the_environment_turns(chat):
    tok, policy = chat
    boosted = EosBoost(policy, tok.eos_token_id)
    torch.manual_seed(0)
    ep = run_episodes(boosted, tok, items(tok), settings(Echo), sample_kw(tok))
    delta = observation_ids(tok, [{"role": "user", "content": "say good"}], None)
    turns = 0
    for i in range(4):
        n = int(ep.gen.lengths[i])
        toks, act = ep.gen.tokens[i, :n].tolist(), ep.action_mask[i, :n].tolist()
        segments = runs(act)
        model = [(a, b) for mine, a, b in segments if mine]
        turns += len(model)
        assert 1 <= len(model) <= 3 and segments[0][0] and segments[-1][0]
        for mine, a, b in segments:
            if not mine:  # the environment's turn: exactly the template's delta
                assert toks[a:b] == delta
        for _, b in model[:-1]:  # every model turn the env answered ended on EOS
            assert toks[b - 1] == tok.eos_token_id
        # stopped: the env said done (3rd turn) after a turn that ended on EOS
        clean = len(model) == 3 and toks[-1] == tok.eos_token_id
        assert bool(ep.gen.stopped[i]) == clean
    assert turns > 4, "some episodes need more than one turn"
    assert ep.counts["turns"] == turns
    # the sampler's logprobs are the model's: a fresh forward over the whole row agrees
    seq = join(ep.prompt_ids, ep.prompt_mask, ep.gen.tokens, ep.gen.mask)
    logp, _ = policy_logprobs(boosted, seq, 1.0)
    m = ep.action_mask
    torch.testing.assert_close(logp[m], ep.gen.logprobs[m], rtol=0, atol=1e-5)
    # the env's reward is the sum over the episode: "good"s in the model's turns
    for i in range(4):
        n = int(ep.gen.lengths[i])
        own = ep.gen.tokens[i, :n][ep.action_mask[i, :n]]
        assert ep.env_reward[i] == float((own == tok.convert_tokens_to_ids("good")).sum())


def test_total_token_budget_truncates_and_counts(chat):
    tok, policy = chat
    boosted = EosBoost(policy, tok.eos_token_id)
    torch.manual_seed(0)
    full = run_episodes(boosted, tok, items(tok), settings(Echo), sample_kw(tok))
    torch.manual_seed(0)
    cap = int(full.gen.lengths.min()) - 1  # every episode needs more than this
    ep = run_episodes(
        boosted, tok, items(tok), settings(Echo, max_total_tokens=cap), sample_kw(tok)
    )
    assert int(ep.gen.lengths.max()) <= cap and ep.counts["truncated"] == 4
    assert not ep.gen.stopped.any()


# --------------------------------------------------------------------------- the contract


def gae_over_actions_f64(rewards, values, action, gamma, lam):
    """GAE written from docs/algorithms.md's contract, in float64, one row at a time: the
    recursion steps over the model's tokens only (t -> the next model token), the environment's
    tokens get 0 and are skipped."""
    out_a = torch.zeros_like(rewards, dtype=torch.float64)
    out_r = torch.zeros_like(out_a)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if action[b, t]]
        running = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            v_next = float(values[b, idx[k + 1]]) if k + 1 < len(idx) else 0.0
            delta = float(rewards[b, t]) + gamma * v_next - float(values[b, t])
            running = delta + gamma * lam * running
            out_a[b, t] = running
            out_r[b, t] = running + float(values[b, t])
    return out_a, out_r


def holes_mask(b=5, t=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    act = torch.rand(b, t, generator=g) < 0.6
    act[:, 0] = True
    act[1, 9:] = False  # right padding after the last model token
    return act


def test_pack_left_round_trips_and_is_the_identity_on_a_right_padded_mask():
    act = holes_mask()
    x = torch.randn(act.shape, dtype=torch.float64)
    packed, pm, order = pack_left(x, act)
    assert torch.equal(pm.sum(1), act.sum(1))
    assert torch.equal(unpack(packed, order), torch.where(act, x, 0.0))
    right = torch.arange(14)[None] < torch.tensor([[14], [3], [0], [7]])
    same, _, _ = pack_left(x[:4], right)
    assert torch.equal(same, torch.where(right, x[:4], 0.0))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_runs_over_the_model_tokens_with_the_environment_transparent(gamma, lam):
    act = holes_mask()
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(act.shape, generator=g, dtype=torch.float64)
    values = torch.randn(act.shape, generator=g, dtype=torch.float64)
    r, m, order = pack_left(rewards, act)
    v, _, _ = pack_left(values, act)
    adv, ret = gae_advantages(r, v, m, gamma, lam)
    ref_a, ref_r = gae_over_actions_f64(rewards, values, act, gamma, lam)
    torch.testing.assert_close(unpack(adv, order), ref_a, rtol=0, atol=1e-12)
    torch.testing.assert_close(unpack(ret, order), ref_r, rtol=0, atol=1e-12)


def fake_episode_buffer(critic: bool, seed=0) -> Experience:
    """A buffer of 5 episodes with holes in the action mask (environment turns) and garbage
    anywhere a model did not act."""
    g = torch.Generator().manual_seed(seed)
    act = holes_mask(seed=seed)
    real = act | (torch.arange(14)[None] < torch.tensor([[14], [12], [14], [10], [13]]))
    rnd = lambda: torch.randn(act.shape, generator=g)  # noqa: E731
    return Experience(
        prompt_ids=torch.ones(5, 2, dtype=torch.long),
        prompt_mask=torch.ones(5, 2, dtype=torch.long),
        response=torch.ones(5, 14, dtype=torch.long),
        response_mask=real,
        logprobs=rnd() - 2,
        ref_logprobs=rnd() - 2,
        values=rnd() if critic else None,
        scores=torch.randn(5, generator=g),
        raw_scores=torch.zeros(5),
        stopped=torch.ones(5, dtype=torch.bool),
        group=torch.tensor([0, 0, 1, 1, 1]),
        action_mask=act,
    )


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_every_estimator_sees_only_the_model_tokens(estimator):
    """The environment's tokens: no reward, advantage or return; R_final at the model's last
    token; and the result is the estimator's on the model's tokens alone (packed), so garbage
    in the environment's positions changes nothing."""
    est = ESTIMATORS[estimator]
    cfg = load_config(
        PPOConfig,
        None,
        [f"ppo.estimator={estimator}", "ppo.kl_coef=0.1", "rollout.samples_per_prompt=2"],
    )
    exp = fake_episode_buffer(est.needs_values)
    advantages(exp, 0.1, cfg.ppo)
    env = exp.response_mask & ~exp.action_mask
    for x in (exp.rewards, exp.advantages, exp.returns):
        assert (x[env] == 0).all()
    last = exp.action_mask.long().cumsum(1).argmax(1)  # the model's last token
    kl = exp.logprobs - exp.ref_logprobs
    torch.testing.assert_close(
        exp.rewards[torch.arange(5), last], exp.scores - 0.1 * kl[torch.arange(5), last]
    )
    dirty = fake_episode_buffer(est.needs_values)
    junk = torch.full(env.shape, 1e3)
    dirty.logprobs = torch.where(env, junk, dirty.logprobs)
    dirty.ref_logprobs = torch.where(env, -junk, dirty.ref_logprobs)
    if dirty.values is not None:
        dirty.values = torch.where(env, junk, dirty.values)
    advantages(dirty, 0.1, cfg.ppo)
    for a, b in ((exp.advantages, dirty.advantages), (exp.returns, dirty.returns)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------- the update


def agent_cfg(tmp_path, lm, *extra):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {c} :"} for c in COLORS])
    return load_config(
        PPOConfig,
        None,
        [
            f"model.name_or_path={lm}",
            f"data.train_file={prompts}",
            "data.max_prompt_length=16",
            f"run.output_dir={tmp_path / 'ppo'}",
            "rollout.episodes_per_iteration=16",
            "rollout.chunk_size=16",
            "rollout.max_new_tokens=6",
            "ppo.minibatch_size=8",
            "ppo.micro_batch_size=4",
            "ppo.epochs=1",
            "actor.lr=1e-2",
            "critic.lr=1e-2",
            "ppo.reward_norm=none",
            "log.tensorboard=false",
            "run.sample_every=0",
            *extra,
        ],
    )


def _rollout_and_update(cfg, sampler, reward):
    torch.manual_seed(0)
    models = load_models(cfg, None, reward)
    models = dataclasses.replace(models, sampler=sampler)
    prompts, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    n = cfg.rollout.samples_per_prompt
    chosen = [prompts[i % len(prompts)] for i in range(16 // n) for _ in range(n)]
    group = torch.arange(16 // n).repeat_interleave(n)
    torch.manual_seed(1)
    models.actor.eval()
    exp, _ = rollout_chunk(models, chosen, group, cfg, ScoreNormalizer("none", None, 0))
    models.actor.train()
    stats = advantages(exp, cfg.ppo.kl_coef, cfg.ppo)
    torch.manual_seed(2)
    stats.update(rl_update(models.learner, exp, cfg, cfg.ppo.kl_coef, True))
    return exp, stats, [p.detach().clone() for p in models.actor.parameters()]


@pytest.mark.parametrize(
    "extra",
    [
        ["ppo.estimator=gae"],
        ["ppo.estimator=grpo", "rollout.samples_per_prompt=4", "ppo.kl_in=loss"],
    ],
)
def test_a_single_turn_environment_is_todays_rollout_and_update(tmp_path, tiny_lm, extra):
    cfg = agent_cfg(tmp_path, tiny_lm, *extra, "ppo.ent_coef=0.01")
    old_exp, old_stats, old_w = _rollout_and_update(cfg, SingleTurn(), count_good)
    env = MultiTurn(settings(OneStep, max_turns=1, max_total_tokens=6))
    new_exp, new_stats, new_w = _rollout_and_update(cfg, env, count_good)
    for f in dataclasses.fields(Experience):
        a, b = getattr(old_exp, f.name), getattr(new_exp, f.name)
        if f.name == "action_mask":
            assert a is None and torch.equal(b, old_exp.response_mask)
        elif a is None:
            assert b is None, f.name
        else:
            assert torch.equal(a, b), f.name
    assert old_stats == new_stats
    for a, b in zip(old_w, new_w, strict=True):
        assert torch.equal(a, b)


def _loss_and_grads(models, exp, cfg):
    models.actor.zero_grad(set_to_none=True)
    denom = minibatch_denominator(exp, cfg.ppo.loss_aggregation(), cfg.token_budget())
    stats = micro_step(models.learner, exp, cfg.ppo, 1.0, 0.1, True, denom)
    grads = [p.grad.clone() for p in models.learner.actor.parameters() if p.grad is not None]
    return stats, grads


def episode_buffer(tmp_path, lm, *extra):
    cfg = agent_cfg(tmp_path, lm, "ppo.kl_in=loss", "ppo.ent_coef=0.1", *extra)
    torch.manual_seed(0)
    models = load_models(cfg, None, count_good)
    models = dataclasses.replace(models, sampler=MultiTurn(settings(Echo)))
    prompts, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    exp, _ = rollout_chunk(
        models, prompts[:4] * 2, torch.arange(8), cfg, ScoreNormalizer("none", None, 0)
    )
    advantages(exp, 0.1, cfg.ppo)
    assert (exp.response_mask & ~exp.action_mask).any(), "the episodes need environment turns"
    return cfg, models, exp


def test_environment_tokens_get_no_policy_kl_or_value_loss(tmp_path, tiny_chat_lm):
    """Garbage in every per-token input at the environment's positions (old and reference
    logprobs, advantages, values, returns) changes neither the losses nor the gradients."""
    cfg, models, exp = episode_buffer(tmp_path, tiny_chat_lm, "ppo.estimator=gae")
    stats, grads = _loss_and_grads(models, exp, cfg)
    env = exp.response_mask & ~exp.action_mask
    dirty = dataclasses.replace(exp)
    junk = torch.full(env.shape, 50.0)
    for name, sign in (("logprobs", -1), ("ref_logprobs", -1), ("advantages", 1), ("values", 1), ("returns", 1)):  # fmt: skip
        setattr(dirty, name, torch.where(env, sign * junk, getattr(exp, name)))
    stats2, grads2 = _loss_and_grads(models, dirty, cfg)
    for k in ("loss/policy", "loss/kl", "loss/value", "loss/entropy"):
        assert stats[k] == pytest.approx(stats2[k], abs=1e-6), k
    for a, b in zip(grads, grads2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_entropy_bonus_is_over_the_model_tokens_only(tmp_path, tiny_chat_lm):
    """With the policy and KL terms at zero, the loss is -ent_coef x the token mean of the
    entropy over the model's tokens, recomputed here from a plain forward."""
    cfg, models, exp = episode_buffer(
        tmp_path, tiny_chat_lm, "ppo.estimator=grpo", "rollout.samples_per_prompt=2"
    )
    exp.advantages = torch.zeros_like(exp.advantages)
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, kl_coef=0.0))
    denom = minibatch_denominator(exp, "token", cfg.rollout.max_new_tokens)
    stats = micro_step(models.learner, exp, cfg.ppo, 1.0, 0.0, True, denom)
    seq = join(exp.prompt_ids, exp.prompt_mask, exp.response, exp.response_mask)
    with torch.no_grad():
        _, ent = policy_logprobs(models.actor, seq, 1.0, with_entropy=True)
    m = exp.action_mask
    ref = float(ent[m].double().sum() / m.sum())
    assert stats["loss/entropy"] == pytest.approx(ref, rel=1e-5)
    assert abs(stats["loss/entropy"] - float(ent[exp.response_mask].mean())) > 1e-4


# --------------------------------------------------------------------------- bad input


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


def test_dr_grpos_constant_is_the_episodes_token_budget(tmp_path, tiny_lm):
    """Issue 36: with an env the constant used max_new_tokens, a per-turn limit; the loss of
    token_sum_norm divides by sequences x max_total_tokens (the most a row can hold)."""
    extra = ["ppo.aggregation=token_sum_norm", "rollout.max_new_tokens=6"]
    single = agent_cfg(tmp_path, tiny_lm, *extra)
    multi = agent_cfg(tmp_path, tiny_lm, *extra, "env=a:b", "rollout.max_total_tokens=40")
    assert single.token_budget() == 6 and multi.token_budget() == 40
    exp = fake_episode_buffer(critic=False)
    assert float(minibatch_denominator(exp, "token_sum_norm", multi.token_budget())) == 5 * 40
    assert float(minibatch_denominator(exp, "token", multi.token_budget())) == exp.action_mask.sum()


# --------------------------------------------------------------------------- rlhfkit ppo


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_rlhfkit_ppo_runs_episodes_with_every_estimator(tmp_path, tiny_chat_lm, estimator):
    n = 2 if ESTIMATORS[estimator].needs_groups else 1
    cfg = agent_cfg(
        tmp_path, tiny_chat_lm, "env=agent_env:make", "rollout.max_turns=2",
        "rollout.max_total_tokens=32", f"ppo.estimator={estimator}",
        f"rollout.samples_per_prompt={n}", "run.iterations=2", "run.save_every=1",
    )  # fmt: skip
    final = run_ppo(cfg)
    rows = read_metrics(tmp_path / "ppo")
    assert len(rows) == 2 and final.is_dir()
    assert all(r["env/turns"] > 1.0 for r in rows)  # the env answered: more than one turn
    assert all(math.isfinite(r["loss/policy"]) for r in rows)


def test_an_environments_own_counts_are_logged_as_env_keys(tmp_path, tiny_chat_lm):
    """Issue 32: counts beyond a fixed list were dropped; whatever an env's ``counts`` hold is
    logged as env/<key> (here the "good"s the model wrote), summed over the episodes."""
    cfg = agent_cfg(
        tmp_path, tiny_chat_lm, "env=agent_env:make_counts", "rollout.max_turns=2",
        "rollout.max_total_tokens=32", "run.iterations=1", "ppo.estimator=gae",
    )  # fmt: skip
    run_ppo(cfg)
    (row,) = read_metrics(tmp_path / "ppo")
    # the Echo reward is the same count, so the env's sum equals the score's over the buffer
    assert row["env/goods"] == pytest.approx(row["score/mean"] * 16)
    assert row["env/turns"] >= 1


# --------------------------------------------------------------------------- the tools demo


def test_tools_task_reward_reads_only_the_final_turn():
    from rlhfkit.demo import tools_task as task

    assert task.multiply(37, 58) == "2 1 4 6"
    assert task.check_answer(["p"] * 3, ["x"] * 3, [
        "the answer is 2 1 4 6", "the answer is 2 1 4 7", "<tool_call> ... </tool_call>",
    ], [2146] * 3) == [1.0, 0.0, 0.0]  # fmt: skip
    train, held = task.split_pairs(0, 100)
    assert not set(train) & set(held) and len(held) == 100
    assert all(a * b >= 1000 for a, b in train + held)


@pytest.mark.slow
def test_tools_demo_runs_end_to_end_with_marked_trajectories(tmp_path):
    """`rlhfkit demo --task tools --quick`: SFT on tool traces, GRPO with the tool environment,
    the held-out evaluation of both policies by episodes. (The learning goal, >= 0.8 held-out
    success, needs the full demo: docs/agents.md.)"""
    import json

    from rlhfkit.cli import main

    out = tmp_path / "tools"
    assert main(["demo", "--task", "tools", "--quick", "--output-dir", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    # the reported success is the held-out episodes' checker scores, one per held-out pair
    # (issue 36: a bound of [0, 1] could not fail)
    held = (out / "data" / "heldout.jsonl").read_text().splitlines()
    evaluated = json.loads((out / "eval" / "eval.json").read_text())
    for name, key in (("sft", "sft_success"), ("rl", "rl_success")):
        judged = [s["judge"] for s in evaluated[name]["samples"]]
        assert len(judged) == len(held) and set(judged) <= {0.0, 1.0}
        assert result[key] == pytest.approx(sum(judged) / len(judged))
    rows = read_metrics(out / "rl")
    assert len(rows) == 3 and all(r["env/turns"] >= 1 for r in rows)
    assert sum(r["env/tool_calls"] for r in rows) > 0  # the SFT policy calls the tool
    report = (out / "eval" / "eval.html").read_text()
    assert "[env: " in report and "tool_call" in report  # trajectories, env turns marked


def _echo_cfg(tmp_path, lm, *extra):
    return agent_cfg(
        tmp_path, lm, "env=agent_env:make", "rollout.max_turns=2", "rollout.max_total_tokens=32",
        *extra,
    )  # fmt: skip


def test_episodes_resume_exactly(tmp_path, tiny_chat_lm):
    """A run with an environment stopped after iteration 2 and resumed equals the run straight
    through (the env's episodes, the metrics and the weights)."""
    import shutil

    from transformers import AutoModelForCausalLM

    extra = ["run.iterations=3", "ppo.estimator=gae"]
    a = run_ppo(_echo_cfg(tmp_path / "a", tiny_chat_lm, *extra))
    b_cfg = _echo_cfg(tmp_path / "b", tiny_chat_lm, *extra, "run.save_every=2")
    run_ppo(b_cfg)
    out = tmp_path / "b" / "ppo"
    shutil.rmtree(out / "checkpoints" / "step-000003")
    shutil.rmtree(out / "final")
    b = run_ppo(b_cfg)
    ma, mb = read_metrics(tmp_path / "a" / "ppo"), read_metrics(out)
    assert [r["step"] for r in mb] == [1, 2, 3]
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["score/mean"] == rb["score/mean"] and ra["env/turns"] == rb["env/turns"]
        assert ra["loss/policy"] == pytest.approx(rb["loss/policy"], abs=1e-6)
    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_episodes_with_lora_train_the_adapters_and_keep_the_reference(tmp_path, tiny_chat_lm):
    cfg = _echo_cfg(
        tmp_path, tiny_chat_lm, "model.lora.enabled=true", "ppo.estimator=grpo",
        "rollout.samples_per_prompt=2", "run.iterations=2", "ppo.kl_in=loss",
    )  # fmt: skip
    run_ppo(cfg)
    rows = read_metrics(tmp_path / "ppo")
    assert len(rows) == 2 and all(r["env/turns"] > 1 for r in rows)
    # LoRA's reference is the base model with the adapters off: KL 0 before the first update
    assert rows[0]["kl/seq_mean"] == pytest.approx(0.0, abs=1e-5)
    assert rows[1]["kl/seq_mean"] > 0


def test_rlhfkit_eval_runs_episodes(tmp_path, tiny_chat_lm):
    import json

    from rlhfkit.cli import main

    prompts = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"say {c} :"} for c in COLORS])
    code = main([
        "eval", f"policy={tiny_chat_lm}", f"reference={tiny_chat_lm}", "env=agent_env:make",
        "max_turns=2", "max_total_tokens=40", "max_new_tokens=12", f"eval.prompts_file={prompts}",
        f"output_dir={tmp_path / 'eval'}",
    ])  # fmt: skip
    assert code == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    samples = result["policy"]["samples"]
    assert len(samples) == len(COLORS) and "rm_score" in result["policy"]  # the env's reward
    marked = [s["response"] for s in samples if "[env: " in s["response"]]
    # a turn that ends on EOS gets the env's answer; the rest were cut at 12 tokens
    assert marked and all("say good" in m for m in marked)
    assert result["policy"]["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)  # the same model


def test_an_env_failing_mid_run_names_the_step_and_keeps_the_last_checkpoint(
    tmp_path, tiny_chat_lm
):
    from transformers import AutoModelForCausalLM

    cfg = _echo_cfg(tmp_path, tiny_chat_lm, "run.iterations=3", "run.save_every=1")
    cfg = dataclasses.replace(
        cfg, env=dataclasses.replace(cfg.env, factory="agent_env:make_failing")
    )
    with pytest.raises(
        EnvError,
        match=r"env agent_env:make_failing: step \d for the prompt .*RuntimeError: the sandbox died",
    ):
        run_ppo(cfg)
    ckpts = sorted((tmp_path / "ppo" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-000001"]  # written before the failure, intact
    AutoModelForCausalLM.from_pretrained(ckpts[0] / "actor" / "model")


def test_periodic_held_out_evaluation_plays_episodes(tmp_path, tiny_chat_lm):
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"copy : {c} :"} for c in COLORS])
    cfg = _echo_cfg(
        tmp_path, tiny_chat_lm, f"data.eval_file={held}", "eval.every=1",
        "run.iterations=1",
    )  # fmt: skip
    run_ppo(cfg)
    (row,) = read_metrics(tmp_path / "ppo")
    assert math.isfinite(row["eval/rm_score"]) and row["eval/length"] > 0


# --------------------------------------------------------------------------- per-turn rewards


def test_per_turn_rewards_sit_at_the_last_token_of_each_model_turn(chat):
    tok, policy = chat
    boosted = EosBoost(policy, tok.eos_token_id)
    torch.manual_seed(0)
    ep = run_episodes(boosted, tok, items(tok), settings(Echo, reward_at="turn"), sample_kw(tok))
    good = tok.convert_tokens_to_ids("good")
    assert ep.env_reward == [0.0] * 4  # the rewards are per turn, not in R_final
    for i in range(4):
        n = int(ep.gen.lengths[i])
        toks, act = ep.gen.tokens[i, :n], ep.action_mask[i, :n].tolist()
        expect = torch.zeros(ep.turn_rewards.shape[1])
        for mine, a, b in runs(act):
            if mine:  # Echo's reward for a turn: the "good"s in it, at the turn's last token
                expect[b - 1] = float((toks[a:b] == good).sum())
        assert torch.equal(ep.turn_rewards[i], expect)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_with_per_turn_rewards_matches_the_contract_in_float64(gamma, lam):
    cfg = load_config(
        PPOConfig,
        None,
        [
            "ppo.estimator=gae",
            f"ppo.gamma={gamma}",
            f"ppo.lam={lam}",
            "ppo.whiten_advantages=false",
        ],
    )
    exp = fake_episode_buffer(critic=True)
    act = exp.action_mask
    turn = torch.zeros(act.shape)
    for b in range(act.shape[0]):  # a reward at the last token of every model turn
        for mine, _, end in runs(act[b].tolist()):
            if mine:
                turn[b, end - 1] = float(b + end)
    exp.turn_rewards = turn
    advantages(exp, 0.1, cfg.ppo)
    last = act.long().cumsum(1).argmax(1)
    kl = (exp.logprobs - exp.ref_logprobs).double()
    r = torch.where(act, -0.1 * kl + turn.double(), 0.0)
    r[torch.arange(5), last] += exp.scores.double()
    ref_a, ref_r = gae_over_actions_f64(r, exp.values.double(), act, gamma, lam)
    torch.testing.assert_close(exp.returns.double(), ref_r, rtol=0, atol=1e-5)
    torch.testing.assert_close(exp.advantages.double(), ref_a, rtol=0, atol=1e-5)  # issue 36
    assert (exp.advantages[~act] == 0).all()


def test_rlhfkit_ppo_with_per_turn_rewards(tmp_path, tiny_chat_lm):
    cfg = _echo_cfg(tmp_path, tiny_chat_lm, "env.reward_at=turn", "ppo.estimator=gae",
                    "run.iterations=2", "ppo.kl_coef=0")  # fmt: skip
    run_ppo(cfg)
    rows = read_metrics(tmp_path / "ppo")
    # R_final is 0 (the env's rewards moved to the turns); the rewards are the "good"s written
    assert all(r["score/mean"] == 0 for r in rows)
    assert all(math.isfinite(r["loss/value"]) for r in rows)
    # with R_final 0 and no KL, r_t holds only the per-turn rewards: they reached the update
    assert sum(r["reward/total"] for r in rows) > 0
