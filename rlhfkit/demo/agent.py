"""`rlhfkit demo --task tools`: an agent that must call a tool, offline, in a few minutes.

0. a tiny word-level Llama with a chat template that renders tools (``tools_task``)
1. SFT on traces where the model calls ``multiply`` only sometimes (p_tool), guessing otherwise
2. GRPO with the tool environment (``env.tools``): 2 turns, the reward checks the final answer
3. held-out success (pairs never trained on) of the SFT and RL policies, episodes included
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

from rlhfkit.config import (
    DataConfig,
    EnvConfig,
    EvalConfig,
    PPOConfig,
    RolloutConfig,
    SFTConfig,
    load_config,
)
from rlhfkit.demo import tools_task as task
from rlhfkit.stages.evaluate import evaluate_policies
from rlhfkit.stages.ppo import run_ppo
from rlhfkit.stages.sft import run_sft
from rlhfkit.toy import build_tiny_lm

FULL = {"sft_examples": 6000, "sft_epochs": 6, "rl_iterations": 60, "held_out": 200}
# --quick: the pipeline end to end in ~40 s (CI); too little SFT for the RL to reach 0.8
QUICK = {"sft_examples": 500, "sft_epochs": 2, "rl_iterations": 3, "held_out": 24}
P_TOOL = 0.5  # the share of SFT traces that call the tool
TEMPERATURE = 0.6  # sampling temperature of the RL rollouts and of both policies' evaluation
TOOLS = ["rlhfkit.demo.tools_task:multiply"]
ENV = [
    f"env.tools=[{TOOLS[0]}]",
    "rollout.max_turns=2",
    "rollout.max_new_tokens=32",
    "rollout.max_total_tokens=64",
]


def make_data(out: Path, seed: int, sizes: dict) -> dict[str, Path]:
    rng = random.Random(seed)
    train, held = task.split_pairs(seed, sizes["held_out"])
    files = {k: out / "data" / f"{k}.jsonl" for k in ("sft", "prompts", "heldout")}
    task.write_jsonl(files["sft"], task.sft_rows(rng, train, sizes["sft_examples"], P_TOOL))
    rl_pairs = rng.sample(train, 2000)
    task.write_jsonl(files["prompts"], [task.prompt_row(rng, a, b) for a, b in rl_pairs])
    task.write_jsonl(files["heldout"], [task.prompt_row(rng, a, b) for a, b in held])
    return files


def sft(out: Path, files: dict, seed: int, epochs: int) -> Path:
    final = out / "sft" / "final"
    if final.is_dir():
        return final
    init = build_tiny_lm(
        out / "init", task.vocabulary(), hidden=128, layers=4, heads=4, max_positions=128,
        seed=seed, chat_template=task.CHAT_TEMPLATE,
    )  # fmt: skip
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"model.name_or_path={init}",
            f"data.train_file={files['sft']}",
            "data.max_length=96",
            "data.max_prompt_length=64",
            f"train.output_dir={out / 'sft'}",
            f"train.epochs={epochs}",
            "train.batch_size=64",
            "train.lr=3e-3",
            "train.warmup_steps=20",
            "train.log_every=50",
            f"train.seed={seed}",
            "log.tensorboard=false",
        ],
    )
    return run_sft(cfg)


def rl(out: Path, sft_dir: Path, files: dict, seed: int, iterations: int) -> Path:
    cfg = load_config(
        PPOConfig,
        None,
        [
            f"model.name_or_path={sft_dir}",
            f"data.train_file={files['prompts']}",
            "data.max_prompt_length=64",
            "reward_fn=rlhfkit.demo.tools_task:check_answer",
            *ENV,
            "rollout.episodes_per_iteration=64",
            "rollout.chunk_size=64",
            "rollout.samples_per_prompt=8",
            f"rollout.temperature={TEMPERATURE}",
            "ppo.estimator=grpo",
            "ppo.epochs=1",
            "ppo.minibatch_size=32",
            "ppo.micro_batch_size=32",
            "ppo.kl_coef=0.05",
            "ppo.kl_in=loss",
            "ppo.kl_estimator=k3",
            "ppo.reward_norm=none",
            "actor.lr=2e-4",
            f"run.iterations={iterations}",
            f"run.output_dir={out / 'rl'}",
            f"run.seed={seed}",
            "run.sample_every=10",
            "log.tensorboard=false",
        ],
    )
    return run_ppo(cfg)


def evaluate(out: Path, sft_dir: Path, rl_dir: Path, files: dict, seed: int) -> dict:
    from rlhfkit.rollout.episodes import multi_turn

    env = EnvConfig(tools=TOOLS)
    rollout = RolloutConfig(max_new_tokens=32, temperature=TEMPERATURE)
    return evaluate_policies(
        str(sft_dir),
        {"rl": str(rl_dir)},
        None,
        str(files["heldout"]),
        DataConfig(max_prompt_length=64),
        rollout,
        EvalConfig(max_prompts=1000, samples_in_report=8),
        task.check_answer,
        seed + 4242,
        out / "eval",
        sampler=multi_turn(env, 2, 32, 64, 64),
    )


def run_tools_demo(output_dir: str = "runs/demo-tools", seed: int = 0, quick: bool = False) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    sizes = QUICK if quick else FULL
    out = Path(output_dir)
    files = make_data(out, seed, sizes)
    sft_dir = sft(out, files, seed, sizes["sft_epochs"])
    t_sft = time.perf_counter() - t0
    rl_dir = rl(out, sft_dir, files, seed, sizes["rl_iterations"])
    t_rl = time.perf_counter() - t0 - t_sft
    result = evaluate(out, sft_dir, rl_dir, files, seed)
    summary = {
        "seed": seed,
        "sft_success": result["sft"]["judge_score"],
        "rl_success": result["rl"]["judge_score"],
        "sft_seconds": round(t_sft, 1),
        "rl_seconds": round(t_rl, 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    print(
        f"[demo tools] held-out success (pairs never trained on): SFT "
        f"{summary['sft_success']:.3f} -> RL {summary['rl_success']:.3f}; {out / 'eval' / 'eval.html'} "
        f"has sample trajectories; {summary['wall_seconds']:.0f} s",
        file=sys.stderr,
    )
    return {**summary, "result": result}
