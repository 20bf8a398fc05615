"""Reports: the HTML tables of a held-out evaluation (``html``) and the pipeline's report with
its plots (``pipeline``). Below the stages: they read results and metrics, never run a stage."""

from rlhfkit.report.pipeline import frontier_points, summarize, write_report

__all__ = ["frontier_points", "summarize", "write_report"]
