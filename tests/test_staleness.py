"""Asynchronous rollouts within a staleness bound (``rollout.max_staleness``, issue 33), with the
``hf`` engine: a rollout worker on its own thread samples with a copy of the policy."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_ppo import count_good, ppo_cfg
from transformers import AutoModelForCausalLM

from rlhfkit.config import ConfigError
from rlhfkit.data.build import load_prompts
from rlhfkit.rollout import staleness
from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer
from rlhfkit.rollout.staleness import AsyncRollouts
from rlhfkit.stages.ppo import load_models, run_ppo
from rlhfkit.train.logger import read_metrics


def _weights(final):
    return AutoModelForCausalLM.from_pretrained(final).state_dict()


@pytest.mark.slow  # three tiny runs of 3 iterations: ~10 s
def test_staleness_0_is_the_synchronous_loop_bit_for_bit_and_1_is_not(tmp_path, tiny_lm):
    runs = {}
    for name, extra in (("default", []), ("k0", ["rollout.max_staleness=0"]),
                        ("k1", ["rollout.max_staleness=1", "ppo.rollout_correction=tis"])):  # fmt: skip
        cfg = ppo_cfg(
            tmp_path / name,
            tiny_lm,
            "ppo.estimator=grpo",
            "rollout.samples_per_prompt=4",
            "run.iterations=3",
            *extra,
        )
        runs[name] = (run_ppo(cfg, reward_fn=count_good), read_metrics(tmp_path / name / "ppo"))
    a, b, c = (_weights(runs[n][0]) for n in ("default", "k0", "k1"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    assert [r["score/mean"] for r in runs["default"][1]] == [r["score/mean"] for r in runs["k0"][1]]
    assert "rollout/staleness" not in runs["k0"][1][0]
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the worker's run is another run
    stale = [r["rollout/staleness"] for r in runs["k1"][1]]
    assert stale[0] == 0 and all(s in (0, 1) for s in stale), stale
    assert sum(stale) >= 1, stale  # the worker ran ahead at least once


def _async(tmp_path, lm, *extra):
    cfg = ppo_cfg(
        tmp_path, lm, "ppo.estimator=grpo", "rollout.samples_per_prompt=4", "rollout.max_staleness=1",
        "ppo.rollout_correction=tis", "run.iterations=8", *extra,
    )  # fmt: skip
    torch.manual_seed(0)
    models = load_models(cfg, None, count_good)
    prompts, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    rollouts = AsyncRollouts(
        models, prompts, PromptStream(len(prompts), 0), cfg, ScoreNormalizer("none", None, 0)
    )
    return models, rollouts


def _an_update(models) -> None:
    """Stands in for an optimizer step: every trainable weight moves."""
    with torch.no_grad():
        for p in models.learner.actor.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def _sync_gap(exp) -> float:
    """The worker's log pi of its sampled tokens against the trainer's, over the tokens."""
    m = exp.loss_mask
    return float((exp.sampler_logprobs - exp.logprobs)[m].abs().max())


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_worker_is_at_most_k_versions_behind_and_samples_with_the_synced_weights(
    tmp_path, tiny_lm, lora
):
    """Batch j starts once version j - 1 is published, with the newest weights: staleness 1 from
    the second batch on. After a sync the worker's log-probabilities of its own sampled tokens
    equal the trainer's to fp32 rounding (its weights are the trainer's: all of them, or the
    LoRA adapters alone); the first batch, sampled before any update, too."""
    extra = ["model.lora.enabled=true", "model.lora.r=4"] if lora else []
    models, rollouts = _async(tmp_path, tiny_lm, *extra)
    try:
        exp, _, s = rollouts.next(0)
        assert s == 0 and _sync_gap(exp) < 1e-4
        _an_update(models)  # version 1, not yet published: batch 1 was sampled by version 0
        exp, _, s = rollouts.next(1)
        assert s == 1 and _sync_gap(exp) > 1e-2  # the trainer moved on: a real gap
        rollouts.published(1)
        exp, _, s = rollouts.next(2)  # sampled by version 1, which the trainer still holds
        assert s == 1 and _sync_gap(exp) < 1e-4
        if lora:
            sent = staleness.trainable_state(models.learner.actor)
            assert sent and all("lora_" in n for n in sent)  # the adapters alone, not merged
    finally:
        rollouts.close()


def test_a_skipped_weight_sync_is_caught_by_the_sync_check(tmp_path, tiny_lm, monkeypatch):
    """The broken twin of the test above: a sync that never loads the weights."""
    monkeypatch.setattr(staleness, "load_trainable", lambda module, state: None)
    models, rollouts = _async(tmp_path, tiny_lm)
    try:
        rollouts.next(0)
        _an_update(models)
        rollouts.next(1)
        rollouts.published(1)
        exp, _, s = rollouts.next(2)
        assert s == 1 and _sync_gap(exp) > 1e-2  # the check above would fail
    finally:
        rollouts.close()


def test_a_worker_error_reaches_the_trainer(tmp_path, tiny_lm):
    models, rollouts = _async(tmp_path, tiny_lm)

    def broken(*args, **kw):
        raise ValueError("reward source down")

    rollouts.worker_models = dataclasses.replace(rollouts.worker_models, reward=broken)
    try:
        with pytest.raises(ValueError, match="reward source down"):
            rollouts.next(0)
    finally:
        rollouts.close()


def test_staleness_with_fsdp_is_a_config_error(tmp_path, tiny_lm):
    with pytest.raises(ConfigError, match=r"rollout.max_staleness: 1 .* run.parallel: fsdp"):
        ppo_cfg(tmp_path, tiny_lm, "rollout.max_staleness=1", "run.parallel=fsdp")
