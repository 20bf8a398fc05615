"""Job of the distributed tests (``dist_jobs.py``): one PPO update on a fixed rollout, for each of
several learner modes. Every rank builds the same 16-episode buffer, keeps its own slice, and
trains on it; rank 0 saves the updated (consolidated) weights and the logged losses to OUT/MODE.

args: LM PROMPTS OUT MODES_JSON [key=value overrides for every mode]
MODES_JSON: {"mode name": ["key=value", ...], ...}"""

import json
from pathlib import Path

import torch

from rlhfkit.config import PPOConfig, load_config
from rlhfkit.data.build import load_prompts
from rlhfkit.rl.update import advantages, rl_update
from rlhfkit.rollout.collect import ScoreNormalizer, rollout_chunk
from rlhfkit.rollout.experience import concat
from rlhfkit.stages.ppo import load_models
from rlhfkit.train import dist


def ppo_update(lm: str, prompts: str, out: str, modes_json: str, *overrides: str) -> None:
    for name, mode in json.loads(modes_json).items():
        update_once(lm, prompts, str(Path(out) / name), *mode, *overrides)


def update_once(lm: str, prompts: str, out: str, *overrides: str) -> None:
    cfg = load_config(
        PPOConfig,
        None,
        [
            f"model.name_or_path={lm}",
            "reward_fn=x:y",
            f"data.train_file={prompts}",
            "rollout.max_new_tokens=8",
            "rollout.episodes_per_iteration=16",
            "ppo.minibatch_size=16",
            "ppo.micro_batch_size=4",
            "ppo.epochs=1",
            "actor.lr=1e-2",
            "critic.lr=1e-2",
            "ppo.reward_norm=none",
            "ppo.ent_coef=0.01",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    models = load_models(
        cfg, None, lambda p, r: [float(x.count("good")) + 0.1 * len(x.split()) for x in r]
    )
    items, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    torch.manual_seed(1)  # the same rollout on every rank
    n_samples = cfg.rollout.samples_per_prompt
    chosen = [p for p in items[: 16 // n_samples] for _ in range(n_samples)]
    group = torch.arange(16 // n_samples).repeat_interleave(n_samples)
    exp, _ = rollout_chunk(models, chosen, group, cfg, ScoreNormalizer("none", None, 0))
    full = concat([exp], models.tokenizer.pad_token_id)
    env_tokens = float((full.response_mask & ~full.loss_mask).sum())  # environment turns
    n, r = dist.world(), dist.rank()
    exp = full.select(torch.arange(r * 16 // n, (r + 1) * 16 // n))
    metrics = advantages(exp, 0.05, cfg.ppo)
    sharded = dist.is_sharded(models.actor)
    metrics.update(rl_update(models.learner, exp, cfg, 0.05, update_actor=True))
    trained = {"actor": models.actor}
    learner = models.learner
    if hasattr(learner, "critic"):
        trained["critic"] = learner.critic
    elif hasattr(learner, "ac"):
        trained["critic"] = learner.ac.value_head
    weights = {k: dist.full_state_dict(m) or m.state_dict() for k, m in trained.items()}
    if dist.is_main():
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save(weights, Path(out) / "w.pt")
        metrics["sharded"] = float(sharded)
        metrics["env_tokens"] = env_tokens
        (Path(out) / "metrics.json").write_text(json.dumps(metrics))
    dist.barrier()
