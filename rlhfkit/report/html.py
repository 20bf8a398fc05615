"""The HTML of the evaluation tables, shared by ``rlhfkit eval``'s eval.html and the pipeline's
report.html: the held-out metrics of each policy side by side, and sample responses."""

from __future__ import annotations

import html
from typing import Any

# what ``summarize`` reports per policy (each mean also with ``<name>_se``)
EVAL_METRICS = (
    "judge_score",
    "rm_score",
    "kl_to_ref",
    "length",
    "eos_rate",
    "distinct",
    "distinct2",
    "win_rate",
)


def _cell(m: dict[str, Any], key: str) -> str:
    if key not in m:
        return "-"
    se = m.get(f"{key}_se")
    return f"{m[key]:.3f}" + (f" &plusmn; {se:.3f}" if se is not None else "")


METRIC_ROWS = [
    ("judge_score", "judge score (independent)"),
    ("win_rate", "win rate vs the reference's samples (judge; ties half)"),
    ("rm_score", "RM score (the proxy optimised)"),
    ("kl_to_ref", "KL to the reference (nats / response)"),
    ("length", "response length (tokens)"),
    ("eos_rate", "EOS rate"),
    ("distinct", "distinct responses / responses"),
    ("distinct2", "distinct bigrams / bigrams"),
]


def metrics_table(result: dict[str, Any]) -> str:
    names = list(result)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["", *names])
    rows = "".join(
        f"<tr><td>{html.escape(title)}</td>"
        + "".join(f"<td>{_cell(result[n], key)}</td>" for n in names)
        + "</tr>"
        for key, title in METRIC_ROWS
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


def samples_table(result: dict[str, Any], n: int) -> str:
    names = list(result)
    head = "".join(f"<th>{html.escape(x)}</th>" for x in ["prompt", *names])
    rows = []
    for j in range(min(n, len(result[names[0]]["samples"]))):
        cells = [html.escape(result[names[0]]["samples"][j]["prompt"])]
        for name in names:
            smp = result[name]["samples"][j]
            score = f"<br><small>judge {smp['judge']:.3f}</small>" if "judge" in smp else ""
            cells.append(html.escape(smp["response"]) + score)
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}img{margin:4px}"
)


def eval_html(result: dict[str, Any], n_samples: int) -> str:
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>rlhfkit eval</title>
<style>{STYLE}</style></head><body><h1>Held-out evaluation</h1>
<p>One sample per held-out prompt and policy, the same seed for all; mean &plusmn; standard error.</p>
{metrics_table(result)}<h2>Samples</h2>{samples_table(result, n_samples)}</body></html>"""
