"""The CUDA checks of issue 16 as plain functions (no pytest needed: a device machine may not
have it). `tests/test_gpu_ready.py` runs them under pytest's `gpu` marker; `scripts/gpu_check.sh`
runs this file directly.

    python benchmarks/gpu_checks.py               # exits non-zero on the first failed check
    python benchmarks/gpu_checks.py --device cpu  # the same checks on the CPU (a dry run)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ["red", "blue", "green", "gold", "pink", "gray", "copy", ":", "good", "bad", "say"]


def tiny_lm(root: Path) -> Path:
    from rlhfkit.toy import build_tiny_lm

    return build_tiny_lm(root / "lm", WORDS, hidden=32, layers=2, heads=2)


def _ppo_cfg(root: Path, lm: Path, *extra: str):
    import json

    from rlhfkit.config import PPOConfig, load_config

    root.mkdir(parents=True, exist_ok=True)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"say {c} :"}) + "\n" for c in WORDS[:6]))
    return load_config(
        PPOConfig,
        None,
        [
            f"model.name_or_path={lm}",
            f"data.train_file={prompts}",
            f"run.output_dir={root / 'ppo'}",
            "rollout.chunk_size=16",
            "rollout.max_new_tokens=8",
            "ppo.minibatch_size=16",
            "ppo.micro_batch_size=8",
            "actor.lr=1e-3",
            "critic.lr=1e-3",
            "ppo.reward_norm=none",
            "log.tensorboard=false",
            "run.sample_every=0",
            *extra,
        ],
    )


def count_good(prompts, responses):
    return [float(r.split().count("good")) for r in responses]


def check_exact_resume_on_cuda(root: Path, lm: Path, device: str = "cuda") -> None:
    """Kill-and-resume on CUDA gives the uninterrupted run's weights: the CUDA RNG is restored."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.stages.ppo import run_ppo
    from rlhfkit.train.checkpoint import rng_state

    assert device == "cpu" or "cuda" in rng_state(), "the checkpoint RNG has no CUDA generators"
    extra = [f"model.device={device}", "run.iterations=4", "rollout.episodes_per_iteration=16"]
    a = run_ppo(_ppo_cfg(root / "a", lm, *extra), reward_fn=count_good)
    b_cfg = _ppo_cfg(root / "b", lm, *extra, "run.save_every=2")
    run_ppo(b_cfg, reward_fn=count_good)
    out = root / "b" / "ppo"
    shutil.rmtree(out / "checkpoints" / "step-000004")
    shutil.rmtree(out / "final")
    if device != "cpu":
        torch.cuda.manual_seed_all(12345)  # a resume that did not restore the CUDA RNG diverges
    b = run_ppo(b_cfg, reward_fn=count_good)
    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def check_cuda_graph_decoding(lm: Path, device: str = "cuda") -> None:
    """rollout.compile on CUDA (a CUDA graph per step): the eager loop's samples for a fixed seed,
    logprobs within 1e-5 in fp32, twice (the graph is reused)."""
    from rlhfkit.config import ModelConfig
    from rlhfkit.data.tokenize import pad_left
    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.rollout.sampling import generate

    tok = load_tokenizer(ModelConfig(name_or_path=str(lm)))
    model = load_policy(ModelConfig(name_or_path=str(lm), device=device), tok, trainable=False)
    texts = ["copy : red blue :", "say gold", "copy : green :"] * 4
    ids, mask = pad_left([tok(t)["input_ids"] for t in texts], tok.pad_token_id, device)
    for seed in (7, 8):
        eager, graphs = (
            generate(
                model,
                ids,
                mask,
                max_new_tokens=16,
                eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id,
                temperature=0.8,
                generator=torch.Generator(device=device).manual_seed(seed),
                compile_decode=compiled,
            )
            for compiled in (False, True)
        )
        assert torch.equal(eager.tokens, graphs.tokens), "CUDA-graph samples differ"
        m = eager.mask
        torch.testing.assert_close(graphs.logprobs[m], eager.logprobs[m], rtol=0, atol=1e-5)


def check_bf16_mixed_ratio(root: Path, lm: Path, device: str = "cuda") -> float:
    """bf16-mixed on the device: the update's first forwards reproduce the rollout's old logprobs
    (the fixed layout), so the PPO ratio is 1 before the first step. Returns |ratio_mean - 1|.
    On the CPU this is 0 (tests/test_precision.py); a GPU may pick other bf16 kernels for the
    rollout's chunk and the update's micro-batches, so the bound is 1e-3: a fourth of bf16's
    relative rounding (2^-8), averaged over every token."""
    from rlhfkit.data.build import load_prompts
    from rlhfkit.rl.update import advantages, rl_update
    from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer, collect
    from rlhfkit.stages.ppo import load_models

    cfg = _ppo_cfg(
        root,
        lm,
        f"model.device={device}",
        "model.dtype=bf16-mixed",
        "rollout.episodes_per_iteration=16",
        "ppo.epochs=1",
    )
    torch.manual_seed(0)
    models = load_models(cfg, None, count_good)
    assert next(models.actor.parameters()).dtype == torch.float32, "master weights not fp32"
    items, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    exp, _ = collect(
        models, items, PromptStream(len(items), 0), cfg, ScoreNormalizer("none", None, 0)
    )
    advantages(exp, 0.05, cfg.ppo)
    stats = rl_update(models.learner, exp, cfg, 0.05, update_actor=True)
    gap = abs(stats["policy/ratio_mean"] - 1)
    print(f"bf16-mixed on {device}: |ratio - 1| before the update = {gap:.2e}")
    assert gap < 1e-3, f"bf16-mixed ratio before the update is off by {gap:.2e}"
    return gap


def check_collectives(device: str = "cuda") -> None:
    """The process group a torchrun on GPUs joins (``dist.backend()``) reduces the CPU tensors
    that training all-reduces (stop flags, metric means, score statistics) and CUDA ones alike;
    with nccl alone the CPU ones raise. One rank: a GPU machine here has one GPU, and nccl allows
    one rank per GPU."""
    import socket

    import torch.distributed as tdist

    from rlhfkit.train import dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if device == "cuda":
        torch.cuda.set_device(0)
    tdist.init_process_group(
        dist.backend(), init_method=f"tcp://127.0.0.1:{port}", world_size=1, rank=0
    )
    try:
        for where in ("cpu", device):
            x = torch.arange(4.0, device=where)
            assert torch.equal(dist.all_reduce_sum(x), x), where
        assert dist.mean_over_ranks({"a": 1.5, "b": -2.0}) == {"a": 1.5, "b": -2.0}
        assert dist.gather_objects({"rank": 0}) == [{"rank": 0}]
        stop = dist.all_reduce_sum(torch.tensor(1.0))  # the stop flag, as the recipes send it
        assert float(stop) == 1.0
    finally:
        tdist.destroy_process_group()


def main() -> int:
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_checks: no CUDA device (--device cpu runs a dry run)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp())
    lm = tiny_lm(root)
    for name, fn in (
        ("exact resume", lambda: check_exact_resume_on_cuda(root / "resume", lm, device)),
        ("compiled decoding equals eager", lambda: check_cuda_graph_decoding(lm, device)),
        (
            "bf16-mixed ratio is 1 before the update",
            lambda: check_bf16_mixed_ratio(root / "mixed", lm, device),
        ),
        ("CPU and CUDA tensors reduce in one process group", lambda: check_collectives(device)),
    ):
        fn()
        print(f"PASS {name}")
    print("4 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
