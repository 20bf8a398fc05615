"""Validate records into typed examples, following TRL's dataset conventions.

    SFT:         {"prompt", "completion"} or {"messages": [{"role", "content"}, ...]}
    preference:  {"prompt", "chosen", "rejected", "margin"?}     (strings or message lists)
    ranked:      {"prompt", "responses": [...], "ranking": [...]} best first, or "scores"
    prompt-only: {"prompt"}                                       (PPO)

A string prompt/completion is plain text; a message list goes through the chat template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhfkit.data.readers import DataError, Record

Text = str | list[dict[str, str]]  # plain text, or chat messages


@dataclass(frozen=True)
class SFTExample:
    prompt: Text
    completion: Text
    where: str
    tools: list[dict] | None = None  # JSON schemas rendered by the chat template (tool traces)


@dataclass(frozen=True)
class PreferenceExample:
    prompt: Text
    chosen: Text
    rejected: Text
    margin: float | None
    where: str


@dataclass(frozen=True)
class RankedExample:
    prompt: Text
    responses: list[Text]  # sorted best first
    where: str


@dataclass(frozen=True)
class PromptExample:
    prompt: Text
    where: str
    columns: dict = field(default_factory=dict)  # the row's other fields (answer, task id, ...)


def _fail(rec: Record, field: str, msg: str) -> DataError:
    return DataError(f"{rec.where}: field '{field}': {msg}")


def _messages(value: Any, rec: Record, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise _fail(rec, field, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise _fail(rec, field, "empty message list")
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise _fail(rec, f"{field}[{i}]", "each message needs string 'role' and 'content'")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text(rec: Record, field: str, *, allow_empty: bool = False) -> Text:
    if field not in rec.fields or rec.fields[field] is None:
        raise _fail(rec, field, "missing")
    value = rec.fields[field]
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise _fail(rec, field, "empty text")
        return value
    if isinstance(value, list):
        return _messages(value, rec, field)
    raise _fail(rec, field, f"expected a string or a list of messages, got {type(value).__name__}")


def _tools(rec: Record) -> list[dict] | None:
    """The optional ``tools`` field: JSON schemas for the chat template (as TRL's SFT reads)."""
    tools = rec.fields.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise _fail(rec, "tools", "expected a list of JSON schemas (objects)")
    return tools


def parse_sft(rec: Record) -> SFTExample:
    tools = _tools(rec)
    if "messages" in rec.fields and "completion" not in rec.fields:
        msgs = _messages(rec.fields["messages"], rec, "messages")
        if msgs[-1]["role"] != "assistant":
            raise _fail(rec, "messages", "the last message must be the assistant's reply")
        if not msgs[-1]["content"].strip():
            raise _fail(rec, "messages", "empty completion (last assistant message)")
        return SFTExample(msgs[:-1], [msgs[-1]], rec.where, tools)
    prompt = _text(rec, "prompt", allow_empty=True)
    completion = _text(rec, "completion")
    return SFTExample(prompt, completion, rec.where, tools)


def parse_preference(rec: Record) -> PreferenceExample:
    prompt = _text(rec, "prompt", allow_empty=True)
    chosen, rejected = _text(rec, "chosen"), _text(rec, "rejected")
    if chosen == rejected:
        raise _fail(rec, "rejected", "chosen == rejected: the pair carries no preference")
    margin = rec.fields.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise _fail(rec, "margin", f"expected a number, got {margin!r}")
    return PreferenceExample(
        prompt, chosen, rejected, None if margin is None else float(margin), rec.where
    )


def parse_ranked(rec: Record) -> RankedExample:
    prompt = _text(rec, "prompt", allow_empty=True)
    responses = rec.fields.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise _fail(rec, "responses", "expected a list of at least 2 responses")
    sub = [_text(Record({"r": r}, rec.where), "r") for r in responses]
    n = len(sub)
    if "ranking" in rec.fields:
        order = rec.fields["ranking"]
        if (
            not isinstance(order, list)
            or sorted(order) != list(range(n))
            or any(isinstance(o, bool) for o in order)
        ):
            raise _fail(
                rec, "ranking", f"expected a permutation of 0..{n - 1} (best first), got {order!r}"
            )
    elif "scores" in rec.fields:
        scores = rec.fields["scores"]
        if (
            not isinstance(scores, list)
            or len(scores) != n
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)
        ):
            raise _fail(rec, "scores", f"expected {n} numbers, one per response")
        order = sorted(range(n), key=lambda i: -scores[i])
    else:
        raise _fail(rec, "ranking", "missing (give 'ranking' best first, or 'scores')")
    ranked = [sub[i] for i in order]
    if len({str(r) for r in ranked}) < n:
        raise _fail(rec, "responses", "duplicate responses carry no preference")
    return RankedExample(prompt, ranked, rec.where)


def parse_prompt(rec: Record) -> PromptExample:
    """A prompt row: ``prompt`` (text or messages), every other field kept as a column for
    reward functions and environments (``fn(prompts, responses, **columns)``)."""
    columns = {k: v for k, v in rec.fields.items() if k != "prompt"}
    return PromptExample(_text(rec, "prompt"), rec.where, columns)


def detect_preference_format(records: list[Record]) -> str:
    """'ranked' if the first record has 'responses', else 'pairwise'."""
    return "ranked" if records and "responses" in records[0].fields else "pairwise"


def parse_all(records: list[Record], parse, on_error: str) -> tuple[list, int]:
    """Parse every record; on_error='skip' drops bad ones and returns their count, 'raise' stops."""
    out, skipped = [], 0
    for rec in records:
        try:
            out.append(parse(rec))
        except DataError:
            if on_error != "skip":
                raise
            skipped += 1
    return out, skipped
