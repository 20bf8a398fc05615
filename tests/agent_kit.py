"""Shared pieces of the agent tests: small environments, episode settings, the config of an
agent run, and float64 references of the episode contract (GAE over the model's tokens)."""

from __future__ import annotations

import dataclasses

import agent_env
import torch
from conftest import COLORS
from test_ppo import ppo_cfg

from rlhfkit.data.build import PromptItem, load_prompts
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.rl.update import advantages, micro_step, minibatch_denominator, rl_update
from rlhfkit.rollout.collect import ScoreNormalizer, rollout_chunk
from rlhfkit.rollout.episodes import (
    EnvSettings,
    MultiTurn,
)
from rlhfkit.rollout.experience import Experience
from rlhfkit.stages.ppo import load_models


def count_good(prompts, responses):
    return [float(r.split().count("good")) for r in responses]


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


def sample_kw(tok, eos=True):
    return {**SAMPLE, "eos_id": tok.eos_token_id if eos else None, "pad_id": tok.pad_token_id}


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


def agent_cfg(tmp_path, lm, *extra):
    """test_ppo's tiny run with the agent tests' smaller batches; the reward is the environment's
    unless ``extra`` names one (``reward_fn=null`` unsets test_ppo's)."""
    return ppo_cfg(
        tmp_path, lm, "reward_fn=null", "data.max_prompt_length=16",
        "rollout.episodes_per_iteration=16", "rollout.chunk_size=16", "rollout.max_new_tokens=6",
        "ppo.minibatch_size=8", "ppo.micro_batch_size=4", "ppo.epochs=1", "actor.lr=1e-2",
        "critic.lr=1e-2", *extra,
    )  # fmt: skip


def rollout_and_update(cfg, sampler, reward):
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


def loss_and_grads(models, exp, cfg):
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


def echo_cfg(tmp_path, lm, *extra):
    return agent_cfg(
        tmp_path, lm, "env=agent_env:make", "rollout.max_turns=2", "rollout.max_total_tokens=32",
        *extra,
    )  # fmt: skip
