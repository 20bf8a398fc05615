"""Options that were never checked to do what they say: reward_clip, missing_eos_penalty,
stop_strings, gradient clipping, critic_init: rm, and the RM's stored score statistics."""

import pytest
import torch
from test_ppo import ppo_cfg

from rlhfkit.data.build import load_prompts
from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer, collect
from rlhfkit.rollout.rewards import decode_texts
from rlhfkit.stages.ppo import load_models
from rlhfkit.train.optim import clip_and_step


def _rollout(cfg, reward):
    torch.manual_seed(0)
    models = load_models(cfg, None, reward)
    prompts, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    pc = cfg.ppo
    norm = ScoreNormalizer(pc.reward_norm, None, pc.reward_clip)  # as run_ppo builds it
    exp, _ = collect(models, prompts, PromptStream(len(prompts), 0), cfg, norm)
    return models, exp


def test_reward_clip_bounds_the_normalised_score(tmp_path, tiny_lm):
    big = lambda p, r: [10.0 * (i % 3 - 1) for i in range(len(r))]  # noqa: E731  -10, 0, 10
    _, exp = _rollout(ppo_cfg(tmp_path, tiny_lm, "ppo.reward_clip=0.5"), big)
    assert exp.raw_scores.abs().max() == 10.0
    torch.testing.assert_close(exp.scores, exp.raw_scores.clamp(-0.5, 0.5), rtol=0, atol=0)


def test_missing_eos_penalty_is_subtracted_from_truncated_responses_only(tmp_path, tiny_lm):
    zero = lambda p, r: [0.0] * len(r)  # noqa: E731
    cfg = ppo_cfg(tmp_path, tiny_lm, "rollout.missing_eos_penalty=2.5", "rollout.max_new_tokens=4")
    _, exp = _rollout(cfg, zero)
    assert exp.stopped.any() and (~exp.stopped).any()
    torch.testing.assert_close(exp.scores, -2.5 * (~exp.stopped).float(), rtol=0, atol=0)


def test_stop_strings_end_responses_at_the_string(tmp_path, tiny_lm):
    zero = lambda p, r: [0.0] * len(r)  # noqa: E731
    cfg = ppo_cfg(tmp_path, tiny_lm, "rollout.stop_strings=red", "rollout.max_new_tokens=12")
    models, exp = _rollout(cfg, zero)
    _, texts = decode_texts(
        models.tokenizer, exp.prompt_ids, exp.prompt_mask, exp.response, exp.response_mask
    )
    eos = models.tokenizer.eos_token_id
    ended_on_red = [t.split()[-1:] == ["red"] for t in texts]
    assert any(ended_on_red)
    for i, words in enumerate(t.split() for t in texts):
        assert "red" not in words[:-1]  # nothing after the first 'red'
        last = exp.response[i][exp.response_mask[i]][-1]
        assert bool(exp.stopped[i]) == (ended_on_red[i] or int(last) == eos)


def test_gradient_clipping_scales_the_gradient_to_the_limit_and_reports_the_norm():
    w = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    w.grad = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)  # norm 5
    opt = torch.optim.SGD([w], lr=1.0)
    norm = clip_and_step([w], opt, None, max_grad_norm=1.0)
    assert float(norm) == pytest.approx(5.0)  # the norm before clipping is what is logged
    torch.testing.assert_close(
        w.detach(), -torch.tensor([0.6, 0.8, 0, 0], dtype=torch.float64), rtol=0, atol=1e-6
    )
    w.grad = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)
    clip_and_step([w], opt, None, max_grad_norm=0.0)  # 0 = no clipping
    torch.testing.assert_close(
        w.detach(), -torch.tensor([3.6, 4.8, 0, 0], dtype=torch.float64), rtol=0, atol=1e-6
    )


def test_critic_init_rm_starts_the_critic_from_the_reward_model(tmp_path, tiny_lm):
    from test_rewards import make_rm

    rm = make_rm(tiny_lm, tmp_path / "rm", seed=7)
    models = load_models(
        ppo_cfg(tmp_path, tiny_lm, f"reward_model={rm}", "reward_fn=", "critic_init=rm"), None, None
    )
    critic = models.learner.critic.state_dict()
    from transformers import AutoModelForSequenceClassification

    want = AutoModelForSequenceClassification.from_pretrained(rm).state_dict()
    assert critic.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(critic[k], want[k], rtol=0, atol=0)
    fresh = load_models(
        ppo_cfg(tmp_path / "s", tiny_lm, f"reward_model={rm}", "reward_fn="), None, None
    )
    assert not torch.equal(fresh.learner.critic.score.weight, want["score.weight"])
