"""Where one GRPO update's time goes (issue 35): ``grpo_step.py``'s work (SmolLM2 by default: 8
prompts x 4 samples, up to 256 tokens at EOS, micro-batches of 16), one rollout, then the update
under ``torch.profiler``: the ops by self time, and every matmul shape's rate against the
machine's fp32 peak.

    cd benchmarks && ../.venv/bin/python -m rlhfkit.launch ../.venv/bin/python update_profile.py
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import common
import grpo_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", choices=[*common.SIZES, "smollm2"], default="smollm2")
    ap.add_argument("--micro", type=int, default=16)
    a = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from rlhfkit.config import PPOConfig, load_config
    from rlhfkit.data.build import load_prompts
    from rlhfkit.rl.update import advantages, rl_update
    from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer, collect
    from rlhfkit.stages.ppo import load_models

    torch.manual_seed(0)
    w, lm = grpo_step.work(a.size), grpo_step.model_dir(a.size)
    tmp = Path(tempfile.mkdtemp())
    rows = "".join(json.dumps({"prompt": r}) + "\n" for r in grpo_step.prompt_rows(a.size))
    (tmp / "p.jsonl").write_text(rows)
    n = w["groups"] * w["samples"]
    cfg = load_config(PPOConfig, None, [
        f"model.name_or_path={lm}", "reward_fn=common:length_reward",
        f"data.train_file={tmp / 'p.jsonl'}", "data.max_prompt_length=256",
        f"rollout.episodes_per_iteration={n}", f"rollout.chunk_size={n}",
        f"rollout.samples_per_prompt={w['samples']}", f"rollout.max_new_tokens={w['max_new']}",
        f"rollout.ignore_eos={str(not w['eos']).lower()}", "ppo.estimator=grpo",
        "ppo.kl_in=loss", "ppo.kl_estimator=k3", "ppo.kl_coef=0.04", "ppo.epochs=1",
        f"ppo.minibatch_size={n}", f"ppo.micro_batch_size={a.micro}", "ppo.reward_norm=none",
        f"run.output_dir={tmp / 'run'}",
    ])  # fmt: skip
    print(common.machine())
    models = load_models(cfg, None, None)
    items, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    exp, timer = collect(
        models, items, PromptStream(len(items), 0), cfg, ScoreNormalizer("none", None, 0)
    )
    advantages(exp, 0.04, cfg.ppo)
    actor = models.actor
    lengths = exp.response_mask.sum(1).tolist()
    fl = grpo_step.flops(common.layer_params(actor), actor.config.hidden_size,
                         actor.config.vocab_size, exp.prompt_mask.sum(1).tolist(), lengths)  # fmt: skip
    peak = common.matmul_peak_gflops(torch.float32)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        rl_update(models.learner, exp, cfg, 0.04, update_actor=True)
        wall = time.perf_counter() - t0
    rate = fl["update"] / 1e9 / wall
    print(f"rollout: generate {timer.generate:.1f} s, reference {timer.score:.1f} s; "
          f"response lengths min {min(lengths)} median {sorted(lengths)[len(lengths) // 2]}")  # fmt: skip
    print(
        f"update {wall:.1f} s (profiled): {fl['update'] / 1e9:.0f} useful GFLOP, "
        f"{rate:.1f} GFLOP/s = {rate / peak:.3f} of the fp32 peak {peak:.0f} GFLOP/s\n"
    )
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    print("| op | self s | share |\n|---|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        s = e.self_cpu_time_total / 1e6
        print(f"| {e.key[:60]} | {s:.2f} | {s / total:.3f} |")
    print("\n| matmul (x, w) | calls | s | GFLOP/s | of peak |\n|---|---|---|---|---|")
    mm_s = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key not in ("aten::mm", "mkldnn::_linear_pointwise") or e.self_cpu_time_total == 0:
            continue
        x, wt = [s for s in e.input_shapes if s][:2]
        m, k = x
        nn = wt[1] if e.key == "aten::mm" else wt[0]  # mm: [K, N]; linear: weight [N, K]
        s = e.self_cpu_time_total / 1e6
        mm_s += s
        g = 2 * m * k * nn * e.count / s / 1e9
        print(
            f"| {re.sub(' ', '', str([x, wt]))} {e.key} | {e.count} | {s:.2f} | {g:.1f} | {g / peak:.2f} |"
        )
    print(
        f"\nmatmuls {mm_s:.1f} s of {total:.1f} s ({mm_s / total:.2f}); the rest (attention, "
        "elementwise, optimizer) sets how far the update stays below the peak"
    )


if __name__ == "__main__":
    main()
