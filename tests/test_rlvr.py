"""RLVR's training pieces (issue 23): the policy-loss choice, DAPO's dynamic sampling and overlong
shaping, and the rollout correction against a deliberately mismatched (bf16) sampler."""

import dataclasses
import math

import pytest
import torch
from test_ppo import ppo_cfg

from rlhfkit.algos import overlong_penalty, rollout_correction_weights
from rlhfkit.config import ConfigError, PPOConfig, load_config
from rlhfkit.data.build import load_prompts
from rlhfkit.rl.metrics import rollout_metrics
from rlhfkit.rl.update import advantages, micro_step, minibatch_denominator
from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer, collect
from rlhfkit.rollout.forward import join, policy_logprobs
from rlhfkit.stages.ppo import load_models, run_ppo
from rlhfkit.train.logger import read_metrics

GRPO = ["ppo.estimator=grpo", "rollout.samples_per_prompt=4"]


@pytest.mark.parametrize(
    "args, match",
    [
        (["ppo.policy_loss=gspo", "ppo.estimator=gae"], "gspo' clips one ratio per response"),
        (["ppo.policy_loss=gspo", "ppo.estimator=reinforce++"], "gives per-token advantages"),
        (["ppo.policy_loss=cispo", "ppo.clip_eps_high=0.3", *GRPO], "ppo.clip_eps_high: only used"),
        (["ppo.policy_loss=gspo", "ppo.dual_clip=3", *GRPO], "ppo.dual_clip: only used"),
        (["rollout.filter_groups=true"], "filter_groups: drops groups .*samples_per_prompt >= 2"),
        (["ppo.rollout_correction=tis", "ppo.rollout_correction_cap=1"], "cap.*must be > 1"),
        (["ppo.rollout_correction_cap=0.5"], "rollout_correction_cap: 0.5 must be > 1"),
        (
            ["ppo.overlong_buffer=32", "rollout.max_new_tokens=32"],
            "overlong_buffer: 32 must be below",
        ),
    ],
)
def test_rlvr_keys_that_cannot_work_are_config_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(PPOConfig, None, args)


def test_overlong_penalty_is_daposs_piecewise_form():
    lengths = torch.tensor([0, 10, 12, 13, 16, 20, 21])
    got = overlong_penalty(lengths, max_length=20, buffer=8, penalty=0.5)
    want = []
    for n in lengths.tolist():  # eq. 13 with L_max 20, L_cache 8
        want.append(0.0 if n <= 12 else (12 - n) / 8 if n <= 20 else -1.0)
    assert got.tolist() == pytest.approx([0.5 * w for w in want], abs=1e-7)
    assert overlong_penalty(lengths, 20, 0).abs().sum() == 0  # off


@pytest.mark.parametrize("loss", ["gspo", "cispo"])
def test_each_policy_loss_trains_under_rlhfkit_ppo(tmp_path, tiny_lm, loss):
    """GRPO with GSPO's and CISPO's losses through the whole recipe, with dynamic sampling:
    finite losses, a ratio that starts at exactly 1 (one minibatch, one epoch: on policy), and
    the filtering logged."""
    cfg = ppo_cfg(
        tmp_path, tiny_lm, *GRPO, f"ppo.policy_loss={loss}", "run.iterations=2", "ppo.epochs=1",
        "ppo.minibatch_size=32", "rollout.filter_groups=true",
    )  # fmt: skip
    run_ppo(cfg, reward_fn=_hash_or_flat)
    rows = read_metrics(cfg.run.output_dir)
    assert len(rows) == 2 and all(math.isfinite(r["loss/policy"]) for r in rows)
    assert rows[0]["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert all(0 < r["rollout/filtered"] < 1 and r["rollout/sampling_rounds"] >= 1 for r in rows)


# --------------------------------------------------------------------------- dynamic sampling


def _hash_or_flat(prompts, responses):
    """Red and blue prompts score 1 whatever the response (their groups are flat); the others
    score a hash of the response text, which differs between samples."""
    return [
        1.0 if ("red" in p or "blue" in p) else float(sum(map(ord, r)) % 97)
        for p, r in zip(prompts, responses, strict=True)
    ]


def _collect(cfg, reward):
    """(models, experience, timings) of one seeded collection with ``reward``."""
    torch.manual_seed(0)
    models = load_models(cfg, None, reward)
    prompts, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    norm = ScoreNormalizer("none", None, 0)
    return models, *collect(models, prompts, PromptStream(len(prompts), 0), cfg, norm)


def test_dynamic_sampling_drops_flat_groups_and_fills_the_batch(tmp_path, tiny_lm):
    cfg = ppo_cfg(tmp_path, tiny_lm, *GRPO, "rollout.filter_groups=true")
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_sampling_rounds=4))
    _, exp, t = _collect(cfg, _hash_or_flat)
    assert len(exp) == cfg.rollout.episodes_per_iteration
    groups = exp.group.unique()
    assert len(groups) == len(exp) // 4
    for g in groups:  # whole groups, none flat
        s = exp.scores[exp.group == g]
        assert len(s) == 4 and s.max() > s.min()
    assert t.rounds >= 2 and t.groups == t.rounds * 8  # 8 groups a round
    assert t.groups_filtered > 0 and t.groups_filled == 0
    m = rollout_metrics(exp, t, 0.05, 0, 1.0, 1.0)
    assert m["rollout/filtered"] == t.groups_filtered / t.groups
    assert m["rollout/sampling_rounds"] == t.rounds


def test_dynamic_sampling_stops_at_max_rounds_and_fills_with_flat_groups(tmp_path, tiny_lm):
    cfg = ppo_cfg(tmp_path, tiny_lm, *GRPO, "rollout.filter_groups=true")
    _, exp, t = _collect(cfg, lambda p, r: [2.0] * len(r))  # every group flat
    assert len(exp) == cfg.rollout.episodes_per_iteration
    assert t.rounds == cfg.rollout.max_sampling_rounds and t.groups_filtered == t.groups
    assert t.groups_filled == len(exp) // 4
    assert rollout_metrics(exp, t, 0.05, 0, 1.0, 1.0)["rollout/filled"] == len(exp) // 4


# --------------------------------------------------------------------------- rollout correction


def test_correction_weights_against_float64_loops():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 2
    sampler = old + 0.4 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    mask = torch.arange(6)[None] < torch.tensor([6, 4, 1, 0])[:, None]
    cap = 1.5
    w, stats = rollout_correction_weights(old, sampler, mask, "tis", cap)
    n_capped, n = 0, int(mask.sum())
    for i, t in mask.nonzero().tolist():
        rho = math.exp(float(old[i, t] - sampler[i, t]))
        assert float(w[i, t]) == pytest.approx(min(rho, cap), abs=1e-12)
        n_capped += rho > cap
    assert (w[~mask] == 0).all() and float(stats["capped"]) == pytest.approx(n_capped / n)
    gap = sum(abs(float(old[i, t] - sampler[i, t])) for i, t in mask.nonzero().tolist()) / n
    assert float(stats["mismatch"]) == pytest.approx(gap, abs=1e-12)
    w, stats = rollout_correction_weights(old, sampler, mask, "mis", cap)
    masked = 0
    for i in range(3):  # row 3 is empty
        k = int(mask[i].sum())
        rho = math.exp(sum(float(old[i, t] - sampler[i, t]) for t in range(k)))
        want = rho if rho <= cap else 0.0
        masked += rho > cap
        assert w[i, :k].tolist() == pytest.approx([want] * k, abs=1e-12)
    assert float(stats["capped"]) == pytest.approx(masked / 3)


@pytest.fixture()
def mismatched(tmp_path, tiny_lm):
    """An fp32 buffer whose sampler logprobs come from a bf16 forward of the same sequences: the
    trainer's pi_old and the sampler's pi differ as a bf16 engine's would."""
    from test_ppo import count_good

    cfg = ppo_cfg(tmp_path, tiny_lm, "ppo.epochs=1", "ppo.minibatch_size=32")
    models, exp, _ = _collect(cfg, count_good)
    advantages(exp, 0.05, cfg.ppo)
    seq = join(exp.prompt_ids, exp.prompt_mask, exp.response, exp.response_mask)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, _ = policy_logprobs(models.actor, seq, cfg.rollout.temperature)
    exp.sampler_logprobs = bf16.float()
    return cfg, models, exp


def _grads(models, exp, cfg, **ppo):
    pc = dataclasses.replace(cfg.ppo, **ppo)
    models.actor.zero_grad(set_to_none=True)
    denom = minibatch_denominator(exp, pc.aggregation, cfg.rollout.max_new_tokens)
    stats = micro_step(models.learner, exp, pc, cfg.rollout.temperature, 0.05, True, denom)
    grads = [p.grad.clone() for p in models.actor.parameters() if p.grad is not None]
    return grads, stats


@pytest.mark.cpu_isa
@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_correction_reweights_the_update_as_its_formula_says(mismatched, mode):
    cfg, models, exp = mismatched
    m = exp.response_mask
    gap = (exp.logprobs - exp.sampler_logprobs)[m].abs()
    assert gap.max() > 0  # the bf16 sampler really differs
    cap = 1.0 + float(gap.max()) / 2 if mode == "tis" else 1.0005  # some weights capped
    got, stats = _grads(models, exp, cfg, rollout_correction=mode, rollout_correction_cap=cap)
    # the formula, in float64 on the same buffer: advantages times the weights
    log_rho = (exp.logprobs.double() - exp.sampler_logprobs.double()).masked_fill(~m, 0)
    if mode == "tis":
        w = log_rho.exp().clamp(max=cap)
    else:
        seq = log_rho.sum(1)
        w = torch.where(seq <= math.log(cap), seq.exp(), 0.0)[:, None].expand_as(log_rho)
    weighted = dataclasses.replace(exp, advantages=(exp.advantages.double() * w).float())
    want, _ = _grads(models, weighted, cfg)
    plain, _ = _grads(models, exp, cfg)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(a, b) for a, b in zip(got, plain, strict=True))
    assert 0 < stats["correction/capped"] < 1
    assert stats["correction/mismatch"] == pytest.approx(float(gap.mean()), rel=1e-5)


def test_no_correction_leaves_the_update_bit_identical(mismatched):
    cfg, models, exp = mismatched
    with_sampler, stats = _grads(models, exp, cfg)  # rollout_correction: none
    without, _ = _grads(models, dataclasses.replace(exp, sampler_logprobs=None), cfg)
    for a, b in zip(with_sampler, without, strict=True):
        assert torch.equal(a, b)
    assert not any(k.startswith("correction/") for k in stats)
