"""Shared benchmark fixtures: random-init Llama models and a synthetic tokenizer (no hub), built
once into benchmarks/.cache/. Both our runner and the TRL runner load the same directories."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import torch

CACHE = Path(__file__).parent / ".cache"
SIZES = {  # name: (hidden, layers, heads, vocab)
    "tiny": (256, 4, 4, 8192),  # ~6M parameters with tied embeddings
    "small": (512, 8, 8, 8192),  # ~42M
}


def build(size: str) -> dict[str, Path]:
    """policy (causal LM) and reward-model directories for ``size``; built on first use."""
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.toy import build_tiny_lm

    hidden, layers, heads, vocab = SIZES[size]
    root = CACHE / size
    lm = root / "policy"
    if not (lm / "config.json").exists():
        words = [f"w{i}" for i in range(vocab - 4)]  # 4 special tokens
        build_tiny_lm(
            lm, words, hidden=hidden, layers=layers, heads=heads, max_positions=256, seed=0
        )
    rm = root / "reward"
    if not (rm / "config.json").exists():
        torch.manual_seed(1)
        model = AutoModelForSequenceClassification.from_pretrained(lm, num_labels=1)
        model.save_pretrained(rm)
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(lm).save_pretrained(rm)
    return {"policy": lm, "reward": rm}


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, length), generator=g).tolist()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak_gflops(
    dtype: torch.dtype, n: int = 1024, seconds: float = 1.5, kernel: str = "best"
) -> float:
    """The machine's achievable matmul rate: the best n x n x n product over ``seconds`` of
    repeats, after a 0.5 s warm-up (a fresh process's first products run at half speed here).
    ``kernel``: ``torch`` (F.linear: MKL's sgemm in the CPU wheel), ``onednn`` (oneDNN's matmul,
    the same wheel: ``rlhfkit.models.cpu_gemm``; fp32 only) or ``best`` of the two. On the AMD
    EPYCs here oneDNN runs fp32 at ~2.2x MKL's rate, so the peak is oneDNN's (session 8; earlier
    sessions' fractions of peak were of MKL's rate). bf16 is measured at n=512 with torch's kernel:
    on this machine's torch build it runs at ~1-20 GFLOP/s, and a big product would take minutes."""
    from rlhfkit.models import cpu_gemm

    if dtype == torch.bfloat16:
        n, seconds, kernel = 512, 0.5, "torch"
    if kernel == "best":
        kinds = ["torch"] + (["onednn"] if cpu_gemm.available() else [])
        return max(matmul_peak_gflops(dtype, n, seconds, k) for k in kinds)
    f = torch.nn.functional.linear if kernel == "torch" else cpu_gemm.linear
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    end = time.perf_counter() + 0.5
    while time.perf_counter() < end:
        f(a, b)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        f(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def layer_params(model) -> int:
    """Parameters that a token's forward multiplies through (embedding lookups excluded)."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not emb)


def threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))


def machine() -> str:
    """CPU model, cores and the matmul-relevant instruction sets, from /proc/cpuinfo (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{os.cpu_count()} cores"
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "?"
    )
    flags = set(next((ln for ln in info.splitlines() if ln.startswith("flags")), "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags] or ["no avx2"]
    return f"{model}, {os.cpu_count()} cores, {'/'.join(isa)}"


MALLOC = ("system", "tcmalloc", "shipped")
MALLOC_HELP = (
    "allocator of the two runners: system = glibc for both; tcmalloc = tcmalloc preloaded for "
    "both; shipped = rlhfkit with tcmalloc (what its `rlhfkit` command does when "
    "libtcmalloc-minimal4 is installed) and TRL with glibc (a plain `python train.py`)"
)


def child_env(ours: bool, malloc: str) -> dict[str, str]:
    """The environment of a runner process under ``malloc`` (one of MALLOC)."""
    from rlhfkit.launch import tcmalloc_env

    base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if malloc == "tcmalloc" or (malloc == "shipped" and ours):
        env = tcmalloc_env(base)
        if env is None:
            raise SystemExit("libtcmalloc-minimal4 is not installed (apt-get install it)")
        return env
    return {**base, "RLHFKIT_TCMALLOC": "0"}


def decode_step_floor(model, batch: int, reps: int = 5) -> float:
    """Seconds of matmul that one decode step cannot avoid: every Linear of ``model`` (LM head
    included) applied to ``batch`` rows, in order, so weights stream from memory as in a real
    step. Best of ``reps``. At batch 16 these products are memory/kernel-bound, far below peak."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {n: torch.randn(batch, n) for n in {m.in_features for m in linears}}
    best = float("inf")
    with torch.no_grad():
        for _ in range(reps + 1):
            t = time.perf_counter()
            for m in linears:
                torch.nn.functional.linear(xs[m.in_features], m.weight)
            best = min(best, time.perf_counter() - t)
    return best


def length_reward(prompts, completions, **kwargs) -> list[float]:
    """The GRPO benchmarks' reward on both sides: the completion's length in characters / 100
    (cheap and the same for rlhfkit's ``reward_fn`` and TRL's ``reward_funcs``)."""
    return [len(c) / 100 for c in completions]


WITH_MKL = (
    "also run rlhfkit with model.cpu_gemm=torch (MKL's sgemm, as before session 8) as another "
    "runner in each round: what the oneDNN linear layers change"
)
WITH_ONEDNN = (
    "also run rlhfkit with model.cpu_gemm=onednn (every product on oneDNN, as before session 15) "
    "as another runner in each round: what auto's measured choice of kernel changes"
)
# our runners and the model.cpu_gemm each runs with
GEMM = {"rlhfkit": "auto", "rlhfkit-onednn": "onednn", "rlhfkit-mkl": "torch"}
IMPL = {gemm: impl for impl, gemm in GEMM.items()}


def impls(compare_trl: bool, with_mkl: bool, with_onednn: bool = False) -> list[str]:
    """The runners of one A B (A' B) round."""
    ours = ["rlhfkit"] + (["rlhfkit-onednn"] if with_onednn else [])
    return ours + (["rlhfkit-mkl"] if with_mkl else []) + (["trl"] if compare_trl else [])


def ours_flags(impl: str) -> list[str]:
    """The child flags of one of our runners (``GEMM``); none for TRL's."""
    if impl == "trl":
        return []
    return ["--json", "--cpu-gemm", GEMM[impl]]


def peaks_line() -> tuple[float, str]:
    """This machine's fp32 matmul peak (the better kernel's: the fractions of peak are of it)
    and a line naming the CPU and both kernels' peaks."""
    from rlhfkit.models import cpu_gemm

    kinds = ["torch"] + (["onednn"] if cpu_gemm.available() else [])
    p = {k: matmul_peak_gflops(torch.float32, kernel=k) for k in kinds}
    each = ", ".join(f"{k} {v:.0f}" for k, v in p.items())
    return max(p.values()), (f"machine: {machine()}; {threads()} threads; fp32 matmul peak "
                             f"{max(p.values()):.0f} GFLOP/s ({each})")  # fmt: skip


def runner_rows(impl: str, script: str, args: list[str], python: str) -> list[dict]:
    """Run one benchmark runner process (ours with ``--json``, or TRL's script in its own
    virtualenv) under the glibc allocator, and return its ``BENCH {json}`` lines."""
    import json
    import subprocess

    here = Path(__file__).parent
    cmd = [python, str(here / script), *args]
    # this checkout's rlhfkit, also when the virtualenv's editable install points at another
    env = {**child_env(impl != "trl", "system"), "PYTHONPATH": f"{here}{os.pathsep}{here.parent}"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{impl} runner failed:\n{out.stderr[-4000:]}")
    return [json.loads(line[6:]) for line in out.stdout.splitlines() if line.startswith("BENCH ")]


def synthetic_grpo_buffer(b: int, p: int, t: int, high: int, min_len: int, seed: int = 0):
    """A GRPO experience buffer of random tokens in [4, high): b episodes in groups of 4, prompts
    of p tokens, response lengths uniform in [min_len, t], constant old/ref logprobs, random
    scores (the update benchmarks' work)."""
    from rlhfkit.rollout.experience import Experience

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    return Experience(
        prompt_ids=torch.randint(4, high, (b, p), generator=g),
        prompt_mask=torch.ones(b, p, dtype=torch.long),
        response=torch.where(mask, torch.randint(4, high, (b, t), generator=g), 0),
        response_mask=mask,
        logprobs=torch.where(mask, -9.0, 0.0),
        ref_logprobs=torch.where(mask, -9.0, 0.0),
        values=None,
        scores=torch.randn(b, generator=g),
        raw_scores=torch.zeros(b),
        stopped=torch.ones(b, dtype=torch.bool),
        group=torch.arange(b // 4).repeat_interleave(4),
    )


def timed(fn, timing: dict[str, float], bucket: str, only_no_grad: bool = False):
    """``fn`` wrapped to add its wall time to ``timing[bucket]`` (the runners' phase clocks);
    ``only_no_grad``: time only its calls without autograd (a forward the update also calls)."""

    def wrapper(*a, **k):
        if only_no_grad and torch.is_grad_enabled():
            return fn(*a, **k)
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            timing[bucket] += time.perf_counter() - t

    return wrapper


def rollout_keys(train_file, batch: int, prompt: int, response: int) -> list[str]:
    """The config overrides the PPO-family runners share: their prompts, and a rollout of
    ``batch`` episodes of exactly ``response`` tokens (EOS ignored: both sides do the same work)."""
    return [
        f"data.train_file={train_file}",
        f"data.max_prompt_length={prompt}",
        f"rollout.episodes_per_iteration={batch}",
        f"rollout.chunk_size={batch}",
        f"rollout.max_new_tokens={response}",
        "rollout.ignore_eos=true",
    ]
