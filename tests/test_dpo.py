"""DPO / cDPO / IPO: the losses against float64 references, the step-0 identity, learning a
preference rule, the reference cache, resume, LoRA and the pipeline's DPO path."""

import math
import shutil

import pytest
import torch
from conftest import COLORS, count_calls, preference_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

import rlhfkit.stages.dpo as dpo_stage
from rlhfkit.algos import dpo_loss
from rlhfkit.config import ConfigError, DPOConfig, load_config
from rlhfkit.data.build import RankItem
from rlhfkit.train.logger import read_metrics

D = torch.float64
QUIET = ["log.progress=false", "log.tensorboard=false", "train.log_every=1"]


def _reference_loss(pc, pr, rc, rr, beta, loss, eps):
    """A direct float64 loop from the papers' formulas."""
    out = []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), strict=True):
        h = (a - c) - (b - d)
        sig = 1 / (1 + math.exp(-beta * h))
        if loss == "sigmoid":
            out.append(-math.log(sig))
        elif loss == "cdpo":
            out.append(-(1 - eps) * math.log(sig) - eps * math.log(1 - sig))
        else:
            out.append((h - 1 / (2 * beta)) ** 2)
    return sum(out) / len(out)


@pytest.mark.parametrize("loss,eps", [("sigmoid", 0.0), ("cdpo", 0.1), ("ipo", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_losses_against_float64_references_and_gradient_signs(loss, eps, beta):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-5 * torch.rand(6, generator=g, dtype=D) for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    value, stats = dpo_loss(pc, pr, rc, rr, beta, loss, eps)
    assert value.item() == pytest.approx(_reference_loss(pc, pr, rc, rr, beta, loss, eps), abs=1e-9)
    value.backward()
    # descending the loss raises the chosen log-probability and lowers the rejected one;
    # IPO does so only while h is below its target 1 / (2 beta), and pulls back above it
    h = ((pc - rc) - (pr - rr)).detach()
    up = h < 1 / (2 * beta) if loss == "ipo" else torch.ones_like(h, dtype=torch.bool)
    assert ((pc.grad < 0) == up).all() and ((pr.grad > 0) == up).all()
    torch.testing.assert_close(
        stats["chosen_reward"], (beta * (pc - rc)).mean(), rtol=0, atol=1e-12
    )
    acc = ((pc - rc) > (pr - rr)).double().mean()
    assert stats["accuracy"].item() == pytest.approx(acc.item())


def test_at_step_zero_h_is_zero_and_the_dpo_loss_is_log_2():
    lp = torch.tensor([-3.0, -7.5, -1.25], dtype=D)
    value, stats = dpo_loss(lp, lp - 1, lp, lp - 1, 0.1)
    assert value.item() == pytest.approx(math.log(2), abs=1e-15)
    assert stats["margin"].item() == 0


def test_ranked_lists_become_all_pairs():
    item = RankItem([[1, 5, 6], [1, 5, 7], [1, 5, 8], [1, 5, 9]], None, [2, 2, 2, 2])
    pairs = dpo_stage.to_pairs([item])
    assert [(p.chosen[-1], p.rejected[-1]) for p in pairs] == [
        (6, 7), (6, 8), (6, 9), (7, 8), (7, 9), (8, 9)
    ]  # fmt: skip


def test_label_smoothing_without_cdpo_is_a_config_error():
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_config(DPOConfig, None, ["dpo.label_smoothing=0.1"])


def dpo_cfg(tmp_path, lm, *extra, rows=None):
    data = write_jsonl(tmp_path / "pref.jsonl", rows or preference_rows(160, seed=3))
    return load_config(
        DPOConfig,
        None,
        [
            f"model.name_or_path={lm}",
            f"data.train_file={data}",
            "data.eval_fraction=0.2",
            f"train.output_dir={tmp_path / 'dpo'}",
            "train.lr=2e-3",
            "train.batch_size=16",
            "train.seed=1",
            "dpo.beta=0.5",
            *QUIET,
            *extra,
        ],
    )


def test_step_zero_loss_is_log_2_on_real_sequences(tmp_path, tiny_lm):
    """Policy = reference at step 0: the masked, aligned sequence logprobs give h = 0 exactly."""
    cfg = dpo_cfg(tmp_path, tiny_lm, "train.max_steps=1")
    dpo_stage.run_dpo(cfg)
    first = read_metrics(cfg.train.output_dir)[0]
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["train/margin"] == pytest.approx(0, abs=1e-6)


def test_sequence_logprobs_sum_the_completion_tokens_only(tmp_path, tiny_lm):
    """Against a plain HF forward summed by hand over the response tokens."""
    from rlhfkit.config import ModelConfig
    from rlhfkit.models import LabelledLogprobs, load_policy, load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_lm)))
    model = load_policy(ModelConfig(name_or_path=str(tiny_lm)), tok, trainable=False)
    a, b = tok("say red : good red")["input_ids"], tok("say blue : bad")["input_ids"]
    pair = dpo_stage.Pair(a, b, 4, 4)
    batch = dpo_stage.collate_pairs([pair], tok.pad_token_id)
    got = dpo_stage.sequence_logprobs(LabelledLogprobs(model), batch)
    for row, (ids, p) in enumerate(((a, 4), (b, 4))):
        logits = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
        want = sum(logits[t - 1, ids[t]].item() for t in range(p, len(ids)))
        assert got[row].item() == pytest.approx(want, abs=1e-4)


@pytest.mark.slow
def test_dpo_learns_the_rule_moves_samples_and_resumes_with_the_cache(
    tmp_path, tiny_lm, monkeypatch
):
    calls = count_calls(monkeypatch, dpo_stage, "compute_reference_logprobs")
    extra = ["train.epochs=8", "train.save_every=16", "dpo.beta=0.1", "train.lr=3e-3"]
    a = dpo_stage.run_dpo(dpo_cfg(tmp_path / "a", tiny_lm, *extra))
    assert calls["compute_reference_logprobs"] == 1
    evals = [m for m in read_metrics(tmp_path / "a" / "dpo") if "eval/accuracy" in m]
    assert evals[-1]["eval/accuracy"] > 0.9  # held-out pairs: chosen implicit reward larger
    assert evals[-1]["eval/chosen_reward"] > evals[-1]["eval/rejected_reward"]
    # the policy's own samples move towards the preferred side, by an independent judge
    judge = _good_minus_bad
    before, after = _sample_score(tiny_lm, judge), _sample_score(a, judge)
    assert after > before + 0.5, (before, after)
    # resume: drop the newest checkpoint and the final model, rerun: same weights, cache reused
    b_cfg = dpo_cfg(tmp_path / "b", tiny_lm, *extra)
    dpo_stage.run_dpo(b_cfg)
    out = tmp_path / "b" / "dpo"
    ckpts = sorted((out / "checkpoints").iterdir())
    assert (ckpts[-1] / dpo_stage.REF_CACHE).exists()
    shutil.rmtree(ckpts[-1])
    shutil.rmtree(out / "final")
    calls["compute_reference_logprobs"] = 0
    b = dpo_stage.run_dpo(b_cfg)
    assert calls["compute_reference_logprobs"] == 0  # the reference was not recomputed
    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def _good_minus_bad(prompts, responses):
    return [float(r.split().count("good") - r.split().count("bad")) for r in responses]


@torch.no_grad()
def _sample_score(path, judge, n=64) -> float:
    from rlhfkit.rollout.sampling import generate

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = [f"say {COLORS[i % len(COLORS)]} :" for i in range(n)]
    ids = tok(prompts, return_tensors="pt", padding=True)
    assert (ids["attention_mask"] == 1).all()  # the prompts have one length: no padding needed
    gen = generate(
        model,
        ids["input_ids"],
        ids["attention_mask"],
        max_new_tokens=6,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    texts = [
        tok.decode(t[m], skip_special_tokens=True)
        for t, m in zip(gen.tokens, gen.mask, strict=True)
    ]
    return sum(judge(prompts, texts)) / n


def test_lora_reference_is_the_base_with_adapters_off(tmp_path, tiny_lm, monkeypatch):
    """With LoRA no second copy is loaded: the reference logprobs equal the base model's."""
    loads = count_calls(monkeypatch, dpo_stage, "load_policy")
    cfg = dpo_cfg(
        tmp_path, tiny_lm, "model.lora.enabled=true", "model.lora.r=4", "train.max_steps=2"
    )
    final = dpo_stage.run_dpo(cfg)
    assert loads["load_policy"] == 0
    cache = torch.load(
        sorted((tmp_path / "dpo" / "checkpoints").iterdir())[-1] / dpo_stage.REF_CACHE,
        weights_only=True,
    )
    # recompute the first pairs' reference with the plain base model
    from rlhfkit.config import ModelConfig
    from rlhfkit.data.build import load_preferences, train_eval
    from rlhfkit.models import LabelledLogprobs, load_policy, load_tokenizer

    tok = load_tokenizer(cfg.model)
    train, _, _ = train_eval(load_preferences, tok, cfg.data, cfg.train.seed)
    pairs = dpo_stage.to_pairs(train)[:8]
    base = load_policy(ModelConfig(name_or_path=str(tiny_lm)), tok, trainable=False)
    dpo_stage.compute_reference_logprobs(LabelledLogprobs(base), pairs, tok.pad_token_id, 8)
    want = torch.tensor([[p.ref_chosen, p.ref_rejected] for p in pairs])
    torch.testing.assert_close(cache[:8].float(), want, rtol=0, atol=1e-5)
    assert AutoModelForCausalLM.from_pretrained(final) is not None  # merged, plain HF
