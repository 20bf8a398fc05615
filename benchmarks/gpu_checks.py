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
    ):
        fn()
        print(f"PASS {name}")
    print("2 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
