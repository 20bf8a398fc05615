"""SFT tokens/s with and without padding-free batches (`data.packing`), A B A B in child processes.

The data have responses of 8-96 tokens after a 32-token prompt (real instruction data vary in
length; with equal lengths packing has nothing to remove). tokens/s counts real tokens only:
the tokens of the examples the timed optimizer steps consumed, over the time from the end of the
warm-up steps. Both runs see the same examples in the same order (batch of 8 examples a step;
packed, those 8 share rows of up to data.max_length = 136 tokens).

    .venv/bin/python benchmarks/packing.py --size tiny|small [--steps 30] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

BATCH, PROMPT, MIN_R, MAX_R, WARMUP = 8, 32, 8, 96, 3


def write_data(tmp: Path, n: int, vocab: int) -> Path:
    import random

    rng = random.Random(0)
    rows = []
    for p in common.prompts(n, PROMPT, vocab - 4, seed=1):
        r = [rng.randrange(vocab - 4) for _ in range(rng.randint(MIN_R, MAX_R))]
        rows.append(
            {
                "prompt": " ".join(f"w{t}" for t in p),
                "completion": " " + " ".join(f"w{t}" for t in r),
            }
        )
    path = tmp / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(size: str, steps: int, packing: bool) -> dict:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from rlhfkit.config import SFTConfig, load_config
    from rlhfkit.data.build import load_sft
    from rlhfkit.models import load_tokenizer
    from rlhfkit.stages.sft import run_sft
    from rlhfkit.train.loop import epoch_order

    torch.manual_seed(0)
    dirs = common.build(size)
    tmp = Path(tempfile.mkdtemp())
    data = write_data(tmp, BATCH * (steps + WARMUP), common.SIZES[size][3])
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"model.name_or_path={dirs['policy']}",
            f"data.train_file={data}",
            f"data.max_length={PROMPT + MAX_R + 8}",
            f"data.packing={str(packing).lower()}",
            "data.eval_fraction=0",
            f"train.output_dir={tmp / 'out'}",
            f"train.batch_size={BATCH}",
            f"train.max_steps={steps + WARMUP}",
            "train.lr=1e-5",
            "train.log_every=100000",
            "log.tensorboard=false",
            "log.progress=false",
        ],
    )
    items, _ = load_sft(cfg.data.train_file, load_tokenizer(cfg.model), cfg.data)
    order = epoch_order(len(items), cfg.train.seed, 0)
    timed = order[BATCH * WARMUP : BATCH * (steps + WARMUP)]  # the examples of the timed steps
    tokens = sum(len(items[i].input_ids) for i in timed)
    stamps: list[float] = []
    register_optimizer_step_post_hook(lambda *a, **k: stamps.append(time.perf_counter()))
    run_sft(cfg)
    seconds = stamps[-1] - stamps[WARMUP - 1]
    return {"packing": packing, "tok_per_s": tokens / seconds, "s_per_step": seconds / steps}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", choices=list(common.SIZES), default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", choices=["padded", "packed"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("BENCH " + json.dumps(run(args.size, args.steps, args.child == "packed")), flush=True)
        return
    print(
        f"machine: {common.machine()}; {common.threads()} threads; size={args.size} {common.SIZES[args.size]}"
    )
    res: dict[str, list[float]] = {"padded": [], "packed": []}
    for _ in range(args.rounds):
        for mode in res:  # A B A B: machine drift hits both
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--size",
                args.size,
                "--steps",
                str(args.steps),
            ]
            out = subprocess.run(
                cmd, capture_output=True, text=True, env=common.child_env(True, "system")
            )
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")]
            if out.returncode or not line:
                raise SystemExit(out.stderr[-3000:])
            res[mode].append(json.loads(line[-1][6:])["tok_per_s"])
    for mode, v in res.items():
        print(
            f"{mode:7s} real tokens/s = {statistics.median(v):.0f} (runs: {', '.join(f'{x:.0f}' for x in v)})"
        )
    print(
        f"packing speed-up: {statistics.median(res['packed']) / statistics.median(res['padded']):.2f}x"
    )


if __name__ == "__main__":
    main()
