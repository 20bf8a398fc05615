"""Job of the distributed tests (``dist_jobs.py``): training runs of the supervised loop, one
after another, so that one launch covers RM and DPO.

args: STAGE ARGS... [-- STAGE ARGS...]   (STAGE: rm | dpo; ARGS: key=value)"""

from rlhfkit.config import DPOConfig, RMConfig, load_config
from rlhfkit.stages.dpo import run_dpo
from rlhfkit.stages.rm import run_rm

STAGES = {"rm": (RMConfig, run_rm), "dpo": (DPOConfig, run_dpo)}


def train(*argv: str) -> None:
    runs, current = [], []
    for a in [*argv, "--"]:
        if a == "--":
            runs.append(current) if current else None
            current = []
        else:
            current.append(a)
    for stage, *overrides in runs:
        cls, run = STAGES[stage]
        run(load_config(cls, None, overrides))
