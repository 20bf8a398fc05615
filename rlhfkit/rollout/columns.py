"""The row's columns: every field of a prompts-file row besides ``prompt`` reaches reward
functions (``fn(prompts, responses, **columns)``, as TRL passes dataset columns) and environments.

A function written for ``(prompts, responses)`` keeps working: it gets only the columns it names,
and none if it names none. One that takes ``**kwargs`` gets them all. The columns a function
*needs* (its keyword parameters without defaults, or an explicit ``fn.columns``) are checked on
every row when the data is loaded, so a missing one is a data error naming the file, the line and
the column, not a crash mid-run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from rlhfkit.data.readers import DataError

Columns = dict[str, list[Any]]  # column name -> one value per response (None: the row lacks it)


def columns_of(items: Sequence) -> Columns:
    """The columns of ``items`` (``PromptItem``s, one per response), aligned with them."""
    keys = sorted({k for it in items for k in it.columns})
    return {k: [it.columns.get(k) for it in items] for k in keys}


def _parameters(fn: Callable) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: call it with two arguments
        return None


def takes_columns(fn: Callable) -> tuple[bool, set[str]]:
    """(takes every column via ``**kwargs``, the column names it takes by name) after the two
    positional arguments ``prompts, responses``."""
    params = _parameters(fn)
    if params is None:
        return False, set()
    rest = params[2:]
    every = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name for p in rest if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return every, named


def required_columns(fn: Callable) -> tuple[str, ...]:
    """The columns ``fn`` cannot do without: ``fn.columns`` if it declares them, else its keyword
    parameters after ``prompts, responses`` that have no default."""
    declared = getattr(fn, "columns", None)
    if declared is not None:
        return tuple(declared)
    params = _parameters(fn) or []
    return tuple(
        p.name
        for p in params[2:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
    )


def columns_for(fn: Callable, columns: Columns | None) -> Columns:
    """The keyword arguments ``fn`` gets from ``columns``."""
    if not columns:
        return {}
    every, named = takes_columns(fn)
    return dict(columns) if every else {k: v for k, v in columns.items() if k in named}


def check_columns(
    items: Sequence, needs: dict[str, tuple[str, ...]], provided: Sequence[str] = ()
) -> None:
    """Every row has every column each source needs. ``needs``: the config key of a source (e.g.
    ``reward_fn``) -> its columns; ``provided``: columns the rollout fills itself (an episode's
    ``env_reward`` and ``final_response``). Raises ``DataError`` naming the row, the column and
    the key."""
    for key, cols in needs.items():
        for it in items:
            for c in cols:
                if c in provided:
                    continue
                if it.columns.get(c) is None:
                    raise DataError(
                        f"{it.where or 'a prompt row'}: column '{c}': missing; {key} needs it"
                    )


# columns that hold Python objects (an episode's environment instances): local reward
# functions read them, a reward server is never sent them
LOCAL_COLUMNS = ("environments",)


def sendable(columns: Columns | None) -> Columns | None:
    """The columns a reward server gets: every one but ``LOCAL_COLUMNS``."""
    if not columns:
        return columns
    return {k: v for k, v in columns.items() if k not in LOCAL_COLUMNS}
