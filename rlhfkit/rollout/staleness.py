"""Rollouts ahead of the update, within a staleness bound (``rollout.max_staleness: k``).

A batch's staleness is the number of policy updates between the weights that sampled it and
the weights that train on it. Each iteration asks its rollouts object for its batch, trains,
and tells it the new policy version:

    k = 0   ``SyncRollouts``: sample with the current policy, then train (today's loop, bit
            for bit: it calls ``collect`` as the loop always did)
    k >= 1  ``AsyncRollouts``: a rollout worker on a thread of its own samples with a copy of the
            policy while the trainer trains. It starts batch j once the trainer has published
            version j - k, with the newest weights published, so no batch is trained on more
            than k versions after the one that sampled it (checked, and logged as
            ``rollout/staleness``). At k = 1 batch i+1 is sampled while batch i trains.

In the worker's mode the trainer recomputes what depends on its own weights when it takes a batch:
log pi_old (the PPO ratio's denominator: the policy it trains, as AReaL's decoupled PPO) and,
with a critic, V(s_t) (GAE from the critic being trained, not a stale copy). The sampler's own
log-probabilities, of the older policy, stay in ``sampler_logprobs``, where
``ppo.rollout_correction: tis|mis`` weighs each token by pi_old / pi_sampler: the correction for
staleness. The reference log-probabilities and the rewards do not depend on the policy.

Weight sync after every update copies the trainable parameters into the worker's copy: every
weight in a full fine-tune, the LoRA adapters alone (not merged) with LoRA. One process only
(the worker's collectives would interleave with the trainer's across ranks).
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import sys
import threading

import torch

from rlhfkit.config import ConfigError, PPOConfig
from rlhfkit.models import autocast, device_of
from rlhfkit.rollout.collect import PromptStream, RolloutModels, Timings, collect, packs
from rlhfkit.rollout.experience import Experience
from rlhfkit.rollout.forward import join, policy_logprobs
from rlhfkit.train import dist


class SyncRollouts:
    """k = 0: each iteration's batch sampled by the current policy (staleness 0)."""

    def __init__(self, models: RolloutModels, prompts, stream: PromptStream, cfg, normalize):
        self.args = (models, prompts, stream, cfg, normalize)

    def next(self, it: int) -> tuple[Experience, Timings, int]:
        exp, timings = collect(*self.args)
        return exp, timings, 0

    def published(self, version: int) -> None:
        """The trainer's policy after ``version`` updates (nothing to do: it samples itself)."""

    def close(self) -> None:
        pass


class _Snapshot:
    """The worker's learner: a copy of the actor that samples and scores its own samples
    (log pi of the sampling policy; no values: the trainer computes them)."""

    has_critic = False

    def __init__(self, actor):
        self.actor = self.generator = copy.deepcopy(actor)
        self.actor.eval()

    def rollout_outputs(self, seq, temperature: float, sampled=None):
        logp, ent = sampled or policy_logprobs(self.actor, seq, temperature, with_entropy=True)
        return logp, ent, None


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters an update changes, copied (detached): what a weight sync sends."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


class AsyncRollouts:
    """k >= 1: the next batches sampled on a worker thread by a copy of the policy that is at
    most k versions behind the trainer when its batch is trained on."""

    def __init__(self, models: RolloutModels, prompts, stream, cfg: PPOConfig, normalize):
        if dist.world() > 1:
            raise ConfigError(
                f"rollout.max_staleness: {cfg.rollout.max_staleness} runs the rollout worker on "
                f"a thread of one process; this run has {dist.world()} ranks (use 0)"
            )
        if cfg.ppo.rollout_correction == "none":
            print(
                f"warning: rollout.max_staleness: {cfg.rollout.max_staleness} with "
                "ppo.rollout_correction: none trains on an older policy's samples without "
                "weighing them; set ppo.rollout_correction: tis",
                file=sys.stderr,
            )
        self.models, self.cfg, self.k = models, cfg, cfg.rollout.max_staleness
        snapshot = _Snapshot(models.learner.actor)
        rng = torch.Generator(device="cpu").manual_seed(int(torch.initial_seed()) + 7919)
        self.worker_models = dataclasses.replace(models, learner=snapshot, rng=rng)
        self.args = (prompts, stream, cfg, normalize)
        self.cond = threading.Condition()
        self.version, self.weights, self.synced = 0, None, 0
        self.batches: queue.Queue = queue.Queue()
        self.stop = False
        self.start, self.end = None, cfg.run.iterations

    def _work(self, first: int) -> None:
        try:
            for j in range(first, self.end):
                with self.cond:  # batch j waits for version j - k
                    self.cond.wait_for(lambda j=j: self.stop or self.version >= j - self.k)
                    if self.stop:
                        return
                    if self.weights is not None and self.synced < self.version:
                        load_trainable(self.worker_models.learner.actor, self.weights)
                        self.synced = self.version
                    version = self.synced
                exp, timings = collect(self.worker_models, *self.args)
                self.batches.put((j, version, exp, timings))
        except BaseException as e:  # the trainer raises it when it asks for the batch
            self.batches.put((None, None, e, None))

    def next(self, it: int) -> tuple[Experience, Timings, int]:
        if self.start is None:  # the first call (a resumed run starts past 0)
            self.version = self.synced = self.start = it
            self.thread = threading.Thread(
                target=self._work, args=(it,), daemon=True, name="rlhfkit-rollout"
            )
            self.thread.start()
        j, version, exp, timings = self.batches.get()
        if j is None:
            raise exp
        staleness = it - version
        if j != it or not 0 <= staleness <= self.k:
            raise RuntimeError(
                f"rollout worker: batch {j} of version {version} at iteration {it} (staleness "
                f"{staleness} > rollout.max_staleness {self.k})"
            )
        refresh(self.models, exp, self.cfg)  # also at staleness 0: the worker has no critic
        return exp, timings, staleness

    def published(self, version: int) -> None:
        weights = trainable_state(self.models.learner.actor)
        with self.cond:
            self.version, self.weights = version, weights
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        if self.start is not None:
            self.thread.join()


@torch.no_grad()
def refresh(models: RolloutModels, exp: Experience, cfg: PPOConfig) -> None:
    """log pi_old and V(s_t) of ``exp`` from the trainer's current weights (in place); the
    sampler's log pi stays in ``sampler_logprobs``."""
    learner = models.learner
    seq = join(exp.prompt_ids, exp.prompt_mask, exp.response, exp.response_mask, packs(cfg.model))
    learner.actor.eval()
    try:
        with autocast(cfg.model.dtype, device_of(learner.actor)):
            logprobs, _, values = learner.rollout_outputs(seq, cfg.rollout.temperature)
    finally:
        learner.actor.train()
    exp.logprobs, exp.values = logprobs, values


def rollouts_for(models: RolloutModels, prompts, stream, cfg: PPOConfig, normalize):
    """The rollouts of ``rollout.max_staleness``: synchronous at 0, a worker ahead otherwise."""
    kind = AsyncRollouts if cfg.rollout.max_staleness else SyncRollouts
    return kind(models, prompts, stream, cfg, normalize)


__all__ = ["AsyncRollouts", "SyncRollouts", "refresh", "rollouts_for"]
