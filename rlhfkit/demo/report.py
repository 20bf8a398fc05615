"""The demo report: PNG plots against PPO iteration, one self-contained HTML page, a summary."""

from __future__ import annotations

import base64
import html
import json
import sys
from pathlib import Path
from typing import Any

from rlhfkit.train.logger import read_metrics

PLOTS = [  # (metric, title) against PPO iteration
    ("score/mean", "RM score (reward)"),
    ("score/gold", "gold score (VADER)"),
    ("kl/seq_mean", "KL to reference (per sequence)"),
    ("policy/entropy", "policy entropy (nats/token)"),
    ("response/length", "response length (tokens)"),
    ("loss/value", "value loss"),
]


def _plot(rows: list[dict], key: str, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["step"] for r in rows if key in r]
    ys = [r[key] for r in rows if key in r]
    fig, ax = plt.subplots(figsize=(4.2, 2.8), dpi=100)
    ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.4)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("PPO iteration", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summarize(out: Path, result: dict[str, Any]) -> dict[str, Any]:
    rm_rows = [r for r in read_metrics(out / "rm") if "eval/accuracy" in r]
    s = {"rm_heldout_accuracy": rm_rows[-1]["eval/accuracy"] if rm_rows else None}
    for name in ("sft", "ppo"):
        for k in ("gold_score", "rm_score", "kl_to_ref", "length"):
            s[f"{name}_{k}"] = result[name].get(k)
    if s["sft_gold_score"] is not None:
        s["gold_gain"] = s["ppo_gold_score"] - s["sft_gold_score"]
    return s


def _table(rows: list[list[str]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(
    out: Path, result: dict[str, Any], cfg, seconds: float, base_seconds: float
) -> dict[str, Any]:
    rdir = out / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    rows = read_metrics(out / "ppo")
    pngs = [_plot(rows, k, t, rdir / f"{k.replace('/', '_')}.png") for k, t in PLOTS]
    s = summarize(out, result)
    s["wall_seconds"] = round(seconds, 1)
    s["base_model_seconds"] = round(base_seconds, 1)
    (rdir / "summary.json").write_text(json.dumps(s, indent=2))

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    metrics = _table(
        [
            [
                "gold score (VADER, held-out prompts)",
                f(s["sft_gold_score"]),
                f(s["ppo_gold_score"]),
            ],
            ["RM score", f(s["sft_rm_score"]), f(s["ppo_rm_score"])],
            ["KL to reference (nats / response)", f(s["sft_kl_to_ref"]), f(s["ppo_kl_to_ref"])],
            ["response length (tokens)", f(s["sft_length"]), f(s["ppo_length"])],
        ],
        ["", "SFT policy", "PPO policy"],
    )
    n = cfg.eval.samples_in_report
    samples = []
    for a, b in list(zip(result["sft"]["samples"], result["ppo"]["samples"], strict=True))[:n]:
        samples.append(
            [
                html.escape(a["prompt"]),
                f"{html.escape(a['response'])}<br><small>gold {f(a.get('gold'))}</small>",
                f"{html.escape(b['response'])}<br><small>gold {f(b.get('gold'))}</small>",
            ]
        )
    imgs = "".join(
        f'<img alt="{html.escape(t)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p, (_, t) in zip(pngs, PLOTS, strict=True)
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>rlhfkit demo report</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}img{{margin:4px}}</style></head><body>
<h1>rlhfkit demo: SFT &rarr; RM &rarr; PPO</h1>
<p>Task: <i>write a review of the X</i>. The gold judge (VADER sentiment, independent of the learned reward model)
scores each review in [-1, 1]; the reward model only saw noisy pairwise preferences between SFT samples.</p>
<h2>SFT vs PPO on held-out prompts</h2>{metrics}
<p>Reward model held-out pairwise accuracy (against the noisy labels): <b>{f(s["rm_heldout_accuracy"])}</b>.
Wall time {s["wall_seconds"]} s (base model pre-training {s["base_model_seconds"]} s).</p>
<h2>Training curves</h2>{imgs}
<h2>Samples before and after</h2>{_table(samples, ["prompt", "SFT policy", "PPO policy"])}
</body></html>"""
    (rdir / "report.html").write_text(page, encoding="utf-8")
    print(json.dumps(s, indent=2))
    print(f"report: {rdir / 'report.html'}", file=sys.stderr)
    return s
