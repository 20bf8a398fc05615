"""The critic, one small object per mode: a separate critic model, a shared trunk, or none.

Each mode owns the trained modules (the actor, and its critic if it has one) and gives the same
few things to the RL core, so the recipe and the update never ask which mode they run:
    rollout_outputs  log pi_old, entropy and V_old(s_t) (None without a critic) of a rollout
    train_outputs    the same with gradients, inside the update
    step             clip and step the optimizer(s) after a minibatch; the grad norms
    state / load     optimizer and LR-schedule state for checkpoints (consolidated under FSDP)
    weights / write  the trained weights of a checkpoint (a collective, then rank 0 writes)
    export_critic    output_dir/final-critic as a plain HF directory (nothing without a critic)

The separate critic is the seed's (InstructGPT's) layout; the shared trunk puts a value head on
the actor's own transformer (Schulman et al. 2017); no critic is the GRPO/RLOO/REINFORCE++ family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import OptimConfig, PPOConfig
from rlhfkit.models import (
    ActorCritic,
    PerTokenScalar,
    device_of,
    export_model,
    export_shared_critic,
    load_value_head,
    save_value_head,
    shared_state,
    write_trainable,
)
from rlhfkit.rollout.forward import (
    Sequences,
    actor_critic_outputs,
    critic_values,
    policy_logprobs,
)
from rlhfkit.train import dist
from rlhfkit.train.checkpoint import write_atomic_dir
from rlhfkit.train.optim import clip_and_step, make_optimizer

BETAS = (0.9, 0.999)


def _warmup(iterations: int):
    return lambda it: min(1.0, (it + 1) / iterations) if iterations else 1.0


def _adamw(params, oc: OptimConfig):
    opt = make_optimizer(params, oc.lr, oc.weight_decay, BETAS)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _warmup(oc.warmup_iterations))


class _Optimizers:
    """Named optimizers (``actor``, ``critic``) with their LR schedules and the module each one's
    parameters belong to (for consolidated FSDP state). Checkpoint keys: ``name``, ``name_sched``."""

    def __init__(self) -> None:
        self.opt: dict[str, torch.optim.Optimizer] = {}
        self.sched: dict[str, Any] = {}
        self.owner: dict[str, torch.nn.Module] = {}

    def add(self, name: str, owner, opt, sched) -> None:
        self.opt[name], self.sched[name], self.owner[name] = opt, sched, owner

    def end_iteration(self) -> None:
        for s in self.sched.values():
            s.step()  # the LR warm-up counts iterations

    def state(self) -> dict[str, Any]:
        out = {}
        for k, opt in self.opt.items():
            out[k] = dist.optimizer_state(self.owner[k], opt)
            out[f"{k}_sched"] = self.sched[k].state_dict()
        return out

    def load(self, state: dict[str, Any]) -> None:
        for k, opt in self.opt.items():
            dist.load_optimizer_state(self.owner[k], opt, state[k])
            self.sched[k].load_state_dict(state[f"{k}_sched"])


class NoCritic:
    """The critic-free mode: the actor alone. No critic model is loaded, no value forward runs,
    and no ``final-critic/`` is written."""

    has_critic = False

    def __init__(self, actor, cfg: PPOConfig):
        self.actor, self.cfg = actor, cfg
        self.generator = actor  # the module generation runs (its weights gathered under FSDP)
        self.actor_train = dist.wrap(actor, cfg.run.parallel)
        self.optims = _Optimizers()
        self.optims.add("actor", actor, *_adamw(actor.parameters(), cfg.actor))

    def rollout_outputs(self, seq: Sequences, temperature: float, sampled=None):
        """-> log pi_old (B, T), entropy (B, T), None. ``sampled``: the sampler's own (logprobs,
        entropy), used instead of a forward when given (fp32)."""
        logp, ent = sampled or policy_logprobs(self.actor, seq, temperature, with_entropy=True)
        return logp, ent, None

    def train_outputs(self, seq: Sequences, temperature: float, with_entropy: bool, policy: bool):
        logp, ent = policy_logprobs(self.actor_train, seq, temperature, with_entropy)
        return logp, ent, None

    def step(self, update_actor: bool, guard) -> dict[str, float]:
        norm = clip_and_step(
            self.actor.parameters(),
            self.optims.opt["actor"],
            None,
            self.cfg.actor.max_grad_norm,
            guard,
            where="actor gradient",
        )
        return {"grad_norm/actor": float(norm)}

    def lrs(self) -> dict[str, float]:
        return {"lr/actor": self.optims.opt["actor"].param_groups[0]["lr"]}

    def weights(self) -> dict[str, Any]:
        """Collective: the consolidated weights (None = the module's own, unsharded)."""
        return {"actor": dist.full_state_dict(self.actor)}

    def write(self, d: Path, weights: dict[str, Any], tokenizer) -> None:
        write_trainable(self.actor, tokenizer, d / "actor", weights["actor"])

    def export_critic(self, out: Path, tokenizer) -> None:
        return None


class SeparateCritic(NoCritic):
    """The seed's layout: the critic is its own sequence-classification model (SFT or RM trunk and
    a scalar head), with its own optimizer; V(s_t) is the head at every position."""

    has_critic = True

    def __init__(self, actor, critic, cfg: PPOConfig):
        super().__init__(actor, cfg)
        self.critic = critic
        self.critic_fwd = PerTokenScalar(critic)
        self.critic_train = dist.wrap(self.critic_fwd, cfg.run.parallel)
        self.optims.add("critic", critic, *_adamw(critic.parameters(), cfg.critic))

    def rollout_outputs(self, seq: Sequences, temperature: float, sampled=None):
        logp, ent, _ = super().rollout_outputs(seq, temperature, sampled)
        return logp, ent, critic_values(self.critic_fwd, seq)

    def train_outputs(self, seq: Sequences, temperature: float, with_entropy: bool, policy: bool):
        v = critic_values(self.critic_train, seq)
        if not policy:  # critic warm-up: no actor forward
            return None, None, v
        logp, ent = policy_logprobs(self.actor_train, seq, temperature, with_entropy)
        return logp, ent, v

    def step(self, update_actor: bool, guard) -> dict[str, float]:
        out = super().step(update_actor, guard) if update_actor else {}
        norm = clip_and_step(
            self.critic.parameters(),
            self.optims.opt["critic"],
            None,
            self.cfg.critic.max_grad_norm,
            guard,
            where="critic gradient",
        )
        return {**out, "grad_norm/critic": float(norm)}

    def lrs(self) -> dict[str, float]:
        return {**super().lrs(), "lr/critic": self.optims.opt["critic"].param_groups[0]["lr"]}

    def weights(self) -> dict[str, Any]:
        return {**super().weights(), "critic": dist.full_state_dict(self.critic)}

    def write(self, d: Path, weights: dict[str, Any], tokenizer) -> None:
        super().write(d, weights, tokenizer)
        write_trainable(self.critic, tokenizer, d / "critic", weights["critic"])

    def export_critic(self, out: Path, tokenizer) -> None:
        w = dist.full_state_dict(self.critic)  # every rank, when sharded
        if dist.is_main():
            write_atomic_dir(
                out / "final-critic", lambda d: export_model(self.critic, tokenizer, d, w)
            )


class SharedTrunk:
    """One transformer, two heads: logits and V(s_t) from one forward (``models.ActorCritic``).
    One AdamW with two parameter groups (the trunk at ``actor.lr``, the head at ``critic.lr``);
    the critic warm-up trains the head only. The head is checkpointed beside the actor."""

    has_critic = True

    def __init__(self, actor, cfg: PPOConfig, ckpt: Path | None):
        self.actor, self.cfg = actor, cfg
        self.ac = ActorCritic(actor)
        if ckpt is not None:
            load_value_head(self.ac.value_head, ckpt / "actor")
        self.generator = self.ac
        self.ac_train = dist.wrap(self.ac, cfg.run.parallel)
        if dist.is_sharded(self.ac):
            # FSDP2 makes the first module whose forward runs its root; generation calls the
            # policy inside, so one tiny forward through the actor-critic comes first
            with torch.no_grad():
                z = torch.zeros(1, 1, dtype=torch.long, device=device_of(actor))
                self.ac(z, torch.ones_like(z), z, logits_to_keep=1)
            self.ac.reshard()  # back to shards before the optimizer takes the parameters
        a, c = cfg.actor, cfg.critic
        groups = [
            {"params": self.ac.trunk_parameters(), "lr": a.lr, "weight_decay": a.weight_decay},
            {"params": self.ac.value_head.parameters(), "lr": c.lr, "weight_decay": c.weight_decay},
        ]
        opt = make_optimizer(groups, a.lr, a.weight_decay, BETAS)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, [_warmup(a.warmup_iterations), _warmup(c.warmup_iterations)]
        )
        self.optims = _Optimizers()
        self.optims.add("actor", self.ac, opt, sched)

    def rollout_outputs(self, seq: Sequences, temperature: float, sampled=None):
        return actor_critic_outputs(self.ac, seq, temperature, with_entropy=True)

    def train_outputs(self, seq: Sequences, temperature: float, with_entropy: bool, policy: bool):
        return actor_critic_outputs(self.ac_train, seq, temperature, with_entropy and policy)

    def step(self, update_actor: bool, guard) -> dict[str, float]:
        if not update_actor:  # critic warm-up trains the value head only: drop the trunk's grads
            for p in self.ac.trunk_parameters():
                p.grad = None
        norm = clip_and_step(
            self.ac.parameters(),
            self.optims.opt["actor"],
            None,
            self.cfg.actor.max_grad_norm,
            guard,
            where="actor-critic gradient",
        )
        return {"grad_norm/actor": float(norm)}

    def lrs(self) -> dict[str, float]:
        groups = self.optims.opt["actor"].param_groups
        return {"lr/actor": groups[0]["lr"], "lr/critic": groups[-1]["lr"]}

    def weights(self) -> dict[str, Any]:
        actor_w, head = shared_state(self.ac, dist.full_state_dict(self.ac))
        return {"actor": actor_w, "head": head}

    def write(self, d: Path, weights: dict[str, Any], tokenizer) -> None:
        write_trainable(self.actor, tokenizer, d / "actor", weights["actor"])
        save_value_head(weights["head"], d / "actor")  # beside the actor it shares

    def export_critic(self, out: Path, tokenizer) -> None:
        w = dist.full_state_dict(self.ac)  # every rank, when sharded
        if dist.is_main():
            write_atomic_dir(
                out / "final-critic", lambda d: export_shared_critic(self.ac, tokenizer, d, w)
            )
