"""The cost of scoring over HTTP: PPO iterations with the RM in process (token ids, the fast path)
against the same RM behind `rlhfkit serve-rm` on 127.0.0.1 (text in, scores out), A B A B.

Prints the median seconds per iteration of the scoring phase (`time/score`: the reference, critic
and reward forwards) and of the whole iteration, for each path, and the difference. The server
runs in its own process with 1 thread and the trainer with 1 (2 cores: one each).

    .venv/bin/python benchmarks/reward_http.py --size tiny [--iters 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

BATCH, PROMPT, RESPONSE = 32, 32, 48


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(rm: Path, port: int) -> subprocess.Popen:
    import requests

    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLHFKIT_TCMALLOC": "0"}
    cmd = [
        sys.executable,
        "-m",
        "rlhfkit",
        "serve-rm",
        str(rm),
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("serve-rm did not start")


def run(dirs, reward: list[str], iters: int) -> list[dict]:
    import torch

    from rlhfkit.config import PPOConfig, load_config
    from rlhfkit.stages.ppo import run_ppo
    from rlhfkit.train.logger import read_metrics

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    words = [" ".join(f"w{t}" for t in p) for p in common.prompts(64, PROMPT - 1, 8000)]
    (tmp / "p.jsonl").write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    cfg = load_config(
        PPOConfig,
        None,
        [
            f"model.name_or_path={dirs['policy']}",
            *reward,
            *common.rollout_keys(tmp / "p.jsonl", BATCH, PROMPT, RESPONSE),
            "ppo.epochs=1",
            f"ppo.minibatch_size={BATCH}",
            f"ppo.micro_batch_size={BATCH}",
            "ppo.reward_norm=none",
            f"run.iterations={iters}",
            f"run.output_dir={tmp / 'run'}",
            "log.tensorboard=false",
        ],
    )
    run_ppo(cfg)
    return read_metrics(tmp / "run")[1:]  # the first iteration warms up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", choices=list(common.SIZES), default="tiny")
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    dirs = common.build(args.size)
    port = free_port()
    server = serve(dirs["reward"], port)
    paths = {
        "in-process": [f"reward_model={dirs['reward']}"],
        "http": [f"reward_url=http://127.0.0.1:{port}/score"],
    }
    rows: dict[str, list[dict]] = {k: [] for k in paths}
    try:
        for _ in range(args.rounds):
            for name, reward in paths.items():  # A B A B
                rows[name] += run(dirs, reward, args.iters)
    finally:
        server.terminate()
    print(f"machine: {common.machine()}; size={args.size}; {BATCH} episodes x {RESPONSE} tokens")
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("time/score", "time/iteration")}
        for k, v in rows.items()
    }
    for name, m in med.items():
        print(
            f"{name:10s} scoring {m['time/score']:.3f} s/iteration, whole iteration {m['time/iteration']:.3f} s"
        )
    d = med["http"]["time/score"] - med["in-process"]["time/score"]
    print(
        f"HTTP overhead: {d:+.3f} s per iteration ({d / med['in-process']['time/iteration']:+.1%} of an iteration)"
    )


if __name__ == "__main__":
    main()
