"""bf16-mixed against fp32 on the same data (CPU): fp32 master weights and AdamW state, losses
within a stated tolerance, updates in the same direction, and the PPO ratio at 1 before the first
update (the rollout and the update see each row in the same layout)."""

import dataclasses
import math

import pytest
import torch
from conftest import COLORS, write_jsonl
from test_ppo import count_good, ppo_cfg
from test_stages_sft_rm import sft_cfg

from rlhfkit.data.build import load_prompts
from rlhfkit.rl.update import advantages, rl_update
from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer, collect
from rlhfkit.stages.ppo import load_models
from rlhfkit.stages.sft import run_sft
from rlhfkit.train.logger import read_metrics

# The tolerance comes from the format, not from one CPU (issue 21): bf16 keeps 8 bits of
# significand, eps = 2^-7 (the spacing at 1), so one rounding errs by at most eps/2 relative. A
# loss is a mean of logprobs, each from activations rounded to bf16 once per layer and op; the
# mean averages those errors rather than adding them, so 2 eps (1.6%, tighter than the 2% this
# test had) bounds it on any kernel: the AVX-512 bf16 and the AVX2 paths measured 0.2-0.4%.
BF16_EPS = torch.finfo(torch.bfloat16).eps
LOSS_RTOL = 2 * BF16_EPS

# below fp32 the kernels differ by CPU: scripts/test.sh runs these again with the ISA capped
pytestmark = pytest.mark.cpu_isa


def test_sft_bf16_mixed_keeps_fp32_master_weights_and_tracks_fp32(tmp_path, tiny_lm):
    runs = {}
    for dtype in ("fp32", "bf16-mixed"):
        cfg = sft_cfg(tmp_path / dtype, tiny_lm, f"model.dtype={dtype}", "train.max_steps=6")
        final = run_sft(cfg)
        runs[dtype] = (
            [r["train/loss"] for r in read_metrics(cfg.train.output_dir) if "train/loss" in r],
            final,
        )
    (l32, f32), (lmx, fmx) = runs["fp32"], runs["bf16-mixed"]
    assert len(l32) == len(lmx) == 6
    for a, b in zip(l32, lmx, strict=True):
        assert b == pytest.approx(a, rel=LOSS_RTOL)
    assert lmx != l32  # autocast really ran in bf16
    from safetensors.torch import load_file

    w32, wmx = load_file(f32 / "model.safetensors"), load_file(fmx / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in wmx.values())  # the master weights
    init = load_file(tiny_lm / "model.safetensors")
    for k in init:  # every tensor moved the same way: cosine of the two updates
        d32, dmx = (w32[k] - init[k]).flatten(), (wmx[k] - init[k]).flatten()
        if d32.norm() > 0:
            assert torch.nn.functional.cosine_similarity(d32, dmx, dim=0) > 0.9, k


def _buffer(cfg):
    torch.manual_seed(0)
    models = load_models(cfg, None, count_good)
    prompts, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    exp, _ = collect(
        models, prompts, PromptStream(len(prompts), 0), cfg, ScoreNormalizer("none", None, 0)
    )
    return models, exp


def test_ppo_bf16_mixed_ratio_is_one_before_the_update_and_tracks_fp32(tmp_path, tiny_lm):
    # prompts of 1-5 words: rows of different widths, so a trimmed minibatch re-pads them
    rows = [{"prompt": " ".join(["say", *([c] * (1 + i % 5)), ":"])} for i, c in enumerate(COLORS)]
    varied = write_jsonl(tmp_path / "varied.jsonl", rows)
    cfg32 = ppo_cfg(
        tmp_path, tiny_lm, f"data.train_file={varied}", "ppo.epochs=1", "ppo.minibatch_size=32"
    )
    cfgmx = dataclasses.replace(cfg32, model=dataclasses.replace(cfg32.model, dtype="bf16-mixed"))
    # 1. bf16-mixed's own rollout: the update's first forwards reproduce the old logprobs
    models, exp = _buffer(cfgmx)
    assert next(models.actor.parameters()).dtype == torch.float32  # master weights
    assert exp.response.shape[1] == cfgmx.rollout.max_new_tokens  # the fixed layout
    advantages(exp, 0.05, cfgmx.ppo)
    stats = rl_update(models.learner, exp, cfgmx, 0.05, update_actor=True)
    # not a rounding bound: the rollout and the update run the same ops on the same fixed layout,
    # and a deterministic kernel gives the same bits (0 on AVX-512 bf16 and on AVX2); 1e-6 only
    # leaves room for a kernel that blocks a row's reduction by the batch size
    assert abs(stats["policy/ratio_mean"] - 1) < 1e-6 and abs(stats["policy/approx_kl"]) < 1e-9
    assert all(
        s["exp_avg"].dtype == torch.float32
        for s in models.learner.optims.opt["actor"].state.values()
    )
    # 2. the same fp32 experience, updated by an fp32 and a bf16-mixed learner from the same weights
    m32, exp32 = _buffer(cfg32)
    advantages(exp32, 0.05, cfg32.ppo)
    mmx, _ = _buffer(cfgmx)
    before = {k: v.clone() for k, v in m32.actor.state_dict().items()}
    out = {}
    for name, (m, cfg) in {"fp32": (m32, cfg32), "mixed": (mmx, cfgmx)}.items():
        torch.manual_seed(3)  # the same minibatch order
        out[name] = rl_update(m.learner, dataclasses.replace(exp32), cfg, 0.05, update_actor=True)
    for k in ("loss/policy", "loss/value"):
        assert math.isfinite(out["mixed"][k])
    assert out["mixed"]["loss/value"] == pytest.approx(out["fp32"]["loss/value"], rel=LOSS_RTOL)
    assert out["mixed"]["loss/value"] != out["fp32"]["loss/value"]  # autocast really ran
    moved = 0
    for k, w0 in before.items():
        d32 = (m32.actor.state_dict()[k] - w0).flatten()
        dmx = (mmx.actor.state_dict()[k] - w0).flatten()
        if d32.norm() > 0:
            moved += 1
            assert torch.nn.functional.cosine_similarity(d32, dmx, dim=0) > 0.9, k
    assert moved > 0
