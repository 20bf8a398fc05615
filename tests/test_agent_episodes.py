"""Agents (issue 22): the episode contract. The model's tokens are kept as sampled and the
environment's are the chat template's delta; the estimators run over the model's tokens with the
environment's transparent; only the model's tokens get a loss, a KL or an entropy term; a
single-turn environment is exactly today's rollout and update; per-turn rewards sit at the last
token of their turn."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from agent_kit import (
    Echo,
    EosBoost,
    OneStep,
    agent_cfg,
    count_good,
    episode_buffer,
    fake_episode_buffer,
    gae_over_actions_f64,
    holes_mask,
    items,
    loss_and_grads,
    rollout_and_update,
    runs,
    sample_kw,
    settings,
)

from rlhfkit.algos import ESTIMATORS, gae_advantages, pack_left, unpack
from rlhfkit.config import PPOConfig, load_config
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.rl.update import advantages, micro_step, minibatch_denominator
from rlhfkit.rollout.collect import SingleTurn
from rlhfkit.rollout.episodes import (
    MultiTurn,
    observation_ids,
    run_episodes,
)
from rlhfkit.rollout.experience import Experience
from rlhfkit.rollout.forward import join, policy_logprobs


def test_observation_delta_continues_the_chat_template_exactly(chat):
    tok, _ = chat
    user = [{"role": "user", "content": "say red :"}]
    reply = tok("red good", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    obs = [{"role": "user", "content": "say good"}]
    delta = observation_ids(tok, obs, None)
    full = encode_prompt(tok, user + [{"role": "assistant", "content": "red good"}] + obs)
    assert encode_prompt(tok, user) + reply + delta == full


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


@pytest.mark.parametrize(
    "extra",
    [
        ["ppo.estimator=gae"],
        ["ppo.estimator=grpo", "rollout.samples_per_prompt=4", "ppo.kl_in=loss"],
    ],
)
def test_a_single_turn_environment_is_todays_rollout_and_update(tmp_path, tiny_lm, extra):
    cfg = agent_cfg(tmp_path, tiny_lm, *extra, "ppo.ent_coef=0.01")
    old_exp, old_stats, old_w = rollout_and_update(cfg, SingleTurn(), count_good)
    env = MultiTurn(settings(OneStep, max_turns=1, max_total_tokens=6))
    new_exp, new_stats, new_w = rollout_and_update(cfg, env, count_good)
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


def test_environment_tokens_get_no_policy_kl_or_value_loss(tmp_path, tiny_chat_lm):
    """Garbage in every per-token input at the environment's positions (old and reference
    logprobs, advantages, values, returns) changes neither the losses nor the gradients."""
    cfg, models, exp = episode_buffer(tmp_path, tiny_chat_lm, "ppo.estimator=gae")
    stats, grads = loss_and_grads(models, exp, cfg)
    env = exp.response_mask & ~exp.action_mask
    dirty = dataclasses.replace(exp)
    junk = torch.full(env.shape, 50.0)
    for name, sign in (("logprobs", -1), ("ref_logprobs", -1), ("advantages", 1), ("values", 1), ("returns", 1)):  # fmt: skip
        setattr(dirty, name, torch.where(env, sign * junk, getattr(exp, name)))
    stats2, grads2 = loss_and_grads(models, dirty, cfg)
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
