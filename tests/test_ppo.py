"""PPO stage on tiny local models: alignment invariants, masking, estimator wiring, learning, resume."""

import dataclasses
import math
import shutil

import pytest
import torch
from conftest import COLORS, assert_same_run, write_jsonl
from transformers import AutoModelForCausalLM

from rlhfkit.algos import compute_advantages, kl_penalty, masked_whiten, policy_loss, shape_rewards
from rlhfkit.config import PPOConfig, load_config
from rlhfkit.data.build import load_prompts
from rlhfkit.rl.update import advantages, rl_update
from rlhfkit.rollout.collect import (
    PromptStream,
    ScoreNormalizer,
    collect,
    fixed_layout,
    sampler_logprobs_usable,
)
from rlhfkit.rollout.forward import critic_values, join, policy_logprobs
from rlhfkit.stages.ppo import load_models, run_ppo
from rlhfkit.train.logger import read_metrics


def count_good(prompts, responses):
    """Toy reward without an RM: +1 per occurrence of the word 'good'."""
    return [float(r.split().count("good")) for r in responses]


def ppo_cfg(tmp_path, lm, *extra):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {c} :"} for c in COLORS])
    return load_config(
        PPOConfig,
        None,
        [
            f"model.name_or_path={lm}",
            "reward_fn=tests:unused",
            f"data.train_file={prompts}",
            f"run.output_dir={tmp_path / 'ppo'}",
            "rollout.episodes_per_iteration=32",
            "rollout.chunk_size=16",
            "rollout.max_new_tokens=8",
            "ppo.minibatch_size=16",
            "ppo.micro_batch_size=8",
            "actor.lr=1e-3",
            "critic.lr=1e-3",
            "ppo.reward_norm=none",
            "log.tensorboard=false",
            "run.sample_every=0",
            *extra,
        ],
    )


def _seeded_buffer(cfg):
    """Models and one rollout's advantaged Experience under ``cfg``, seed 0."""
    torch.manual_seed(0)
    models = load_models(cfg, None, count_good)
    prompts, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    exp, _ = collect(
        models, prompts, PromptStream(len(prompts), 0), cfg, ScoreNormalizer("none", None, 0)
    )
    advantages(exp, 0.05, cfg.ppo)
    return models, exp


@pytest.fixture()
def buffer(tmp_path, tiny_lm):
    cfg = ppo_cfg(tmp_path, tiny_lm)
    return cfg, *_seeded_buffer(cfg)


def test_ratio_is_one_before_the_first_update(buffer):
    cfg, models, exp = buffer
    assert exp.response_mask.sum(1).min() >= 1  # every response has at least its first token
    mb = exp.select(torch.tensor([3, 0, 17, 9, 30]))  # another batch layout than the rollout's
    seq = join(mb.prompt_ids, mb.prompt_mask, mb.response, mb.response_mask)
    logp, _ = policy_logprobs(models.actor, seq, cfg.rollout.temperature)
    m = mb.response_mask
    torch.testing.assert_close(logp[m], mb.logprobs[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        critic_values(models.learner.critic_fwd, seq)[m], mb.values[m], rtol=0, atol=1e-5
    )
    # the reference is the same SFT weights, so KL starts at 0 too
    torch.testing.assert_close(
        exp.logprobs[exp.response_mask], exp.ref_logprobs[exp.response_mask], rtol=0, atol=1e-5
    )
    _, stats = policy_loss(logp, mb.logprobs, mb.advantages, m, 0.2)
    assert stats["clip_frac"].item() == 0 and abs(stats["ratio_mean"].item() - 1) < 1e-5


def _actor_grad(models, exp, cfg):
    models.actor.zero_grad(set_to_none=True)
    seq = join(exp.prompt_ids, exp.prompt_mask, exp.response, exp.response_mask)
    logp, _ = policy_logprobs(models.actor, seq, cfg.rollout.temperature)
    loss, _ = policy_loss(logp, exp.logprobs, exp.advantages, exp.response_mask, 0.2)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in models.actor.parameters()]


def test_no_loss_flows_from_positions_after_eos(buffer):
    cfg, models, exp = buffer
    m = exp.response_mask
    assert (~m).any(), "the batch needs at least one response that ended early"
    loss, grads = _actor_grad(models, exp, cfg)
    dirty = dataclasses.replace(exp)
    junk = torch.full_like(exp.advantages, 1e4)
    dirty.advantages = torch.where(m, exp.advantages, junk)
    dirty.logprobs = torch.where(m, exp.logprobs, -junk)
    dirty.response = torch.where(
        m, exp.response, torch.full_like(exp.response, 5)
    )  # other tokens after EOS
    loss2, grads2 = _actor_grad(models, dirty, cfg)
    assert loss.item() == pytest.approx(loss2.item(), abs=1e-6)
    for a, b in zip(grads, grads2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("estimator", ["td", "mc", "gae"])
def test_advantage_choice_in_config_reaches_the_estimator(buffer, estimator):
    cfg, _, exp = buffer
    cfg = load_config(
        PPOConfig,
        None,
        [
            f"{k}={v}"
            for k, v in [
                ("model.name_or_path", "x"),
                ("reward_fn", "a:b"),
                ("ppo.estimator", estimator),
                ("ppo.gamma", 0.9),
                ("ppo.lam", 0.5),
                ("ppo.kl_estimator", "k3"),
            ]
        ],
    )
    advantages(exp, 0.1, cfg.ppo)
    kl = kl_penalty(exp.logprobs, exp.ref_logprobs, "k3")
    rewards, _ = shape_rewards(kl, exp.scores, exp.response_mask, 0.1)
    adv, ret = compute_advantages(estimator, rewards, exp.values, exp.response_mask, 0.9, 0.5)
    torch.testing.assert_close(
        exp.advantages, masked_whiten(adv, exp.response_mask), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(exp.returns, ret, rtol=0, atol=0)
    others = [e for e in ["td", "mc", "gae"] if e != estimator]
    for o in others:  # and the estimators really differ on this batch
        assert not torch.allclose(
            compute_advantages(o, rewards, exp.values, exp.response_mask, 0.9, 0.5)[0], adv
        )


@pytest.mark.slow
def test_ppo_raises_toy_reward_with_bounded_kl_and_saves_plain_hf(tmp_path, tiny_lm):
    cfg = ppo_cfg(tmp_path, tiny_lm, "run.iterations=30", "ppo.kl_coef=0.1", "run.seed=1")
    final = run_ppo(cfg, reward_fn=count_good)
    rows = [m for m in read_metrics(cfg.run.output_dir) if "score/mean" in m]
    assert len(rows) == 30
    first = sum(r["score/mean"] for r in rows[:3]) / 3
    last = sum(r["score/mean"] for r in rows[-3:]) / 3
    assert last > first + 2.0, (first, last)
    assert max(r["kl/seq_mean"] for r in rows) < 30.0  # 8 tokens, beta = 0.1: KL stays bounded
    for key in [
        "score/std",
        "reward/non_score",
        "reward/total",
        "policy/entropy",
        "response/eos_rate",
        "loss/policy",
        "loss/value",
        "policy/clip_frac",
        "value/clip_frac",
        "policy/approx_kl",
        "value/explained_var",
        "adv/mean",
        "adv/std",
        "grad_norm/actor",
        "grad_norm/critic",
        "lr/actor",
        "kl/beta",
        "perf/tokens_per_s",
        "time/generate",
        "time/score",
        "time/update",
    ]:
        assert key in rows[-1], key
    model = AutoModelForCausalLM.from_pretrained(final)
    ids = torch.tensor([[1, 5, 6]])
    assert model(ids).logits.shape[-1] == model.config.vocab_size


def test_resume_continues_where_the_run_left_off(tmp_path, tiny_lm):
    extra = ["run.iterations=4", "rollout.episodes_per_iteration=16", "ppo.epochs=2"]
    a = run_ppo(ppo_cfg(tmp_path / "a", tiny_lm, *extra), reward_fn=count_good)
    b_cfg = ppo_cfg(tmp_path / "b", tiny_lm, *extra, "run.save_every=2")
    run_ppo(b_cfg, reward_fn=count_good)
    out = tmp_path / "b" / "ppo"
    shutil.rmtree(out / "checkpoints" / "step-000004")
    shutil.rmtree(out / "final")
    b = run_ppo(b_cfg, reward_fn=count_good)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert_same_run(a, b)


def test_sampling_logprobs_fast_path_equals_the_recompute_path(tmp_path, tiny_lm):
    """rollout.old_logprobs=sampling reuses the sampler's logits; the plain path runs a separate
    training-layout forward. Same seed: the same tokens, and the same logprobs and entropy."""
    out = {}
    for source in ("sampling", "recompute"):
        cfg = ppo_cfg(
            tmp_path / source,
            tiny_lm,
            f"rollout.old_logprobs={source}",
            "rollout.temperature=0.7",  # logprobs at the sampling temperature on both paths
            "rollout.top_k=20",  # and of the unfiltered distribution
        )
        torch.manual_seed(0)
        models = load_models(cfg, None, count_good)
        prompts, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
        norm = ScoreNormalizer("none", None, 0)
        out[source] = collect(models, prompts, PromptStream(len(prompts), 0), cfg, norm)
    (a, ta), (b, tb) = out["sampling"], out["recompute"]
    m = a.response_mask
    assert torch.equal(a.response, b.response) and torch.equal(m, b.response_mask)
    assert (~m).any() and m.sum() > 50
    torch.testing.assert_close(a.logprobs[m], b.logprobs[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(a.ref_logprobs[m], b.ref_logprobs[m], rtol=0, atol=0)
    assert ta.entropy_sum == pytest.approx(tb.entropy_sum, rel=1e-5)


def test_auto_old_logprobs_recomputes_in_bf16_only():
    """bf16 logprobs depend on the batch layout (issue 6), so `auto` must not reuse the sampler's."""
    fp32, bf16 = "fp32", "bf16"
    assert sampler_logprobs_usable("auto", fp32) and not sampler_logprobs_usable("auto", bf16)
    assert not sampler_logprobs_usable("auto", "bf16-mixed")
    assert sampler_logprobs_usable("sampling", bf16) and not sampler_logprobs_usable(
        "recompute", fp32
    )


@pytest.mark.cpu_isa
def test_bf16_rollout_and_update_see_each_row_in_the_same_layout(tmp_path, tiny_lm):
    """Below fp32 the logprobs depend on the padding around a row, so the rollout pads to a fixed
    layout (longest prompt of the data, max_new_tokens) and the update does not trim minibatches:
    the update's first forward then reproduces the stored old logprobs exactly (ratio == 1),
    whatever rows share its micro-batch."""
    rows = [{"prompt": " ".join(["say", *([c] * (1 + i % 5)), ":"])} for i, c in enumerate(COLORS)]
    prompts_file = write_jsonl(tmp_path / "varied.jsonl", rows)
    cfg = ppo_cfg(
        tmp_path,
        tiny_lm,
        "model.dtype=bf16",
        f"data.train_file={prompts_file}",
        "ppo.epochs=1",
        "ppo.minibatch_size=32",  # one minibatch: every micro-step runs before the optimizer step
    )
    torch.manual_seed(0)
    models = load_models(cfg, None, count_good)
    assert fixed_layout(cfg.model.dtype)
    prompts, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    norm = ScoreNormalizer("none", None, 0)
    exp, _ = collect(models, prompts, PromptStream(len(prompts), 0), cfg, norm)
    assert exp.prompt_ids.shape[1] == max(len(p.prompt_ids) for p in prompts)
    assert exp.response.shape[1] == cfg.rollout.max_new_tokens
    m = exp.response_mask
    short = (m.sum(1) < m.shape[1]).nonzero().squeeze(1)[:4]  # rows a trim would re-pad
    assert len(short) >= 2
    mb = exp.select(short, trim=False)
    seq = join(mb.prompt_ids, mb.prompt_mask, mb.response, mb.response_mask)
    with torch.no_grad():
        logp, _ = policy_logprobs(models.actor, seq, cfg.rollout.temperature)
    mm = mb.response_mask
    torch.testing.assert_close(logp[mm], mb.logprobs[mm], rtol=0, atol=1e-6)
    advantages(exp, 0.05, cfg.ppo)
    stats = rl_update(models.learner, exp, cfg, 0.05, update_actor=True)
    assert all(math.isfinite(v) for v in stats.values())
    # the update's own micro-batches (shuffled rows, 8 at a time) also reproduce them: ratio == 1
    assert abs(stats["policy/ratio_mean"] - 1) < 1e-6 and abs(stats["policy/approx_kl"]) < 1e-9


def test_length_buckets_change_the_update_only_by_rounding(tmp_path, tiny_lm):
    """rl_update's micro-batches of similar lengths (``by_length``, fp32) give the same update
    as the shuffled order: the same minibatch loss over one denominator, summed in another order."""
    import copy

    from rlhfkit.rl.update import by_length

    cfg = ppo_cfg(tmp_path, tiny_lm, "ppo.micro_batch_size=4", "ppo.epochs=2", "ppo.ent_coef=0.01")
    models, exp = _seeded_buffer(cfg)
    lengths = exp.response_mask.sum(1)
    assert len(set(lengths.tolist())) > 2, "the buffer needs responses of different lengths"
    idx = torch.randperm(16)
    assert not torch.equal(by_length(idx, lengths), idx)  # the order really changes
    assert sorted(by_length(idx, lengths).tolist()) == sorted(idx.tolist())
    weights = {}
    for buckets in (False, True):
        torch.manual_seed(0)
        m = load_models(cfg, None, count_good)
        torch.manual_seed(5)
        stats = rl_update(m.learner, copy.deepcopy(exp), cfg, 0.05, True, length_buckets=buckets)
        weights[buckets] = ([p.detach().clone() for p in m.actor.parameters()], stats)
    (w0, s0), (w1, s1) = weights[False], weights[True]
    for a, b in zip(w0, w1, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    for k in ("loss/policy", "loss/value", "loss/entropy"):
        assert s0[k] == pytest.approx(s1[k], rel=1e-5, abs=1e-7), k


def test_padding_free_changes_rollout_and_update_only_by_rounding(tmp_path, tiny_lm, monkeypatch):
    """``model.padding_free`` (fp32): the reference and critic forwards of the rollout and every
    update forward on the real tokens alone (``models.packing``) give the padded run's reference
    logprobs, values and actor and critic weights up to fp32 rounding; the packed path really
    runs (its row layouts are counted)."""
    import copy

    from rlhfkit.models import packing

    layouts: list = []
    rows_of = packing.rows_of
    monkeypatch.setattr(packing, "rows_of", lambda n: layouts.append(n) or rows_of(n))
    out = {}
    for free in (False, True):
        cfg = ppo_cfg(
            tmp_path, tiny_lm, "ppo.micro_batch_size=4", "ppo.epochs=2", "ppo.ent_coef=0.01",
            f"model.padding_free={free}",
        )  # fmt: skip
        models, exp = _seeded_buffer(cfg)
        ran = len(layouts)
        torch.manual_seed(5)
        stats = rl_update(models.learner, copy.deepcopy(exp), cfg, 0.05, True)
        params = [*models.actor.parameters(), *models.learner.critic.parameters()]
        out[free] = (exp, [p.detach().clone() for p in params], stats)
        # packed: the reference and critic forwards of both rollout chunks, and the update's
        # micro-batches that hold padding (those without any run padded: PACK_MIN_PADDING)
        assert ran == (4 if free else 0) and (len(layouts) > ran) == free
    (e0, w0, s0), (e1, w1, s1) = out[False], out[True]
    m = e0.response_mask
    assert torch.equal(m, e1.response_mask)  # the same rollout
    torch.testing.assert_close(e1.ref_logprobs[m], e0.ref_logprobs[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(e1.values[m], e0.values[m], rtol=0, atol=1e-5)  # the critic's
    assert float(e1.ref_logprobs[~m].abs().max()) == 0.0  # 0 after a response's end
    for a, b in zip(w0, w1, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    for k in ("loss/policy", "loss/value", "loss/entropy"):
        assert s0[k] == pytest.approx(s1[k], rel=1e-5, abs=1e-7), k


def test_policy_logprobs_by_column_indices_equal_the_sliced_last_columns(buffer):
    """policy_logprobs asks HF for the T state columns by index (contiguous logits, issue 24);
    the path before asked for the last T+1 columns and sliced one off. Same log-probs, entropies
    and gradients, up to fp32 rounding (the LM head runs on another row count)."""
    from rlhfkit.algos import logprobs_and_entropy

    cfg, models, exp = buffer
    actor, temp = models.actor, cfg.rollout.temperature
    seq = join(exp.prompt_ids, exp.prompt_mask, exp.response, exp.response_mask)
    outs = []
    for by_index in (True, False):
        actor.zero_grad(set_to_none=True)
        if by_index:
            lp, ent = policy_logprobs(actor, seq, temp, with_entropy=True)
        else:
            t = seq.response.shape[1]
            logits = actor(input_ids=seq.input_ids, attention_mask=seq.attention_mask,
                           position_ids=seq.position_ids, logits_to_keep=t + 1).logits[:, :-1]  # fmt: skip
            lp, ent = logprobs_and_entropy(logits, seq.response, temp)
        (lp[seq.response_mask].sum() + 0.1 * ent[seq.response_mask].sum()).backward()
        outs.append((lp.detach(), ent.detach(), [p.grad.clone() for p in actor.parameters()]))
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = outs
    torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent_a, ent_b, rtol=0, atol=1e-5)
    for a, b in zip(g_a, g_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    actor.zero_grad(set_to_none=True)
