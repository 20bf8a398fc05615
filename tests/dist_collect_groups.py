"""Worker for the group test (run under torchrun): every rank collects its share of one iteration
with samples_per_prompt = 4; rank 0 saves every rank's group ids and prompts to OUT.

usage: dist_collect_groups.py LM PROMPTS OUT"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from rlhfkit.config import PPOConfig, load_config  # noqa: E402
from rlhfkit.data.build import load_prompts  # noqa: E402
from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer, collect  # noqa: E402
from rlhfkit.stages.ppo import load_models  # noqa: E402
from rlhfkit.train import dist  # noqa: E402


def main(lm: str, prompts: str, out: str) -> None:
    dist.init_from_env()
    torch.set_num_threads(1)
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
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
