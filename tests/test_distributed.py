"""Data parallelism on CPU with gloo: 1 process and 2 processes with the same global batch give the
same losses and weights (PPO update on a fixed rollout; RM training), and 2-process PPO runs end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COLORS, preference_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

HERE = Path(__file__).parent


def torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(n),
        *args,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(HERE),
    }  # tests/ for the toy reward
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def prompts_file(tmp_path: Path) -> Path:
    rows = [{"prompt": f"say {c} :"} for c in COLORS] + [
        {"prompt": f"copy : {c} {d} :"} for c in COLORS for d in COLORS
    ]
    return write_jsonl(tmp_path / "prompts.jsonl", rows)


@pytest.mark.slow
def test_ppo_update_one_vs_two_processes(tmp_path, tiny_lm):
    p = prompts_file(tmp_path)
    for n in (1, 2):
        torchrun(n, str(HERE / "dist_ppo_update.py"), str(tiny_lm), str(p), str(tmp_path / f"n{n}"))
    m1 = json.loads((tmp_path / "n1" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "n2" / "metrics.json").read_text())
    for k in (
        "loss/policy",
        "loss/value",
        "loss/entropy",
        "kl/seq_mean",
        "reward/total",
        "grad_norm/actor",
        "grad_norm/critic",
    ):
        assert m1[k] == pytest.approx(m2[k], rel=1e-4, abs=1e-6), k
    w1 = torch.load(tmp_path / "n1" / "w.pt", weights_only=True)
    w2 = torch.load(tmp_path / "n2" / "w.pt", weights_only=True)
    moved = 0
    for part in ("actor", "critic"):
        init = (
            AutoModelForCausalLM.from_pretrained(tiny_lm).state_dict() if part == "actor" else None
        )
        for k in w1[part]:
            torch.testing.assert_close(
                w1[part][k], w2[part][k], rtol=0, atol=2e-5, msg=f"{part}.{k}"
            )
            if init is not None and k in init and init[k].shape == w1[part][k].shape:
                moved += int(not torch.equal(init[k], w1[part][k]))
    assert moved > 0  # the update really changed the actor


@pytest.mark.slow
def test_rm_training_one_vs_two_processes(tmp_path, tiny_lm):
    data = write_jsonl(tmp_path / "pref.jsonl", preference_rows(64))
    common = [
        "-m",
        "rlhfkit",
        "rm",
        f"model.name_or_path={tiny_lm}",
        f"data.train_file={data}",
        "train.lr=1e-3",
        "train.max_steps=6",
        "log.progress=false",
        "log.tensorboard=false",
        "train.log_every=1",
    ]
    torchrun(1, *common, f"train.output_dir={tmp_path / 'n1'}", "train.batch_size=8")
    torchrun(
        2, *common, f"train.output_dir={tmp_path / 'n2'}", "train.batch_size=4"
    )  # same global batch
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "n1" / "final").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "n2" / "final").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-5, msg=k)
    la = [
        json.loads(x)["train/loss"]
        for x in (tmp_path / "n1" / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in x
    ]
    lb = [
        json.loads(x)["train/loss"]
        for x in (tmp_path / "n2" / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in x
    ]
    assert la == pytest.approx(lb, abs=1e-5) and len(la) == 6


@pytest.mark.slow
def test_two_process_ppo_end_to_end(tmp_path, tiny_lm):
    p = prompts_file(tmp_path)
    out = tmp_path / "ppo"
    torchrun(
        2,
        "-m",
        "rlhfkit",
        "ppo",
        f"model.name_or_path={tiny_lm}",
        "reward_fn=test_reliability:toy_reward",
        f"data.train_file={p}",
        f"run.output_dir={out}",
        "run.iterations=3",
        "run.save_every=2",
        "rollout.episodes_per_iteration=16",
        "rollout.max_new_tokens=8",
        "ppo.minibatch_size=8",
        "ppo.micro_batch_size=8",
        "ppo.reward_norm=running",
        "log.progress=false",
        "log.tensorboard=false",
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # logged once, by rank 0
    assert AutoModelForCausalLM.from_pretrained(out / "final") is not None
    state = torch.load(out / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(
        state["rng"][0]["torch"], state["rng"][1]["torch"]
    )
