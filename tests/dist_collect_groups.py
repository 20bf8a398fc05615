"""Job of the distributed tests (``dist_jobs.py``): every rank collects its share of one iteration
with samples_per_prompt = 4; rank 0 saves every rank's group ids and prompts to OUT.

args: LM PROMPTS OUT"""

import json
from pathlib import Path

import torch

from rlhfkit.config import PPOConfig, load_config
from rlhfkit.data.build import load_prompts
from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer, collect
from rlhfkit.stages.ppo import load_models
from rlhfkit.train import dist


def collect_groups(lm: str, prompts: str, out: str) -> None:
    cfg = load_config(
        PPOConfig,
        None,
        [
            f"model.name_or_path={lm}",
            "reward_fn=x:y",
            f"data.train_file={prompts}",
            "rollout.max_new_tokens=4",
            "rollout.episodes_per_iteration=32",
            "rollout.chunk_size=8",  # 2 prompts x 4 samples per chunk and rank: several chunks
            "rollout.samples_per_prompt=4",
            "ppo.estimator=grpo",
            "ppo.minibatch_size=16",
            "ppo.micro_batch_size=8",
        ],
    )
    torch.manual_seed(dist.rank())
    models = load_models(cfg, None, lambda p, r: [0.0] * len(r))
    items, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    exp, _ = collect(
        models, items, PromptStream(len(items), 0), cfg, ScoreNormalizer("none", None, 0)
    )
    mine = {
        "group": exp.group.tolist(),
        "prompt": [
            row[m.bool()].tolist() for row, m in zip(exp.prompt_ids, exp.prompt_mask, strict=True)
        ],
    }
    every = dist.gather_objects(mine)
    if dist.is_main():
        Path(out).write_text(json.dumps(every))
    dist.barrier()
