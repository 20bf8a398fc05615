"""The RL core shared by PPO and the critic-free family: groups in the rollout, the no-critic mode,
config errors, the metric-name contract, and learning with each critic-free estimator."""

import re
from pathlib import Path

import pytest
import torch
from conftest import count_calls
from test_ppo import count_good, ppo_cfg
from transformers import AutoModelForCausalLM

import rlhfkit.rl.critics as critics_module
import rlhfkit.rollout.forward as forward_module
from rlhfkit.config import ConfigError, PPOConfig, load_config
from rlhfkit.data.build import load_prompts
from rlhfkit.rl.critics import NoCritic
from rlhfkit.rl.metrics import RL_METRICS
from rlhfkit.rl.update import advantages
from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer, collect
from rlhfkit.stages.ppo import load_models, run_ppo
from rlhfkit.train.logger import read_metrics

DOCS = Path(__file__).parent.parent / "docs"
GROUP = ["rollout.samples_per_prompt=4"]


def _cfg(*extra):
    return load_config(PPOConfig, None, ["model.name_or_path=x", "reward_fn=a:b", *extra])


@pytest.mark.parametrize(
    "extra,match",
    [
        (["ppo.estimator=grpo"], "samples_per_prompt >= 2"),
        (["ppo.estimator=rloo", "rollout.samples_per_prompt=1"], "samples_per_prompt >= 2"),
        (["ppo.estimator=reinforce++_baseline"], "samples_per_prompt >= 2"),
        (["ppo.estimator=grpo", *GROUP, "shared_trunk=true"], "shared_trunk: .* uses no critic"),
        (["ppo.estimator=rloo", *GROUP, "ppo.critic_warmup_iterations=2"], "uses no critic"),
        (["rollout.samples_per_prompt=3"], "must divide"),
        (["ppo.dual_clip=0.5"], "must be > 1"),
        (["ppo.estimator=ppo"], "not one of"),
    ],
)
def test_what_an_estimator_cannot_provide_is_a_config_error(extra, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(*extra)


def test_a_release_ppo_config_still_loads_unchanged():
    cfg = load_config(PPOConfig, Path(__file__).parent.parent / "configs/tiny/ppo.yaml")
    assert cfg.ppo.estimator == "gae" and cfg.rollout.samples_per_prompt == 1
    assert cfg.ppo.kl_in == "reward" and cfg.ppo.clip_eps_high is None and cfg.ppo.dual_clip == 0


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce++", "reinforce++_baseline"])
def test_each_estimator_has_a_ready_config(name):
    path = Path(__file__).parent.parent / f"configs/tiny/{name.replace('++', 'pp')}.yaml"
    cfg = load_config(PPOConfig, path)
    assert cfg.ppo.estimator == name


def test_rollout_gives_each_prompt_n_responses_in_one_group(tmp_path, tiny_lm):
    cfg = ppo_cfg(tmp_path, tiny_lm, "ppo.estimator=grpo", *GROUP)
    torch.manual_seed(0)
    models = load_models(cfg, None, count_good)
    prompts, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    exp, timings = collect(
        models, prompts, PromptStream(len(prompts), 0), cfg, ScoreNormalizer("none", None, 0)
    )
    assert len(exp) == 32 and exp.values is None and timings.generate > 0
    ids = exp.group.tolist()
    assert ids == sorted(ids) and len(set(ids)) == 8
    for g in set(ids):
        rows = (exp.group == g).nonzero().squeeze(1)
        assert len(rows) == 4
        assert all(torch.equal(exp.prompt_ids[rows[0]], exp.prompt_ids[r]) for r in rows)
    # the n responses to one prompt are sampled independently: not all the same
    assert any(
        len(
            {
                tuple(exp.response[r][exp.response_mask[r]].tolist())
                for r in (exp.group == g).nonzero().squeeze(1)
            }
        )
        > 1
        for g in set(ids)
    )
    advantages(exp, 0.05, cfg.ppo)
    assert exp.returns is not None and exp.advantages.shape == exp.response.shape


def test_critic_free_runs_load_write_and_call_no_critic(tmp_path, tiny_lm, monkeypatch):
    """No critic model is loaded, no value forward runs (counted), no critic is checkpointed
    or exported."""
    import rlhfkit.stages.ppo as ppo_module

    calls = count_calls(monkeypatch, critics_module, "critic_values")
    count_calls(monkeypatch, forward_module, "critic_values", calls)
    count_calls(monkeypatch, critics_module, "actor_critic_outputs", calls)
    count_calls(monkeypatch, ppo_module, "load_trainable_scalar", calls)
    cfg = ppo_cfg(
        tmp_path, tiny_lm, "ppo.estimator=rloo", *GROUP, "run.iterations=2", "run.save_every=1"
    )
    models = load_models(cfg, None, count_good)
    assert isinstance(models.learner, NoCritic) and set(models.learner.optims.opt) == {"actor"}
    run_ppo(cfg, reward_fn=count_good)
    assert calls == {"critic_values": 0, "actor_critic_outputs": 0, "load_trainable_scalar": 0}
    out = tmp_path / "ppo"
    assert not (out / "final-critic").exists() and (out / "final" / "config.json").exists()
    ckpts = sorted((out / "checkpoints").iterdir())
    assert ckpts and all(not (c / "critic").exists() for c in ckpts)
    rows = read_metrics(out)
    assert all("loss/value" not in r and "value/mean" not in r for r in rows)
    # and the counter does count: a PPO run calls the critic
    cfg = ppo_cfg(tmp_path / "ppo", tiny_lm, "run.iterations=1")
    run_ppo(cfg, reward_fn=count_good)
    assert calls["critic_values"] > 0 and calls["load_trainable_scalar"] == 1


def _documented_rl_metrics() -> set[str]:
    text = (DOCS / "metrics.md").read_text()
    section = text.split("## PPO", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([a-z_]+/[a-z_0-9]+)`", line.split("|")[1]))
    return names


def test_metric_names_are_the_documented_ones():
    assert _documented_rl_metrics() == set(RL_METRICS)


# --------------------------------------------------------------------------- learning


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce++", "reinforce++_baseline"])
def test_critic_free_estimator_raises_a_toy_reward_with_bounded_kl(tmp_path, tiny_lm, name):
    extra = [f"ppo.estimator={name}", *GROUP, "run.iterations=16", "ppo.kl_coef=0.1"]
    extra += ["run.seed=1", "ppo.epochs=2"]
    if name == "dr_grpo":
        extra.append("ppo.aggregation=token_sum_norm")
    if name == "grpo":
        extra += ["ppo.kl_in=loss", "ppo.kl_estimator=k3", "ppo.clip_eps_high=0.28"]
    cfg = ppo_cfg(tmp_path, tiny_lm, *extra)
    final = run_ppo(cfg, reward_fn=count_good)
    rows = read_metrics(cfg.run.output_dir)
    assert len(rows) == 16
    assert set().union(*rows) <= set(RL_METRICS) | {"step"}
    first = sum(r["score/mean"] for r in rows[:3]) / 3
    last = sum(r["score/mean"] for r in rows[-3:]) / 3
    assert last > first + 1.5, (first, last)
    assert max(r["kl/seq_mean"] for r in rows) < 30.0
    assert ("loss/kl" in rows[-1]) == (name == "grpo")
    assert AutoModelForCausalLM.from_pretrained(final).config.vocab_size > 0


def test_a_new_estimator_is_one_function_and_one_registry_line(tmp_path, tiny_lm, monkeypatch):
    """The extension point the docs promise: register, then select it by name in a config."""
    from rlhfkit.algos import ESTIMATORS, Estimator, group_moments

    def mean_plus_std_baseline(scores, group, mask):  # A_i = r_i - (mean_g + std_g)
        mean, std, _ = group_moments(scores, group)
        adv = torch.where(mask, (scores - mean - std)[:, None], 0.0)
        return adv, adv

    monkeypatch.setitem(
        ESTIMATORS, "max_ish", Estimator(mean_plus_std_baseline, ("scores", "group", "mask"), False)
    )
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        _cfg("ppo.estimator=max_ish")  # the registry says it needs groups
    cfg = ppo_cfg(tmp_path, tiny_lm, "ppo.estimator=max_ish", *GROUP, "run.iterations=1")
    run_ppo(cfg, reward_fn=count_good)
    assert "loss/policy" in read_metrics(tmp_path / "ppo")[0]
    assert not (tmp_path / "ppo" / "final-critic").exists()  # no critic: the registry said so


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_outcome_estimators_see_the_reward_side_kl_penalty(tmp_path, tiny_lm, kl_in):
    """grpo reads per-response scores: with kl_in: reward they are R_final - beta sum_t KL_t (as
    TRL's RLOO and OpenRLHF), so the penalty regularises it; with kl_in: loss, R_final alone."""
    from rlhfkit.algos import grpo_advantages, kl_penalty, masked_sum

    cfg = ppo_cfg(tmp_path, tiny_lm, "ppo.estimator=grpo", *GROUP, f"ppo.kl_in={kl_in}")
    torch.manual_seed(0)
    models = load_models(cfg, None, count_good)
    prompts, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    exp, _ = collect(
        models, prompts, PromptStream(len(prompts), 0), cfg, ScoreNormalizer("none", None, 0)
    )
    exp.ref_logprobs = exp.ref_logprobs - 0.3 * torch.rand_like(exp.ref_logprobs)  # a moved policy
    advantages(exp, 0.5, cfg.ppo)
    kl = masked_sum(kl_penalty(exp.logprobs, exp.ref_logprobs, "k1"), exp.response_mask, dim=1)
    seq = exp.scores - 0.5 * kl if kl_in == "reward" else exp.scores
    want, _ = grpo_advantages(seq, exp.group, exp.response_mask)
    torch.testing.assert_close(exp.advantages, want, rtol=0, atol=1e-5)
