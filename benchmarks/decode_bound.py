"""What bounds generation (issue 35): a decode step of ``rollout.engine: hf`` on SmolLM2 against
this machine's two ceilings, the fp32 matmul peak and the memory bandwidth.

A decode step multiplies one new token per row through every weight (2 x params x rows FLOPs,
the LM head included) and reads every weight and the rows' KV cache once (bytes). Its time can
be no less than FLOPs / peak nor bytes / bandwidth; the step's measured time against the larger
of the two is how close generation runs to what the machine allows. The linears' own rate at the
decode's row counts (one token per row: M = rows) is printed too: at small M a matmul cannot reach
the square-matrix peak.

    cd benchmarks && ../.venv/bin/python -m rlhfkit.launch ../.venv/bin/python decode_bound.py
"""

from __future__ import annotations

import argparse
import time

import common
import grpo_step


def bandwidth_gbs(mb: int = 512, repeats: int = 6) -> float:
    """Memory bandwidth: the best of ``repeats`` copies of a ``mb`` MB fp32 tensor (read + write)."""
    import torch

    a = torch.ones(mb * 2**20 // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9


def linear_rate(layer, rows: int, seconds: float = 1.0) -> float:
    """GFLOP/s of ``layer`` (a model's linear) on ``rows`` rows, as the rollout runs it (no grad,
    weights packed)."""
    import torch

    from rlhfkit.models.cpu_gemm import packed_weights

    x = torch.randn(rows, layer.in_features)
    with torch.no_grad(), packed_weights():
        layer(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            layer(x)
            n += 1
        wall = time.perf_counter() - t0
    return 2 * rows * layer.in_features * layer.out_features * n / wall / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", nargs="+", type=int, default=[32, 8])
    ap.add_argument("--new", type=int, default=128, help="tokens decoded per row (no EOS)")
    a = ap.parse_args()
    import torch

    from rlhfkit.config import ModelConfig
    from rlhfkit.data.tokenize import pad_left
    from rlhfkit.models import load_policy, load_tokenizer
    from rlhfkit.rollout.sampling import generate

    torch.manual_seed(0)
    peak = common.matmul_peak_gflops(torch.float32)
    bw = bandwidth_gbs()
    print(f"{common.machine()}; {common.threads()} threads; fp32 matmul peak {peak:.0f} GFLOP/s; "
          f"memory bandwidth (copy) {bw:.1f} GB/s\n")  # fmt: skip
    cfg = ModelConfig(name_or_path=str(grpo_step.model_dir("smollm2")))
    tok = load_tokenizer(cfg)
    model = load_policy(cfg, tok, trainable=False).eval()
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weight_bytes = sum(m.weight.numel() * 4 for m in linears)
    flops_per_token = 2 * sum(m.weight.numel() for m in linears)  # the LM head included
    layer = model.model.layers[0]
    print("| rows | linear | GFLOP/s | of peak |\n|---|---|---|---|")
    for rows in sorted({*a.rows, 4096}):
        for name, lin in (("gate_proj", layer.mlp.gate_proj), ("down_proj", layer.mlp.down_proj),
                          ("k_proj", layer.self_attn.k_proj), ("lm_head", model.lm_head)):  # fmt: skip
            g = linear_rate(lin, rows)
            print(
                f"| {rows} | {name} {lin.in_features}x{lin.out_features} | {g:.1f} | {g / peak:.2f} |"
            )
    print("\n| rows | prompt | decode s/step | FLOP/step | bytes/step (weights + KV) | "
          "compute floor s | memory floor s | step / larger floor | GFLOP/s | GB/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    chats = grpo_step.prompt_rows("smollm2", max(a.rows))
    for rows in a.rows:
        texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                 for m in chats[:rows]]  # fmt: skip
        ids, mask = pad_left([tok(t, add_special_tokens=False)["input_ids"] for t in texts],
                             tok.pad_token_id, torch.device("cpu"))  # fmt: skip
        kw = dict(eos_id=None, pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            generate(model, ids, mask, max_new_tokens=2, **kw)  # warm-up
            t0 = time.perf_counter()
            generate(model, ids, mask, max_new_tokens=1, **kw)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            generate(model, ids, mask, max_new_tokens=a.new, **kw)
            step = (time.perf_counter() - t0 - prefill) / (a.new - 1)
        width = ids.shape[1] + a.new / 2  # the mean cache length over the decode
        kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * width * rows * 4
        attn = 4 * c.num_hidden_layers * c.num_attention_heads * head_dim * width * rows
        fl = flops_per_token * rows + attn
        by = weight_bytes + kv
        floor_c, floor_m = fl / peak / 1e9, by / bw / 1e9
        print(f"| {rows} | {ids.shape[1]} | {step:.3f} | {fl / 1e9:.1f} G | {by / 1e6:.0f} MB | "
              f"{floor_c:.3f} | {floor_m:.3f} | {step / max(floor_c, floor_m):.2f} | "
              f"{fl / step / 1e9:.1f} | {by / step / 1e9:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
