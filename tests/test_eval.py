"""Evaluation that tells the truth: the statistics, `rlhfkit eval` on two checkpoints, PPO's
periodic held-out evaluation with keep_best, and the config keys a stage would ignore."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import COLORS, write_jsonl
from test_ppo import count_good, ppo_cfg
from transformers import AutoModelForCausalLM

from rlhfkit.algos.eval_stats import distinct_n, distinct_share, mean_and_se, win_rate
from rlhfkit.config import ConfigError, EvalRunConfig, PPOConfig, RMConfig, load_config
from rlhfkit.stages.evaluate import Samples, run_eval, summarize
from rlhfkit.stages.ppo import run_ppo
from rlhfkit.train.logger import read_metrics


def test_mean_and_standard_error_against_the_closed_form():
    x = [1.0, 2.0, 4.0, 7.0]
    mean, se = mean_and_se(x)
    var = sum((v - 3.5) ** 2 for v in x) / 3
    assert mean == 3.5 and se == pytest.approx(math.sqrt(var / 4), abs=1e-15)
    assert mean_and_se([2.0]) == (2.0, 0.0)


def test_win_rate_counts_ties_half():
    rate, se = win_rate([1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.5, 0.1])
    assert rate == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert se == pytest.approx(mean_and_se([1, 0, 0.5, 1])[1])
    assert win_rate([0.3] * 5, [0.3] * 5) == (0.5, 0.0)


def test_diversity_measures_see_a_collapsed_policy():
    collapsed = ["i would recommend it ."] * 8
    assert distinct_share(collapsed) == 1 / 8
    assert distinct_share([f"r{i}" for i in range(8)]) == 1.0
    toks = [[1, 2, 3, 1, 2], [1, 2, 4]]  # bigrams: 12 23 31 12 | 12 24 -> 4 distinct of 6
    assert distinct_n(toks, 2) == pytest.approx(4 / 6)
    s = Samples(responses=collapsed, tokens=[[5, 6, 7]] * 8, kl=[1.0] * 8, length=[3.0] * 8)
    m = summarize(s)
    assert m["distinct"] == 1 / 8 and m["distinct2"] == pytest.approx(2 / 16)


def _prompts(tmp_path, name="heldout.jsonl"):
    return write_jsonl(
        tmp_path / name, [{"prompt": f"copy : {c} {d} :"} for c in COLORS for d in COLORS[:3]]
    )


@pytest.mark.slow  # runs the CLI end to end (~7 s)
def test_rlhfkit_eval_on_two_checkpoints(tmp_path, tiny_lm):
    """A policy against itself: KL exactly 0, win rate exactly 0.5 (the same seed: the same
    samples); against a perturbed copy: KL > 0. Writes eval.json and eval.html."""
    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    with torch.no_grad():
        model.lm_head.weight.add_(0.3 * torch.randn_like(model.lm_head.weight))
    model.save_pretrained(other)
    (other / "tokenizer.json").write_bytes((tiny_lm / "tokenizer.json").read_bytes())
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_lm / f).exists():
            (other / f).write_bytes((tiny_lm / f).read_bytes())
    prompts = _prompts(tmp_path)
    common = [
        f"reference={tiny_lm}",
        f"eval.prompts_file={prompts}",
        "eval.judge=test_ppo:count_good",
    ]
    common += ["max_new_tokens=6", "reward_fn=test_ppo:count_good"]
    same = run_eval(
        load_config(
            EvalRunConfig, None, [*common, f"policy={tiny_lm}", f"output_dir={tmp_path / 'a'}"]
        )
    )
    assert same["policy"]["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)
    assert same["policy"]["win_rate"] == 0.5 and same["policy"]["win_rate_se"] == 0.0
    assert same["policy"]["judge_score"] == same["reference"]["judge_score"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhfkit",
            "eval",
            *common,
            f"policy={other}",
            f"output_dir={tmp_path / 'b'}",
        ],
        capture_output=True,
        text=True,
        env={
            **__import__("os").environ,
            "PYTHONPATH": str(__import__("pathlib").Path(__file__).parent),
        },
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((tmp_path / "b" / "eval.json").read_text())
    p = result["policy"]
    assert p["kl_to_ref"] > 0.05 and len(p["samples"]) == 18
    for k in ("judge_score", "rm_score", "kl_to_ref", "length", "eos_rate", "win_rate"):
        assert f"{k}_se" in p and p[f"{k}_se"] >= 0
    assert 0 < p["distinct"] <= 1 and 0 < p["distinct2"] <= 1
    page = (tmp_path / "b" / "eval.html").read_text()
    assert "win rate" in page and html_escape(p["samples"][0]["response"]) in page


def html_escape(s):
    import html

    return html.escape(s)


def test_ppo_held_out_evaluation_and_keep_best(tmp_path, tiny_lm):
    held = _prompts(tmp_path)
    extra = [f"data.eval_file={held}", "eval.every=2", "eval.keep_best=judge", "run.iterations=4"]
    extra += ["eval.judge=test_ppo:count_good", "eval.max_prompts=12", "run.save_every=2"]
    cfg = ppo_cfg(tmp_path, tiny_lm, *extra)
    run_ppo(cfg, reward_fn=count_good)
    rows = read_metrics(tmp_path / "ppo")
    evals = [r for r in rows if "eval/judge_score" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert {"eval/kl", "eval/distinct", "eval/win_rate", "eval/rm_score"} <= set(r)
    best = json.loads((tmp_path / "ppo" / "best" / "best.json").read_text())
    top = max(evals, key=lambda r: r["eval/judge_score"])
    assert best["by"] == "judge" and best["value"] == top["eval/judge_score"]
    assert best["iteration"] == min(
        r["step"] for r in evals if r["eval/judge_score"] == top["eval/judge_score"]
    )
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ppo" / "best") is not None
    state = torch.load(
        tmp_path / "ppo" / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=False
    )
    assert state["best_eval"] == {"value": best["value"], "iteration": best["iteration"]}


@pytest.mark.parametrize(
    "cls,args,match",
    [
        (PPOConfig, ["data.max_length=100"], "data.max_length: `rlhfkit ppo` does not use"),
        (PPOConfig, ["data.train_on_prompt=true"], "train_on_prompt"),
        (PPOConfig, ["data.eval_file=x.jsonl"], "eval.every > 0"),
        (PPOConfig, ["eval.every=5"], "data.eval_file"),
        (PPOConfig, ["eval.keep_best=rm"], "eval.every > 0"),
        (RMConfig, ["data.train_on_prompt=true"], "`rlhfkit rm` does not use"),
    ],
)
def test_keys_a_stage_would_ignore_are_config_errors(cls, args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(cls, None, args)


def test_a_model_path_that_does_not_exist_is_a_config_error(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhfkit",
            "sft",
            "model.name_or_path=/nonexistent",
            f"data.train_file={tmp_path}/x.jsonl",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert (
        "config error: model.name_or_path: /nonexistent: the directory does not exist" in r.stderr
    )
    assert "Traceback" not in r.stderr


def test_keep_best_by_judge_without_a_judge_is_a_config_error(tmp_path, tiny_lm):
    held = _prompts(tmp_path)
    cfg = ppo_cfg(
        tmp_path, tiny_lm, f"data.eval_file={held}", "eval.every=2", "eval.keep_best=judge"
    )
    with pytest.raises(ConfigError, match="eval.keep_best: 'judge' needs eval.judge"):
        run_ppo(cfg, reward_fn=count_good)


def test_a_reward_model_path_that_is_a_file_names_the_key(tmp_path, tiny_lm):
    held = _prompts(tmp_path)
    cfg = ppo_cfg(tmp_path, tiny_lm, "reward_fn=", f"reward_model={held}")
    with pytest.raises(ConfigError, match=r"^reward_model: .*heldout.jsonl: is a file"):
        run_ppo(cfg)
    assert not (tmp_path / "ppo" / "checkpoints").exists()


def test_an_unimportable_judge_names_eval_judge(tmp_path, tiny_lm):
    held = _prompts(tmp_path)
    cfg = ppo_cfg(
        tmp_path, tiny_lm, f"data.eval_file={held}", "eval.every=2", "eval.judge=nomod:fn"
    )
    with pytest.raises(ConfigError, match=r"^eval\.judge: cannot import 'nomod:fn'"):
        run_ppo(cfg, reward_fn=count_good)


@pytest.mark.parametrize("high, ok", [("0.05", False), ("0.2", True), ("0.28", True)])
def test_clip_eps_high_below_clip_eps_is_a_config_error(high, ok):
    args = ["ppo.clip_eps=0.2", f"ppo.clip_eps_high={high}"]
    if ok:
        assert load_config(PPOConfig, None, args).ppo.clip_eps_high == float(high)
    else:
        with pytest.raises(ConfigError, match=r"ppo.clip_eps_high: 0.05 is below ppo.clip_eps"):
            load_config(PPOConfig, None, args)


@pytest.mark.parametrize(
    "n, c, k", [(1, 0, 1), (1, 1, 1), (4, 1, 1), (4, 1, 4), (10, 3, 2), (16, 5, 8), (100, 2, 50)]
)
def test_pass_at_k_is_the_unbiased_closed_form(n, c, k):
    """Chen et al. 2021, eq. 1: 1 - C(n - c, k) / C(n, k), here with exact integers."""
    from fractions import Fraction

    from rlhfkit.algos.eval_stats import pass_at_k

    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-12)
    if k == 1:
        assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-15)  # pass@1 is the mean
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, n + 1, k)


def test_pass_at_k_table_against_the_closed_form():
    from fractions import Fraction

    from rlhfkit.algos.eval_stats import pass_at_k_table

    scores = [1, 0, 0, 0, 1, 0] + [0] * 6 + [1, 1, 1, 0.5, 1, 1]  # 3 prompts x n = 6
    table = pass_at_k_table([float(x) for x in scores], 6, threshold=1.0)
    assert set(table) == {
        f"{m}{s}" for m in ("pass@1", "pass@2", "pass@4", "pass@6", "mean@6") for s in ("", "_se")
    }
    correct = [2, 0, 5]
    for k in (1, 2, 4, 6):
        want = [1 - Fraction(math.comb(6 - c, k), math.comb(6, k)) for c in correct]
        assert table[f"pass@{k}"] == pytest.approx(float(sum(want) / 3), abs=1e-12)
    assert table["mean@6"] == pytest.approx((2 / 6 + 0 + 5.5 / 6) / 3, abs=1e-12)
    with pytest.raises(ValueError, match="n = 4 per prompt"):
        pass_at_k_table([1.0] * 6, 4, 1.0)


def coin(prompts, responses):
    """A 0/1 'checker' for the pass@k test: 1 when the response has an even token count."""
    return [float(len(r.split()) % 2 == 0) for r in responses]


def test_rlhfkit_eval_reports_pass_at_k_from_n_samples_per_prompt(tmp_path, tiny_lm):
    prompts = _prompts(tmp_path)
    cfg = load_config(
        EvalRunConfig,
        None,
        [f"reference={tiny_lm}", f"policy={tiny_lm}", f"eval.prompts_file={prompts}"]
        + ["max_new_tokens=6", "reward_fn=test_eval:coin", "eval.samples_per_prompt=4"]
        + ["eval.max_prompts=5", f"output_dir={tmp_path / 'e'}"],
    )
    p = run_eval(cfg)["policy"]
    scores = [s["rm"] for s in p["samples"]]
    assert len(scores) == 20  # 5 prompts x 4 samples, each prompt's 4 together
    prompts_of = [s["prompt"] for s in p["samples"]]
    assert all(len(set(prompts_of[i : i + 4])) == 1 for i in range(0, 20, 4))
    correct = [int(sum(scores[i : i + 4])) for i in range(0, 20, 4)]
    assert p["pass@1"] == pytest.approx(sum(correct) / 20, abs=1e-12)
    assert p["pass@4"] == pytest.approx(sum(c > 0 for c in correct) / 5, abs=1e-12)
    want2 = sum(1 - math.comb(4 - c, 2) / math.comb(4, 2) for c in correct) / 5
    assert p["pass@2"] == pytest.approx(want2, abs=1e-12) and "pass@2_se" in p
    assert p["mean@4"] == pytest.approx(sum(scores) / 20, abs=1e-12)


@pytest.mark.slow  # two evaluations (~6 s); the fast tier is at its 2-minute budget
def test_the_references_own_samples_cost_no_logprob_forwards_and_have_kl_zero(
    tmp_path, tiny_lm, monkeypatch
):
    """The reference sampled against itself needs no forwards for its KL (it is 0): only the
    policy, a separate copy of the same weights, pays them, and its KL computed the long way is
    0 to fp32 rounding, so skipping them changes no figure."""
    from rlhfkit.stages import evaluate

    calls = []
    real = evaluate.policy_logprobs

    def counted(model, *a, **k):
        calls.append(model)
        return real(model, *a, **k)

    monkeypatch.setattr(evaluate, "policy_logprobs", counted)
    cfg = load_config(
        EvalRunConfig,
        None,
        [f"reference={tiny_lm}", f"policy={tiny_lm}", f"eval.prompts_file={_prompts(tmp_path)}"]
        + ["max_new_tokens=6", f"output_dir={tmp_path / 'e'}"],
    )
    result = run_eval(cfg)
    assert len(calls) == 2 and calls[0] is not calls[1]  # one chunk: the policy and the ref
    ref, pol = result["reference"], result["policy"]
    assert [s["kl"] for s in ref["samples"]] == [0.0] * len(pol["samples"])
    assert max(abs(s["kl"]) for s in pol["samples"]) < 1e-5
    assert [s["response"] for s in pol["samples"]] == [s["response"] for s in ref["samples"]]
