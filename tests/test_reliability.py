"""Reliability: kill -9 and resume (SFT, RM, PPO), graceful SIGTERM, non-finite guards, pickle
refusal. Kill tests run the real CLI in a subprocess."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import COLORS, copy_rows, preference_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhfkit.config import LogConfig, ModelConfig, TrainConfig
from rlhfkit.models import load_policy, load_tokenizer
from rlhfkit.train.guard import TrainingDiverged
from rlhfkit.train.logger import MetricLogger, read_metrics
from rlhfkit.train.loop import fit

QUIET = ["log.progress=false", "log.tensorboard=false"]


ENV = {
    **os.environ,
    "PYTHONPATH": str(Path(__file__).parent),
}  # so that reward_fn can name a test module


ONE_THREAD = {**ENV, "OMP_NUM_THREADS": "1"}  # two processes at once on the 2 cores


def _cli(args, env=ONE_THREAD):
    return subprocess.Popen(
        [sys.executable, "-m", "rlhfkit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _interrupt_after(args, ckpt_root: Path, min_ckpt: int, sig=signal.SIGKILL, timeout=120) -> int:
    """Start the CLI, send ``sig`` once ``min_ckpt`` checkpoints exist; returns the exit code."""
    proc = _cli(args)
    t0 = time.time()
    while time.time() - t0 < timeout:
        n = len(list(ckpt_root.glob("step-*"))) if ckpt_root.is_dir() else 0
        if n >= min_ckpt or proc.poll() is not None:
            break
        time.sleep(0.01)
    assert proc.poll() is None, (
        "the run finished before it could be interrupted:\n" + proc.stderr.read()[-2000:]
    )
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc.returncode


def _same_weights(a: Path, b: Path, cls=AutoModelForCausalLM):
    wa, wb = cls.from_pretrained(a).state_dict(), cls.from_pretrained(b).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)


def _same_metrics(a: Path, b: Path, skip=("time/", "perf/")):
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for k in x:
            if not k.startswith(skip):
                assert x[k] == pytest.approx(y[k], abs=1e-5), (x["step"], k)


def _kill_and_resume(
    tmp_path, stage_args, out_name, min_ckpt, cls=AutoModelForCausalLM, beside=True
):
    # beside: the uninterrupted run goes alongside the killed and resumed one, two processes on
    # two cores at one thread each (ONE_THREAD), the same on both sides; for SFT and RM that
    # saves ~5 s, for PPO (compute-bound) nothing, so it runs first, alone
    full, killed = tmp_path / "full", tmp_path / "killed"
    if not beside:
        run = subprocess.run([sys.executable, "-m", "rlhfkit", *stage_args(full)],
                             capture_output=True, text=True, env=ONE_THREAD)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "full.log", "w+") as log:  # a file, not a pipe: nobody reads it meanwhile
        if beside:
            run = subprocess.Popen(
                [sys.executable, "-m", "rlhfkit", *stage_args(full)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=ONE_THREAD,
            )
        code = _interrupt_after(stage_args(killed), killed / "checkpoints", min_ckpt)
        assert code == -signal.SIGKILL and not (killed / "final").exists()
        resumed = subprocess.run(
            [sys.executable, "-m", "rlhfkit", *stage_args(killed)],
            capture_output=True,
            text=True,
            env=ONE_THREAD,
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming from" in resumed.stderr
        if beside:
            returncode = run.wait(timeout=300)
            log.seek(0)
            assert returncode == 0, log.read()[-3000:]
    _same_weights(full / "final", killed / "final", cls)
    _same_metrics(full, killed)


@pytest.mark.slow
def test_sft_kill_9_and_resume_equals_uninterrupted(tmp_path, tiny_lm):
    data = write_jsonl(tmp_path / "sft.jsonl", copy_rows(64))

    def args(out):
        return [
            "sft",
            f"model.name_or_path={tiny_lm}",
            f"data.train_file={data}",
            f"train.output_dir={out}",
            "train.max_steps=80",
            "train.batch_size=4",
            "train.save_every=2",
            "train.lr=1e-3",
            "train.epochs=10",
            "train.log_every=1",
            *QUIET,
        ]

    _kill_and_resume(tmp_path, args, "sft", min_ckpt=2)


@pytest.mark.slow
def test_rm_kill_9_and_resume_equals_uninterrupted(tmp_path, tiny_lm):
    data = write_jsonl(tmp_path / "pref.jsonl", preference_rows(64))

    def args(out):
        return [
            "rm",
            f"model.name_or_path={tiny_lm}",
            f"data.train_file={data}",
            f"train.output_dir={out}",
            "train.max_steps=60",
            "train.batch_size=4",
            "train.save_every=2",
            "train.lr=1e-3",
            "train.epochs=10",
            "train.log_every=1",
            *QUIET,
        ]

    _kill_and_resume(tmp_path, args, "rm", min_ckpt=2, cls=AutoModelForSequenceClassification)


def toy_reward(prompts, responses):
    """Module-level so that the CLI can import it: tests.test_reliability:toy_reward."""
    return [float(r.split().count("good")) for r in responses]


@pytest.mark.slow
def test_ppo_kill_9_and_resume_equals_uninterrupted(tmp_path, tiny_lm):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"say {c} :"} for c in COLORS])

    def args(out):
        return [
            "ppo",
            f"model.name_or_path={tiny_lm}",
            "reward_fn=test_reliability:toy_reward",
            f"data.train_file={prompts}",
            f"run.output_dir={out}",
            "run.iterations=14",
            "run.save_every=1",
            "rollout.episodes_per_iteration=16",
            "rollout.chunk_size=16",
            "rollout.max_new_tokens=8",
            "ppo.minibatch_size=8",
            "ppo.micro_batch_size=8",
            "ppo.reward_norm=running",
            "ppo.adaptive_kl=true",
            "actor.lr=1e-3",
            "run.sample_every=0",
            *QUIET,
        ]

    _kill_and_resume(tmp_path, args, "ppo", min_ckpt=3, beside=False)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_lm):
    data = write_jsonl(tmp_path / "sft.jsonl", copy_rows(64))
    out = tmp_path / "o"
    args = [
        "sft",
        f"model.name_or_path={tiny_lm}",
        f"data.train_file={data}",
        f"train.output_dir={out}",
        "train.max_steps=100000",
        "train.batch_size=4",
        "train.save_every=50",
        "train.epochs=1000",
        *QUIET,
    ]
    code = _interrupt_after(args, out / "checkpoints", min_ckpt=1, sig=signal.SIGTERM)
    assert code == 128 + signal.SIGTERM
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    state = torch.load(ckpts[-1] / "trainer_state.pt", weights_only=True)
    assert state["position"]["step"] > 50  # a checkpoint after the periodic one: the signal's own
    assert AutoModelForCausalLM.from_pretrained(ckpts[-1] / "model") is not None


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))


def _fit_with_losses(tmp_path, losses, max_bad=3):
    model = _Toy()
    seen = []

    def loss_fn(m, batch):
        value = losses[len(seen)]
        seen.append(m.w.detach().clone())
        return (m.w.sum() - 1) ** 2 * value, {}

    cfg = TrainConfig(
        output_dir=str(tmp_path),
        batch_size=1,
        lr=0.1,
        max_steps=len(losses),
        epochs=100,
        schedule="constant",
        max_bad_steps=max_bad,
        log_every=1,
    )
    fit(
        model,
        list(range(len(losses))),
        lambda b: {"x": torch.tensor(b)},
        loss_fn,
        cfg,
        MetricLogger(tmp_path, LogConfig(tensorboard=False)),
        evaluate=dict,
        write_model=lambda d, weights: (d / "w.txt").write_text("x"),
        run_config={},
        show_progress=False,
    )
    return model, seen


def test_non_finite_loss_skips_the_step_and_is_counted(tmp_path):
    model, seen = _fit_with_losses(tmp_path, [1.0, float("nan"), float("inf"), 1.0])
    assert torch.equal(seen[1], seen[2]) and torch.equal(
        seen[2], seen[3]
    )  # the two bad steps changed nothing
    assert not torch.equal(seen[0], seen[1])
    rows = [r for r in read_metrics(tmp_path) if "train/skipped_steps" in r]
    assert [r["train/skipped_steps"] for r in rows] == [0, 1, 2, 2]


def test_too_many_non_finite_steps_abort_with_a_clear_message(tmp_path):
    with pytest.raises(TrainingDiverged, match="3 non-finite updates in a row"):
        _fit_with_losses(tmp_path, [1.0, math.nan, math.nan, math.nan, 1.0])


def test_ppo_skips_non_finite_rewards_then_aborts(tmp_path, tiny_lm):
    from test_ppo import ppo_cfg

    from rlhfkit.stages.ppo import run_ppo

    calls = []

    def flaky(prompts, responses):
        calls.append(1)
        return [math.nan if len(calls) == 2 else 1.0] * len(responses)

    # the adaptive controller moves beta after every update, so a skipped update must leave it
    # (with the fixed one, equal betas would hold whatever the guard did)
    adaptive = ["ppo.adaptive_kl=true", "ppo.kl_target=0.5", "ppo.kl_horizon=100"]
    cfg = ppo_cfg(
        tmp_path / "a", tiny_lm, "run.iterations=4", "rollout.episodes_per_iteration=16", *adaptive
    )
    run_ppo(cfg, reward_fn=flaky)
    rows = read_metrics(tmp_path / "a" / "ppo")
    assert [r["nonfinite/skipped"] for r in rows] == [0, 1, 1, 1] and "loss/policy" not in rows[1]
    beta = [r["kl/beta"] for r in rows]
    assert beta[0] != beta[1]  # iteration 1's update moved beta
    assert beta[1] == beta[2]  # iteration 2 was skipped: beta unchanged
    assert beta[2] != beta[3]  # iteration 3 updated again
    cfg = ppo_cfg(tmp_path / "b", tiny_lm, "run.iterations=5", "rollout.episodes_per_iteration=16")
    with pytest.raises(TrainingDiverged, match="reward/value at iteration 3"):
        run_ppo(cfg, reward_fn=lambda p, r: [math.nan] * len(r))


def test_pickle_weights_refused_unless_allowed(tmp_path, tiny_lm):
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    model.config.save_pretrained(tmp_path)
    torch.save(
        model.state_dict(), tmp_path / "pytorch_model.bin"
    )  # an old-style pickled checkpoint
    load_tokenizer(ModelConfig(name_or_path=str(tiny_lm))).save_pretrained(tmp_path)
    assert (tmp_path / "pytorch_model.bin").exists() and not (
        tmp_path / "model.safetensors"
    ).exists()
    tok = load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    with pytest.raises(OSError):
        load_policy(ModelConfig(name_or_path=str(tmp_path)), tok)
    loaded = load_policy(ModelConfig(name_or_path=str(tmp_path), allow_pickle=True), tok)
    torch.testing.assert_close(
        loaded.lm_head.weight[:10], model.lm_head.weight[:10], rtol=0, atol=0
    )
