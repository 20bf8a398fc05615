"""The shared actor-critic trunk: one transformer, the LM head and a value head on it."""

import dataclasses
import shutil

import pytest
import torch
from test_lora import LORA
from test_ppo import buffer, count_good, ppo_cfg  # noqa: F401  (buffer is a fixture)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhfkit.config import ConfigError
from rlhfkit.data.build import load_prompts
from rlhfkit.rl.update import advantages, rl_update
from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer, collect
from rlhfkit.rollout.forward import actor_critic_outputs, join, policy_logprobs
from rlhfkit.stages.ppo import load_models, run_ppo
from rlhfkit.train.logger import read_metrics

SHARED = ["shared_trunk=true"]


def _collect(cfg, models):
    prompts, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    norm = ScoreNormalizer("none", None, 0)
    return collect(models, prompts, PromptStream(len(prompts), 0), cfg, norm)[0]


def test_shared_forward_gives_the_actors_logprobs_and_ratio_one(tmp_path, tiny_lm):
    cfg = ppo_cfg(tmp_path, tiny_lm, *SHARED)
    torch.manual_seed(0)
    models = load_models(cfg, None, count_good)
    assert not hasattr(models.learner, "critic") and models.learner.ac.policy is models.actor
    exp = _collect(cfg, models)
    mb = exp.select(torch.tensor([5, 1, 20, 11]))  # another batch layout than the rollout's
    seq = join(mb.prompt_ids, mb.prompt_mask, mb.response, mb.response_mask)
    m = mb.response_mask
    ref_logp, _ = policy_logprobs(models.actor, seq, cfg.rollout.temperature)  # plain HF forward
    logp, ent, v = actor_critic_outputs(models.learner.ac, seq, cfg.rollout.temperature, True)
    torch.testing.assert_close(logp[m], ref_logp[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(logp[m], mb.logprobs[m], rtol=0, atol=1e-5)  # ratio == 1
    torch.testing.assert_close(v[m], mb.values[m], rtol=0, atol=1e-5)
    # V(s_t) is the value head on the trunk's last hidden state at the state's column
    hidden = models.actor.model(
        input_ids=seq.input_ids, attention_mask=seq.attention_mask, position_ids=seq.position_ids
    ).last_hidden_state
    p = seq.prompt_width
    direct = models.learner.ac.value_head(hidden[:, p - 1 : p - 1 + m.shape[1]]).squeeze(-1)
    torch.testing.assert_close(v[m], direct[m], rtol=0, atol=1e-6)
    assert ent is not None and (ent[m] > 0).all()


def test_shared_trunk_with_no_value_loss_updates_the_actor_like_a_separate_critic(
    buffer,  # noqa: F811
    tiny_lm,
    tmp_path,
):
    """vf_coef = 0: the trunk sees only the policy loss, so its update must equal the separate
    actor's update on the same experience (same lr, clipping and AdamW)."""
    cfg, models, exp = buffer
    cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, vf_coef=0.0))
    shared_cfg = dataclasses.replace(cfg, shared_trunk=True)
    shared = load_models(shared_cfg, None, count_good)
    after = []
    for c, mod in ((cfg, models), (shared_cfg, shared)):
        torch.manual_seed(3)  # the same minibatch shuffles
        rl_update(mod.learner, dataclasses.replace(exp), c, 0.05, update_actor=True)
        after.append(mod.actor.state_dict())
    changed = 0
    for k, w in after[0].items():
        torch.testing.assert_close(after[1][k], w, rtol=0, atol=1e-6)
        changed += not torch.equal(w, AutoModelForCausalLM.from_pretrained(tiny_lm).state_dict()[k])
    assert changed > 0  # the update did something


def test_shared_critic_warmup_trains_the_value_head_only(tmp_path, tiny_lm):
    cfg = ppo_cfg(tmp_path, tiny_lm, *SHARED, "ppo.critic_warmup_iterations=1")
    models = load_models(cfg, None, count_good)
    before = {k: v.clone() for k, v in models.learner.ac.state_dict().items()}
    exp = _collect(cfg, models)
    advantages(exp, 0.05, cfg.ppo)
    rl_update(models.learner, exp, cfg, 0.05, update_actor=False)
    after = models.learner.ac.state_dict()
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same != (k == "value_head.weight"), k


def test_shared_config_rejects_an_rm_initialised_critic():
    from rlhfkit.config import PPOConfig, load_config

    with pytest.raises(ConfigError, match="critic_init"):
        load_config(
            PPOConfig,
            None,
            ["model.name_or_path=x", "reward_model=r", "critic_init=rm", "shared_trunk=true"],
        )


@pytest.mark.parametrize("lora", [False, True])
def test_shared_run_resumes_exactly_and_exports_plain_hf(tmp_path, tiny_lm, lora):
    extra = [*SHARED, "run.iterations=3", "rollout.episodes_per_iteration=16", "ppo.epochs=2"]
    extra += LORA + ["actor.lr=1e-2"] if lora else []
    a = run_ppo(ppo_cfg(tmp_path / "a", tiny_lm, *extra), reward_fn=count_good)
    b_cfg = ppo_cfg(tmp_path / "b", tiny_lm, *extra, "run.save_every=2")
    run_ppo(b_cfg, reward_fn=count_good)
    out = tmp_path / "b" / "ppo"
    assert (out / "checkpoints" / "step-000002" / "actor" / "value_head.safetensors").exists()
    assert not (out / "checkpoints" / "step-000002" / "critic").exists()
    shutil.rmtree(out / "checkpoints" / "step-000003")
    shutil.rmtree(out / "final")
    b = run_ppo(b_cfg, reward_fn=count_good)
    ma, mb = read_metrics(tmp_path / "a" / "ppo"), read_metrics(out)
    assert [r["step"] for r in mb] == [1, 2, 3]
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["score/mean"] == rb["score/mean"]
        assert ra["loss/value"] == pytest.approx(rb["loss/value"], abs=1e-6)
        assert "grad_norm/critic" not in rb and "grad_norm/actor" in rb
    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    # final-critic: the shared trunk with score = the value head, loadable without rlhfkit
    critic = AutoModelForSequenceClassification.from_pretrained(out / "final-critic")
    actor = AutoModelForCausalLM.from_pretrained(b)
    for k, w in actor.model.state_dict().items():
        torch.testing.assert_close(critic.model.state_dict()[k], w, rtol=0, atol=0)
    from safetensors.torch import load_file

    head = load_file(out / "checkpoints" / "step-000003" / "actor" / "value_head.safetensors")
    torch.testing.assert_close(critic.score.weight, head["weight"], rtol=0, atol=0)
    ids = torch.tensor([[1, 5, 6, 7]])
    hidden = actor.model(ids).last_hidden_state[0, -1]
    torch.testing.assert_close(
        critic(ids).logits[0, 0], critic.score.weight[0] @ hidden, rtol=0, atol=1e-5
    )
