"""From a data source to tokenised training items, with every skip and truncation counted."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from rlhfkit.config import DataConfig
from rlhfkit.data.formats import (
    PreferenceExample,
    PromptExample,
    RankedExample,
    SFTExample,
    detect_preference_format,
    parse_all,
    parse_preference,
    parse_prompt,
    parse_ranked,
    parse_sft,
)
from rlhfkit.data.readers import DataError, read_records
from rlhfkit.data.tokenize import Limits, encode_completion, encode_prompt, fit, sft_labels


@dataclass
class LoadReport:
    source: str
    records: int = 0
    skipped_bad: int = 0  # malformed records skipped (on_error: skip)
    truncated: int = 0
    dropped_overlong: int = 0  # over max_length with overlong: drop
    kept: int = 0

    def line(self) -> str:
        return (
            f"{self.source}: {self.kept} examples kept of {self.records} records "
            f"({self.skipped_bad} malformed skipped, {self.truncated} truncated, "
            f"{self.dropped_overlong} over-long dropped)"
        )


@dataclass
class SFTItem:
    input_ids: list[int]
    labels: list[int]


@dataclass
class RankItem:
    """A preference pair is a ranked list of two. ``sequences`` are prompt+response ids, best first."""

    sequences: list[list[int]]
    margin: float | None = None
    prompt_lens: list[int] = field(default_factory=list)  # prompt tokens at the start of each


@dataclass
class PromptItem:
    prompt_ids: list[int]
    prompt: object = field(
        repr=False, default=None
    )  # the original text/messages (for reward functions)
    columns: dict = field(repr=False, default_factory=dict)  # the row's other fields
    where: str = ""  # "data/x.jsonl:17", for errors that name the row


def _limits(cfg: DataConfig) -> Limits:
    return Limits(cfg.max_length, cfg.max_prompt_length, cfg.overlong)


def _split(items: list, cfg: DataConfig, seed: int) -> tuple[list, list]:
    if cfg.eval_file or cfg.eval_fraction == 0:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(items) * cfg.eval_fraction))
    return [items[i] for i in order[n_eval:]], [items[i] for i in order[:n_eval]]


def _read(source: str, cfg: DataConfig, parse) -> tuple[list, LoadReport]:
    records = read_records(source, cfg.split)
    examples, skipped = parse_all(records, parse, cfg.on_error)
    report = LoadReport(source, records=len(records), skipped_bad=skipped)
    if not examples:
        raise DataError(
            f"{source}: no usable examples ({len(records)} records, {skipped} malformed)"
        )
    return examples, report


def _fit_counted(prompt_ids, completion_ids, limits: Limits, report: LoadReport):
    out = fit(prompt_ids, completion_ids, limits)
    if out is None:
        report.dropped_overlong += 1
    elif out != (prompt_ids, completion_ids):
        report.truncated += 1
    return out


def tokenize_sft(
    examples: list[SFTExample], tokenizer, cfg: DataConfig, report: LoadReport
) -> list[SFTItem]:
    items = []
    for ex in examples:
        p = encode_prompt(tokenizer, ex.prompt, ex.tools)
        c = encode_completion(tokenizer, ex.prompt, ex.completion, ex.where, ex.tools)
        out = _fit_counted(p, c, _limits(cfg), report)
        if out is not None:
            items.append(SFTItem(out[0] + out[1], sft_labels(out[0], out[1], cfg.train_on_prompt)))
    report.kept = len(items)
    return items


def tokenize_ranked(
    examples: list, tokenizer, cfg: DataConfig, report: LoadReport
) -> list[RankItem]:
    items = []
    for ex in examples:
        responses = [ex.chosen, ex.rejected] if isinstance(ex, PreferenceExample) else ex.responses
        p = encode_prompt(tokenizer, ex.prompt)
        seqs, prompt_lens, any_over = [], [], False
        for r in responses:
            c = encode_completion(tokenizer, ex.prompt, r, ex.where)
            out = fit(p, c, _limits(cfg))
            any_over |= out != (p, c)
            if out is None:
                break
            seqs.append(out[0] + out[1])
            prompt_lens.append(len(out[0]))
        if len(seqs) < len(responses):
            report.dropped_overlong += 1
            continue
        report.truncated += int(any_over)
        if len({tuple(s) for s in seqs}) < len(seqs):
            # truncation made two responses identical: the example no longer holds a preference
            report.dropped_overlong += 1
            continue
        margin = ex.margin if isinstance(ex, PreferenceExample) else None
        items.append(RankItem(seqs, margin, prompt_lens))
    report.kept = len(items)
    return items


def load_sft(source: str, tokenizer, cfg: DataConfig) -> tuple[list[SFTItem], LoadReport]:
    examples, report = _read(source, cfg, parse_sft)
    return tokenize_sft(examples, tokenizer, cfg, report), report


def load_preferences(source: str, tokenizer, cfg: DataConfig) -> tuple[list[RankItem], LoadReport]:
    records = read_records(source, cfg.split)
    parse = parse_ranked if detect_preference_format(records) == "ranked" else parse_preference
    examples, skipped = parse_all(records, parse, cfg.on_error)
    report = LoadReport(source, records=len(records), skipped_bad=skipped)
    if not examples:
        raise DataError(
            f"{source}: no usable examples ({len(records)} records, {skipped} malformed)"
        )
    return tokenize_ranked(examples, tokenizer, cfg, report), report


def load_prompts(source: str, tokenizer, cfg: DataConfig) -> tuple[list[PromptItem], LoadReport]:
    examples: list[PromptExample]
    examples, report = _read(source, cfg, parse_prompt)
    items = []
    for ex in examples:
        ids = encode_prompt(tokenizer, ex.prompt)
        if len(ids) > cfg.max_prompt_length:
            if cfg.overlong == "drop":
                report.dropped_overlong += 1
                continue
            report.truncated += 1
            ids = ids[-cfg.max_prompt_length :]
        if not ids:
            raise DataError(
                f"{ex.where}: field 'prompt': renders to zero tokens; generation needs a prompt"
            )
        items.append(PromptItem(ids, ex.prompt, ex.columns, ex.where))
    report.kept = len(items)
    return items, report


def train_eval(load, tokenizer, cfg: DataConfig, seed: int):
    """(train items, eval items, reports) using eval_file, or an eval_fraction split of train."""
    train, rep = load(cfg.train_file, tokenizer, cfg)
    reports = [rep]
    if cfg.eval_file:
        evals, erep = load(cfg.eval_file, tokenizer, cfg)
        reports.append(erep)
    else:
        train, evals = _split(train, cfg, seed)
    return train, evals, reports


__all__ = [
    "LoadReport",
    "PromptItem",
    "RankItem",
    "RankedExample",
    "SFTItem",
    "load_preferences",
    "load_prompts",
    "load_sft",
    "train_eval",
]
