"""The metric names of an RL run, in one place. They are a contract (docs/metrics.md documents
each one, and ``tests/test_rl_core.py`` checks the two lists are the same)."""

from __future__ import annotations

from rlhfkit.rollout.collect import Timings, skipped_rows
from rlhfkit.rollout.experience import Experience
from rlhfkit.train import dist

# name -> which runs log it ("always", "critic": with a critic, "option": when its option is set)
RL_METRICS: dict[str, str] = {
    "score/mean": "always",
    "score/std": "always",
    "score/normalized_mean": "always",
    "score/gold": "option",
    "kl/seq_mean": "always",
    "kl/beta": "always",
    "reward/non_score": "always",
    "reward/total": "always",
    "reward/unparsed": "option",
    "policy/entropy": "always",
    "response/length": "always",
    "response/env_length": "option",
    "response/eos_rate": "always",
    "loss/policy": "always",
    "loss/value": "critic",
    "loss/entropy": "option",
    "loss/kl": "option",
    "policy/clip_frac": "always",
    "policy/approx_kl": "always",
    "policy/ratio_mean": "always",
    "correction/mismatch": "option",
    "correction/capped": "option",
    "rollout/filtered": "option",
    "rollout/sampling_rounds": "option",
    "rollout/filled": "option",
    "rollout/staleness": "option",
    "env/turns": "option",
    "env/truncated": "option",
    "env/skipped": "option",
    "env/tool_calls": "option",
    "env/tool_errors": "option",
    "env/invalid_calls": "option",
    "env/observations_cut": "option",
    "value/clip_frac": "critic",
    "value/explained_var": "critic",
    "value/mean": "critic",
    "adv/mean": "always",
    "adv/std": "always",
    "grad_norm/actor": "always",
    "grad_norm/critic": "option",
    "lr/actor": "always",
    "lr/critic": "critic",
    "nonfinite/skipped": "always",
    "time/generate": "always",
    "time/score": "always",
    "time/update": "always",
    "time/iteration": "always",
    "perf/tokens_per_s": "always",
    # held-out evaluation (eval.every): one sample per held-out prompt, fixed seed
    "eval/rm_score": "option",
    "eval/judge_score": "option",
    "eval/kl": "option",
    "eval/length": "option",
    "eval/eos_rate": "option",
    "eval/distinct": "option",
    "eval/distinct2": "option",
    "eval/win_rate": "option",
}


# env counters logged as a mean per episode; every other one (ToolEnv's errors, skipped episodes,
# a custom environment's own keys) as the iteration's count on each rank
PER_EPISODE = ("turns", "truncated", "tool_calls")


def env_metrics(counts: dict[str, float], episodes: int, exp: Experience) -> dict[str, float]:
    """``env/<key>`` for whatever an environment's episodes counted (none without one), and the
    environment's tokens per episode (``response/env_length``)."""
    if not counts:
        return {}
    # an environment may report a key on one rank only: every rank logs the union (0 if unseen)
    keys = sorted(set().union(*dist.gather_objects(sorted(counts))))
    counts = {k: counts.get(k, 0.0) for k in keys}
    out = {f"env/{k}": v / episodes if k in PER_EPISODE else v for k, v in counts.items()}
    out["response/env_length"] = int((exp.response_mask & ~exp.loss_mask).sum()) / len(exp)
    return out


def rollout_metrics(
    exp: Experience, timings: Timings, beta: float, skipped: int, t_update: float, t_total: float
) -> dict[str, float]:
    """Per-iteration statistics of the buffer and the clocks (per-rank values averaged over ranks;
    the std is the mean of the per-rank stds)."""
    # the model's own tokens: an environment's are counted apart (response/env_length), and an
    # episode dropped by env.on_error: skip (no tokens, score 0) is left out of the score stats
    n_tokens = int(exp.loss_mask.sum())
    scored = exp.raw_scores[~skipped_rows(exp.group)]
    sampling = {}
    if timings.groups:  # rollout.filter_groups (DAPO dynamic sampling)
        sampling = {
            "rollout/filtered": timings.groups_filtered / timings.groups,
            "rollout/sampling_rounds": timings.rounds,
            "rollout/filled": timings.groups_filled,
        }
    episodes = max(timings.episodes, 1)
    env = env_metrics(timings.env, episodes, exp)
    return dist.mean_over_ranks(
        {
            **sampling,
            **env,
            "score/mean": float(scored.mean()) if len(scored) else 0.0,
            "score/std": float(scored.std()) if len(scored) > 1 else 0.0,
            "score/normalized_mean": float(exp.scores.mean()),
            "policy/entropy": timings.entropy_sum / max(timings.episodes, 1),
            "response/length": n_tokens / len(exp),
            "response/eos_rate": float(exp.stopped.float().mean()),
            "kl/beta": beta,
            "nonfinite/skipped": skipped,
            "time/generate": timings.generate,
            "time/score": timings.score,
            "time/update": t_update,
            "time/iteration": t_total,
            "perf/tokens_per_s": n_tokens / t_total,
        }
    )


def check_names(metrics: dict[str, float], sources: tuple[str, ...] = ()) -> dict[str, float]:
    """Every logged name must be one of ``RL_METRICS`` (a new metric is documented first),
    ``score/<name>`` of a configured reward source (``sources``: those names), or ``env/<key>``
    of a count an environment reported (its own keys pass through)."""
    unknown = sorted(
        k for k in set(metrics) - set(RL_METRICS) - set(sources) if not k.startswith("env/")
    )
    if unknown:
        raise KeyError(f"undocumented metric names {unknown}: add them to RL_METRICS and docs")
    return metrics
