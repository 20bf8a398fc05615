"""The one worker of the distributed tests (run under torchrun): joins the process group once and
runs a plan of jobs in it, so that a test module pays one launch (~5 s of start-up on 2 cores) per
process count instead of one per check (issue 21).

usage: dist_jobs.py PLAN.json    PLAN: [["job", [args...]], ...]; jobs: JOBS below"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from dist_collect_groups import collect_groups  # noqa: E402
from dist_ppo_runs import ppo_runs  # noqa: E402
from dist_ppo_update import ppo_update  # noqa: E402
from dist_train import train  # noqa: E402

from rlhfkit.train import dist  # noqa: E402

JOBS = {"ppo_update": ppo_update, "train": train, "groups": collect_groups, "ppo_runs": ppo_runs}


def main(plan: str) -> None:
    dist.init_from_env()
    torch.set_num_threads(1)
    for job, args in json.loads(Path(plan).read_text()):
        JOBS[job](*args)
    dist.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
