"""The offline demo end to end (the small CI version), the pipeline's stage-by-stage resume,
and the demo's rater model."""

import contextlib
import json
import math
import random

import pytest
import torch

from rlhfkit.cli import main
from rlhfkit.config import PipelineConfig, load_config
from rlhfkit.demo import task
from rlhfkit.train.logger import read_metrics


def test_noisy_ranking_is_bradley_terry_for_pairs():
    rng = random.Random(0)
    n, temp, diff = 40000, 0.25, 0.2
    wins = sum(task.noisy_ranking([diff, 0.0], temp, rng)[0] == 0 for _ in range(n))
    expected = 1 / (1 + math.exp(-diff / temp))
    assert abs(wins / n - expected) < 0.01  # 4.3 standard errors
    order = task.noisy_ranking([0.9, -0.9, 0.0, 0.5], 1e-3, rng)  # almost no noise: sorted by gold
    assert order == [0, 3, 2, 1]


def test_gold_judge_orders_sentiment():
    judge = task.gold_judge()
    good, bad = judge(
        [], ["the movie was great . i loved the acting .", "the movie was awful . i hated it ."]
    )
    assert good > 0.5 and bad < -0.5


@contextlib.contextmanager
def demo_threads():
    """The demo's learning thresholds (and the async test's 0.05 of issue 33) were set on runs at
    2 threads; a pytest-xdist worker has 1 (conftest), which rounds differently and follows another
    trajectory (the async gap was 0.067 there: docs/decisions.md). The demo's runs keep 2."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    from rlhfkit.demo.run import run_demo

    out = tmp_path_factory.mktemp("demo") / "run"
    with demo_threads():
        return out, run_demo(str(out), seed=0, quick=True)


@pytest.mark.slow
def test_quick_demo_raises_the_held_out_judge_score_without_collapse(quick_demo):
    out, summary = quick_demo

    # held out: no held-out prompt, nor its subject, is in any training prompt (SFT, RM, PPO)
    def prompts(name):
        return {json.loads(x)["prompt"] for x in (out / "data" / name).read_text().splitlines()}

    held = prompts("heldout_prompts.jsonl")
    trained = prompts("prompts.jsonl") | prompts("sft.jsonl")
    trained |= {
        json.loads(x)["prompt"] for x in (out / "data" / "rankings.jsonl").read_text().splitlines()
    }
    assert len(held) >= 50 and len(prompts("prompts.jsonl")) >= 200 and not held & trained
    assert not any(s in p.split() for s in task.HELD_OUT_SUBJECTS for p in trained)
    # the policy improves on them by the independent judge, and does not collapse
    assert summary["ppo_judge_score"] > summary["sft_judge_score"] + 0.3, summary  # measured 0.70
    assert summary["ppo_win_rate"] > 0.75  # measured 0.92
    assert summary["ppo_rm_score"] > summary["sft_rm_score"]
    assert summary["ppo_distinct"] >= 0.8, summary  # a collapsed policy repeats one answer
    assert summary["rm_heldout_accuracy"] > 0.6  # labels are noisy: the Bayes rate is about 0.8
    assert summary["ppo_kl_to_ref"] > 0
    page = (out / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 7 and "http" not in page  # self-contained
    for png in ["frontier.png", "score_gold.png", "kl_seq_mean.png", "loss_value.png"]:
        assert (out / "report" / png).stat().st_size > 1000
    rows = [r for r in read_metrics(out / "ppo") if "eval/judge_score" in r]
    assert [r["step"] for r in rows] == [5, 10, 12]  # eval.every = 5, and the last iteration
    assert json.loads((out / "report" / "summary.json").read_text()) == summary


@pytest.mark.slow
def test_pipeline_does_not_rerun_finished_stages(quick_demo, capfd):
    from rlhfkit.stages.pipeline import run_pipeline

    out, _ = quick_demo
    finals = {
        s: (out / s / "final" / "model.safetensors").stat().st_mtime_ns
        for s in ("sft", "rm", "ppo")
    }
    cfg = load_config(PipelineConfig, None, [f"output_dir={out}"])
    result = run_pipeline(cfg)
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("[pipeline]")]
    assert len(lines) == 4 and all(ln.endswith("already finished") for ln in lines), lines
    assert {
        s: (out / s / "final" / "model.safetensors").stat().st_mtime_ns for s in finals
    } == finals
    assert result == json.loads((out / "eval" / "eval.json").read_text())


@pytest.mark.slow
def test_cli_sft_rm_ppo_chain_with_example_configs(quick_demo, tmp_path, capfd):
    """`rlhfkit sft`, `rm` and `ppo` with configs/tiny/*.yaml, each stage feeding the next."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    demo, _ = quick_demo
    data, o = demo / "data", tmp_path
    steps = [
        [
            "sft",
            "configs/tiny/sft.yaml",
            f"model.name_or_path={demo / 'base' / 'final'}",
            f"data.train_file={data / 'sft.jsonl'}",
            f"train.output_dir={o / 'sft'}",
            "train.max_steps=10",
        ],
        [
            "rm",
            "configs/tiny/rm.yaml",
            f"model.name_or_path={o / 'sft' / 'final'}",
            f"data.train_file={data / 'rankings.jsonl'}",
            f"train.output_dir={o / 'rm'}",
            "train.max_steps=10",
        ],
        [
            "ppo",
            "configs/tiny/ppo.yaml",
            f"model.name_or_path={o / 'sft' / 'final'}",
            f"reward_model={o / 'rm' / 'final'}",
            f"data.train_file={data / 'prompts.jsonl'}",
            f"run.output_dir={o / 'ppo'}",
            "run.iterations=2",
        ],
        [  # the same recipe with the critic-free GRPO preset: no critic loaded or written
            "ppo",
            "configs/tiny/grpo.yaml",
            f"model.name_or_path={o / 'sft' / 'final'}",
            f"reward_model={o / 'rm' / 'final'}",
            f"data.train_file={data / 'prompts.jsonl'}",
            f"run.output_dir={o / 'grpo'}",
            "run.iterations=2",
        ],
        [
            "dpo",
            "configs/tiny/dpo.yaml",
            f"model.name_or_path={o / 'sft' / 'final'}",
            f"data.train_file={data / 'rankings.jsonl'}",
            f"train.output_dir={o / 'dpo'}",
            "train.max_steps=4",
        ],
    ]
    # in this process: the subprocess CLI and its exit codes are tested in test_stages_sft_rm and
    # test_distributed; here each start-up would cost more than the stage (issue 21)
    for cmd, config, *overrides in steps:
        code = main([cmd, "--config", config, *overrides, "log.progress=false"])
        assert code == 0, (cmd, capfd.readouterr().err[-3000:])
    assert (
        AutoModelForSequenceClassification.from_pretrained(o / "rm" / "final").config.num_labels
        == 1
    )
    assert AutoModelForCausalLM.from_pretrained(o / "ppo" / "final") is not None
    rows = read_metrics(o / "ppo")
    assert [r["step"] for r in rows] == [1, 2] and all(
        "score/mean" in r and "kl/seq_mean" in r for r in rows
    )
    assert (o / "ppo" / "final-critic").is_dir() and not (o / "grpo" / "final-critic").exists()
    assert [r["step"] for r in read_metrics(o / "grpo")] == [1, 2]
    assert AutoModelForCausalLM.from_pretrained(o / "dpo" / "final") is not None
    assert any("train/accuracy" in r for r in read_metrics(o / "dpo"))


@pytest.mark.slow
def test_pipeline_runs_the_dpo_path_beside_ppo_and_compares_them(quick_demo, tmp_path):
    """methods: [ppo, dpo] from the finished SFT/RM/PPO stages: DPO runs on the RM's data and
    the evaluation is redone with all three policies on the same prompts."""
    import shutil

    from transformers import AutoModelForCausalLM

    from rlhfkit.stages.pipeline import run_pipeline

    demo, _ = quick_demo
    out = tmp_path / "run"
    shutil.copytree(demo, out, ignore=shutil.ignore_patterns("checkpoints", "tb", "report"))
    cfg = load_config(
        PipelineConfig,
        None,
        [
            f"output_dir={out}",
            "methods=ppo,dpo",
            f"rm.data.train_file={out / 'data' / 'rankings.jsonl'}",
            "rm.data.max_length=64",
            "dpo.train.max_steps=6",
            "dpo.train.batch_size=16",
            "dpo.train.lr=1e-4",
            "dpo.log.progress=false",
            f"eval.prompts_file={out / 'data' / 'heldout_prompts.jsonl'}",
            "eval.max_prompts=16",
        ],
    )
    result = run_pipeline(cfg)
    assert set(result) == {"sft", "ppo", "dpo"}
    assert AutoModelForCausalLM.from_pretrained(out / "dpo" / "final") is not None
    for name in ("ppo", "dpo"):
        assert result[name]["kl_to_ref"] > 0 and len(result[name]["samples"]) == 16


@pytest.mark.slow  # the quick demo's PPO stage once more: ~30 s
def test_asynchronous_rollouts_learn_the_demo_task_as_the_synchronous_loop_does(
    quick_demo, tmp_path
):
    """Issue 33: rollout.max_staleness 1 with TIS, the same seed and episode budget as the
    demo's synchronous PPO stage: its held-out judge score within 0.05 of the synchronous run's
    (both measured by the periodic held-out evaluation, at the last iteration)."""
    import dataclasses

    from rlhfkit.demo.run import QUICK, pipeline_config
    from rlhfkit.stages.pipeline import stage_configs
    from rlhfkit.stages.ppo import run_ppo

    out, summary = quick_demo
    extra = ("ppo.rollout.max_staleness=1", "ppo.ppo.rollout_correction=tis")
    _, _, ppo = stage_configs(pipeline_config(out, out / "base" / "final", 0, QUICK, extra=extra))
    ppo = dataclasses.replace(ppo, run=dataclasses.replace(ppo.run, output_dir=str(tmp_path)))
    with demo_threads():
        run_ppo(ppo, monitor=task.gold_judge())
    sync, stale = read_metrics(out / "ppo"), read_metrics(tmp_path)
    assert [r["rollout/staleness"] for r in stale] == [0] + [1] * (len(stale) - 1)
    assert len(stale) == len(sync)  # the same episode budget
    judge = [rows[-1]["eval/judge_score"] for rows in (sync, stale)]
    start = summary["sft_judge_score"]
    assert judge[1] > start + 0.3, (judge, start)  # it learned
    assert abs(judge[1] - judge[0]) <= 0.05, judge
