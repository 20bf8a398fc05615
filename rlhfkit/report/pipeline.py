"""The run report (`rlhfkit pipeline` and `rlhfkit demo`): one self-contained HTML page, its PNG
plots, and summary.json.

It shows the held-out comparison of every policy (report.html.metrics_table), the training curves of
the RL run, and the over-optimisation picture of Gao et al. 2022 ("Scaling Laws for Reward Model
Overoptimization", fig. 1): the judge score and the RM score against sqrt(KL to the reference)
over the run. A proxy that keeps rising while the judge falls shows as a divergence of the two.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
from pathlib import Path
from typing import Any

from rlhfkit.report.html import EVAL_METRICS, STYLE, metrics_table, samples_table
from rlhfkit.train.logger import read_metrics

CURVES = [  # (metric, title) against RL iteration
    ("score/mean", "RM score (the reward)"),
    ("score/gold", "judge score (training prompts)"),
    ("kl/seq_mean", "KL to reference (per sequence)"),
    ("policy/entropy", "policy entropy (nats/token)"),
    ("response/length", "response length (tokens)"),
    ("loss/value", "value loss"),
]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curve(rows: list[dict], key: str, title: str, path: Path) -> Path | None:
    xs = [r["step"] for r in rows if key in r]
    if not xs:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.2, 2.8), dpi=100)
    ax.plot(xs, [r[key] for r in rows if key in r], marker="o", markersize=2.5, linewidth=1.4)
    ax.set_xlabel("RL iteration", fontsize=8)
    return _finish(plt, fig, ax, title, path)


def _finish(plt, fig, ax, title: str, path: Path) -> Path:
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def frontier_points(rows: list[dict]) -> tuple[str, list[tuple[float, float | None, float | None]]]:
    """(source, [(sqrt KL, judge, rm)]) over the run: the held-out evaluations when the run made
    them (eval/*), else the training buffers (kl/seq_mean, score/gold, score/mean)."""
    held = [r for r in rows if "eval/kl" in r]
    if held:
        return "held-out prompts", [
            (math.sqrt(max(r["eval/kl"], 0.0)), r.get("eval/judge_score"), r.get("eval/rm_score"))
            for r in held
        ]
    return "training prompts", [
        (math.sqrt(max(r["kl/seq_mean"], 0.0)), r.get("score/gold"), r.get("score/mean"))
        for r in rows
        if "kl/seq_mean" in r
    ]


def frontier_plot(rows: list[dict], result: dict[str, Any], path: Path) -> Path | None:
    """Judge (left axis) and RM score (right axis) against sqrt(KL): the RL run as a curve, each
    evaluated policy (SFT, PPO, DPO) as a labelled point on the judge axis."""
    source, pts = frontier_points(rows)
    if not pts and len(result) < 2:
        return None
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=100)
    xs = [p[0] for p in pts]
    if any(p[1] is not None for p in pts):
        ax.plot(xs, [p[1] for p in pts], "o-", color="C0", markersize=3, label=f"judge ({source})")
    for name, m in result.items():
        if "judge_score" in m and "kl_to_ref" in m:
            x = math.sqrt(max(m["kl_to_ref"], 0.0))
            ax.plot([x], [m["judge_score"]], "s", color="C2", markersize=6)
            ax.annotate(
                name, (x, m["judge_score"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
    ax.set_xlabel("sqrt(KL to reference)  (sqrt nats)", fontsize=8)
    ax.set_ylabel("judge score", fontsize=8, color="C0")
    if any(p[2] is not None for p in pts):
        ax2 = ax.twinx()
        ax2.plot(xs, [p[2] for p in pts], "^--", color="C3", markersize=3, label="RM score")
        ax2.set_ylabel("RM score (proxy)", fontsize=8, color="C3")
        ax2.tick_params(labelsize=8)
    handles, labels = ax.get_legend_handles_labels()
    if any(p[2] is not None for p in pts):
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, fontsize=7, loc="lower right")
    return _finish(plt, fig, ax, "over-optimisation: judge and RM score against sqrt(KL)", path)


def summarize(out: Path, result: dict[str, Any]) -> dict[str, Any]:
    """summary.json: each policy's held-out metrics as ``<policy>_<metric>``, the RM's held-out
    accuracy, and the judge gain of each trained policy over the SFT policy."""
    rm_rows = [r for r in read_metrics(out / "rm") if "eval/accuracy" in r]
    s: dict[str, Any] = {"rm_heldout_accuracy": rm_rows[-1]["eval/accuracy"] if rm_rows else None}
    for name, m in result.items():
        for k in EVAL_METRICS:
            if k in m:
                s[f"{name}_{k}"] = m[k]
    for name in result:
        if name != "sft" and f"{name}_judge_score" in s and "sft_judge_score" in s:
            s[f"{name}_judge_gain"] = s[f"{name}_judge_score"] - s["sft_judge_score"]
    return s


def _img(path: Path, title: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'


def write_report(
    out: Path, result: dict[str, Any], cfg, extra: dict[str, Any] | None = None, intro: str = ""
) -> dict[str, Any]:
    """out/report/{report.html, summary.json, *.png}; returns the summary."""
    rdir = out / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    rows = read_metrics(out / "ppo")
    curves = [
        (p, t) for k, t in CURVES if (p := _curve(rows, k, t, rdir / f"{k.replace('/', '_')}.png"))
    ]
    frontier = frontier_plot(rows, result, rdir / "frontier.png")
    s = summarize(out, result) | (extra or {})
    (rdir / "summary.json").write_text(json.dumps(s, indent=2))
    rm_acc = s["rm_heldout_accuracy"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>rlhfkit report</title>
<style>{STYLE}</style></head><body>
<h1>rlhfkit report</h1>{intro}
<h2>Held-out prompts: every policy on the same prompts and seed</h2>
<p>Held-out prompts were never trained on. Mean &plusmn; standard error over one sample per prompt.</p>
{metrics_table(result)}
{f"<p>Reward model held-out pairwise accuracy: <b>{rm_acc:.3f}</b>.</p>" if rm_acc is not None else ""}
<h2>Over-optimisation</h2>
<p>If the RM score keeps rising while the judge score falls as the KL grows, the policy is exploiting
the reward model (Gao et al. 2022); keep an earlier checkpoint (<code>eval.keep_best</code>) or raise
the KL coefficient.</p>
{_img(frontier, "frontier") if frontier else "<p>(no RL run or judge)</p>"}
<h2>Training curves</h2>{"".join(_img(p, t) for p, t in curves)}
<h2>Samples</h2>{samples_table(result, cfg.eval.samples_in_report)}
</body></html>"""
    (rdir / "report.html").write_text(page, encoding="utf-8")
    print(json.dumps(s, indent=2))
    print(f"report: {rdir / 'report.html'}", file=sys.stderr)
    return s
