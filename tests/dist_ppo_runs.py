"""Job of the distributed tests (``dist_jobs.py``): for each config, a whole PPO run, then the same
run resumed from its step-2 checkpoint in the same launch (rank 0 keeps the first run's export
and log as final-first/ and metrics-first.jsonl, then drops step 3 and the exports, as a crash
after step 2 would).

args: OUT_ROOT CONFIGS_JSON COMMON_JSON
CONFIGS_JSON: {"name": ["key=value", ...]}; every run writes to OUT_ROOT/name"""

import json
import shutil
from pathlib import Path

from rlhfkit.config import PPOConfig, load_config
from rlhfkit.stages.ppo import run_ppo
from rlhfkit.train import dist


def ppo_runs(root: str, configs: str, common: str) -> None:
    for name, extra in json.loads(configs).items():
        out = Path(root) / name
        cfg = load_config(PPOConfig, None, [*json.loads(common), f"run.output_dir={out}", *extra])
        run_ppo(cfg)
        if dist.is_main():
            shutil.copytree(out / "final", out / "final-first")
            shutil.copy(out / "metrics.jsonl", out / "metrics-first.jsonl")
            for d in ("checkpoints/step-000003", "final", "final-critic"):
                shutil.rmtree(out / d)
        dist.barrier()
        run_ppo(cfg)  # resumes from step 2
