"""Stage 4: compare the SFT policy with the trained ones (PPO, DPO) on held-out prompts.

For each policy: responses sampled with the rollout settings, their RM score, the gold score of
an independent judge (when one is given), and the KL to the reference (the SFT policy),
sum_t log pi(a_t|s_t) - log pi_SFT(a_t|s_t) over the sampled responses (k1: unbiased for the
sequence KL).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rlhfkit.algos import masked_sum
from rlhfkit.config import DataConfig, EvalConfig, ModelConfig, RolloutConfig
from rlhfkit.data.build import load_prompts
from rlhfkit.data.tokenize import pad_left
from rlhfkit.models import PerTokenScalar, device_of, load_policy, load_scalar_model, load_tokenizer
from rlhfkit.rollout.forward import join, policy_logprobs, reward_scores
from rlhfkit.rollout.rewards import RewardFn, call_reward_fn, decode_texts
from rlhfkit.rollout.sampling import generate


@torch.no_grad()
def sample_and_score(
    policy,
    ref,
    rm,
    tok,
    prompt_ids: list[list[int]],
    rollout: RolloutConfig,
    gold_fn: RewardFn | None,
    seed: int,
    chunk: int = 32,
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    rm_scores, gold, kls, lengths, texts = [], [], [], [], []
    for i in range(0, len(prompt_ids), chunk):
        ids, mask = pad_left(prompt_ids[i : i + chunk], tok.pad_token_id, device_of(policy))
        gen = generate(
            policy,
            ids,
            mask,
            max_new_tokens=rollout.max_new_tokens,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            temperature=rollout.temperature,
            top_k=rollout.top_k,
            top_p=rollout.top_p,
            generator=g,
        )
        seq = join(ids, mask, gen.tokens, gen.mask)
        lp, _ = policy_logprobs(policy, seq, rollout.temperature)
        lp_ref, _ = policy_logprobs(ref, seq, rollout.temperature)
        kls.append(masked_sum(lp - lp_ref, gen.mask, dim=1))
        lengths.append(gen.lengths.float())
        if rm is not None:
            rm_scores.append(reward_scores(rm, seq))
        p_text, r_text = decode_texts(tok, ids, mask, gen.tokens, gen.mask)
        texts += list(zip(p_text, r_text, strict=True))
        if gold_fn is not None:
            gold.append(call_reward_fn(gold_fn, p_text, r_text))
    out: dict[str, Any] = {
        "kl_to_ref": float(torch.cat(kls).mean()),
        "length": float(torch.cat(lengths).mean()),
    }
    per_sample: dict[str, list[float]] = {}
    if rm_scores:
        r = torch.cat(rm_scores)
        out.update(rm_score=float(r.mean()), rm_score_std=float(r.std()))
        per_sample["rm"] = r.tolist()
    if gold:
        gs = torch.cat(gold)
        out.update(gold_score=float(gs.mean()), gold_score_std=float(gs.std()))
        per_sample["gold"] = gs.tolist()
    out["samples"] = [
        {"prompt": p, "response": r, **{k: v[j] for k, v in per_sample.items()}}
        for j, (p, r) in enumerate(texts)
    ]
    return out


def evaluate_policies(
    sft_dir: str,
    policies: dict[str, str],
    rm_dir: str | None,
    prompts_file: str,
    data: DataConfig,
    rollout: RolloutConfig,
    cfg: EvalConfig,
    gold_fn: RewardFn | None,
    seed: int,
    out_dir: Path,
) -> dict[str, Any]:
    """Writes out_dir/eval.json: {'sft': {...}, 'ppo': {...}, 'dpo': {...}} (the policies given,
    name -> directory) with scores, KL and samples, all on the same prompts and sampling seed."""
    mc = ModelConfig(name_or_path=sft_dir)
    tok = load_tokenizer(mc)
    prompts, _ = load_prompts(prompts_file, tok, data)
    prompt_ids = [p.prompt_ids for p in prompts[: cfg.max_prompts]]
    ref = load_policy(mc, tok, trainable=False)
    rm = (
        PerTokenScalar(load_scalar_model(mc, tok, rm_dir, fresh_head=False, trainable=False))
        if rm_dir
        else None
    )
    result = {}
    for name, path in {"sft": sft_dir, **policies}.items():
        policy = ref if name == "sft" else load_policy(mc, tok, path=path, trainable=False)
        result[name] = sample_and_score(policy, ref, rm, tok, prompt_ids, rollout, gold_fn, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out_dir / "eval.json")
    return result
