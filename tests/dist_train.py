"""Worker for the 1-vs-2-process tests of the supervised loop (run under torchrun): several
training runs, one after another in one process group, so that one launch covers RM and DPO.

usage: dist_train.py STAGE ARGS... [-- STAGE ARGS...]   (STAGE: rm | dpo; ARGS: key=value)"""

import sys

import torch

from rlhfkit.config import DPOConfig, RMConfig, load_config
from rlhfkit.stages.dpo import run_dpo
from rlhfkit.stages.rm import run_rm
from rlhfkit.train import dist

STAGES = {"rm": (RMConfig, run_rm), "dpo": (DPOConfig, run_dpo)}


def main(argv: list[str]) -> None:
    dist.init_from_env()
    torch.set_num_threads(1)
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
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
