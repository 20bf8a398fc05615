"""RLVR's training pieces (issue 23): the policy-loss choice, DAPO's dynamic sampling and overlong
shaping, and the rollout correction against a deliberately mismatched (bf16) sampler."""

import dataclasses
import math
from pathlib import Path

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


def _trained(tmp_path, tiny_lm, *extra):
    """(metrics rows, final actor weights) of a seeded 2-iteration GRPO run with two epochs per
    buffer (the second epoch is off policy, so the losses' clipping acts)."""
    cfg = ppo_cfg(
        tmp_path, tiny_lm, *GRPO, "run.iterations=2", "ppo.epochs=2", "ppo.minibatch_size=32",
        "ppo.micro_batch_size=16", "rollout.filter_groups=true", *extra,
    )  # fmt: skip
    torch.manual_seed(0)
    run_ppo(cfg, reward_fn=_hash_or_flat)
    from safetensors.torch import load_file

    weights = load_file(str(Path(cfg.run.output_dir) / "final" / "model.safetensors"))
    return read_metrics(cfg.run.output_dir), weights


@pytest.fixture(scope="module")
def ppo_loss_run(tmp_path_factory, tiny_lm):
    return _trained(tmp_path_factory.mktemp("ppo_loss"), tiny_lm)


@pytest.mark.parametrize(
    "loss, extra",
    [("gspo", []), ("cispo", ["ppo.cispo_clip_eps_high=0.001"])],
)
def test_each_policy_loss_trains_under_rlhfkit_ppo(tmp_path, tiny_lm, ppo_loss_run, loss, extra):
    """GRPO with GSPO's and CISPO's losses through the whole recipe, with dynamic sampling. Each
    run must show what only its own loss does (issue 36: finite values and a first ratio of 1
    held with either one mapped to the plain PPO loss):
    - the weights differ from the same seeded run with ``policy_loss: ppo``;
    - GSPO clips whole responses at the paper's epsilons (3e-4, 4e-4): in the off-policy epoch
      most sequence ratios leave [1 - 3e-4, 1 + 4e-4], where PPO's 0.2 clips next to nothing;
    - CISPO caps the IS weight of tokens (here at 1.001) and still trains every token."""
    rows, weights = _trained(tmp_path, tiny_lm, f"ppo.policy_loss={loss}", *extra)
    ppo_rows, ppo_weights = ppo_loss_run
    assert len(rows) == 2 and all(math.isfinite(r["loss/policy"]) for r in rows)
    assert all(0 < r["rollout/filtered"] < 1 and r["rollout/sampling_rounds"] >= 1 for r in rows)
    assert any(not torch.equal(weights[k], ppo_weights[k]) for k in weights)
    # the first epoch is on policy, the second is not: the mean over both epochs is about half
    # the off-policy epoch's share
    assert all(r["policy/clip_frac"] > 0.1 for r in rows)  # measured: gspo ~0.5, cispo ~0.23
    assert all(r["policy/clip_frac"] < 0.05 for r in ppo_rows)


@pytest.mark.parametrize("lengths", [[1, 7], [5, 2]])
def test_gspo_weighs_each_response_equally_by_default(lengths):
    """Issue 36: GSPO's objective is 1/G sum_i over responses (Zheng et al. 2025, eq. 5), so a
    response's total gradient on its log-probabilities is -s_i A_i / G whatever its length. The
    default aggregation (auto) resolves to that for gspo; token averaging, the default of the
    other losses, would weigh each response by its length."""
    from rlhfkit.algos.losses import POLICY_LOSSES

    cfg = load_config(PPOConfig, None, ["ppo.policy_loss=gspo", *GRPO])
    assert cfg.ppo.aggregation == "auto" and cfg.ppo.loss_aggregation() == "sequence"
    assert load_config(PPOConfig, None, GRPO).ppo.loss_aggregation() == "token"
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]  # (2, 7)
    lp = torch.full((2, 7), -1.0, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.5], [-0.5]], dtype=torch.float64).expand(2, 7)
    loss, _ = POLICY_LOSSES["gspo"](
        lp, lp.detach(), adv, mask, aggregation=cfg.ppo.loss_aggregation(), clip_eps=3e-4,
        clip_eps_high=4e-4,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, lp)
    per_response = grad.sum(1)  # on policy: s_i = 1
    assert per_response.tolist() == pytest.approx([-1.5 / 2, 0.5 / 2], abs=1e-12)


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
    denom = minibatch_denominator(exp, pc.loss_aggregation(), cfg.token_budget())
    stats = micro_step(models.learner, exp, pc, cfg.rollout.temperature, 0.05, True, denom)
    grads = [p.grad.clone() for p in models.actor.parameters() if p.grad is not None]
    return grads, stats


def _reference_grads(models, exp, cfg, loss: str, w: torch.Tensor) -> list[torch.Tensor]:
    """The actor's gradient of the weighted policy loss written out from each paper in float64,
    independently of ``algos.losses``: only the forward that gives log pi is shared.
    - ppo:   -1/N sum_t w_t min(r_t A_t, clip(r_t, 1 -+ eps) A_t)
    - cispo: -1/N sum_t w_t sg(min(r_t, 1 + eps_high)) A_t log pi_t
    - gspo:  -1/G sum_i 1/|y_i| sum_t w_t A_t s_i [unclipped] log pi_t, s_i detached: the
             gradient of GSPO-token (eq. 13) with the weights on its per-token advantages."""
    pc = cfg.ppo
    models.actor.zero_grad(set_to_none=True)
    seq = join(exp.prompt_ids, exp.prompt_mask, exp.response, exp.response_mask)
    logp, _, _ = models.learner.train_outputs(seq, cfg.rollout.temperature, False, True)
    lp, old, adv = logp.double(), exp.logprobs.double(), exp.advantages.double()
    m = exp.response_mask.bool()
    r = torch.exp(lp - old)
    if loss == "ppo":
        per = -w * torch.min(r * adv, r.clamp(1 - pc.clip_eps, 1 + pc.clip_eps) * adv)
        total = per[m].sum() / m.sum()
    elif loss == "cispo":
        per = -w * r.detach().clamp(max=1 + pc.cispo_clip_eps_high) * adv * lp
        total = per[m].sum() / m.sum()
    else:
        n = m.sum(1)
        s = torch.exp(torch.where(m, lp - old, 0.0).sum(1) / n).detach()[:, None]  # (B, 1)
        out = ((s > 1 + pc.gspo_clip_eps_high) & (adv > 0)) | (
            (s < 1 - pc.gspo_clip_eps) & (adv < 0)
        )
        per = -w * adv * s * (~out) * lp
        total = torch.stack([per[i][m[i]].sum() / n[i] for i in range(len(n))]).mean()
    total.backward()
    return [p.grad.clone() for p in models.actor.parameters() if p.grad is not None]


@pytest.mark.cpu_isa
@pytest.mark.parametrize("loss", ["ppo", "gspo", "cispo"])
@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_correction_reweights_the_update_as_its_formula_says(mismatched, mode, loss):
    """Issue 36: the reference is each loss written out with the weights on it, not the code's
    own advantages-times-weights; all three losses. With gspo the TIS weights are per token
    (GSPO-token's per-token advantages), MIS's one per response (docs/decisions.md)."""
    cfg, models, exp = mismatched
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, policy_loss=loss, ent_coef=0.0))
    m = exp.response_mask
    gap = (exp.logprobs - exp.sampler_logprobs)[m].abs()
    assert gap.max() > 0  # the bf16 sampler really differs
    cap = 1.0 + float(gap.max()) / 2 if mode == "tis" else 1.0005  # some weights capped
    got, stats = _grads(models, exp, cfg, rollout_correction=mode, rollout_correction_cap=cap)
    # the weights in float64 on the same buffer
    log_rho = (exp.logprobs.double() - exp.sampler_logprobs.double()).masked_fill(~m, 0)
    if mode == "tis":
        w = log_rho.exp().clamp(max=cap)
    else:
        seq = log_rho.sum(1)
        w = torch.where(seq <= math.log(cap), seq.exp(), 0.0)[:, None].expand_as(log_rho)
    want = _reference_grads(models, exp, cfg, loss, w)
    plain, _ = _grads(models, exp, cfg)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
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
