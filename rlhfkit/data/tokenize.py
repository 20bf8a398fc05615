"""Templates, tokenisation, truncation and collation. Prompt rendering lives here once, so SFT,
RM and PPO see byte-identical prompts.

Decisions (docs/decisions.md): when the tokenizer has a chat template, every example goes
through it (plain strings become one user turn and one assistant turn); otherwise prompt and
completion are concatenated as they are. EOS is appended to every completion.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from rlhfkit.data.formats import Text
from rlhfkit.data.readers import DataError

IGNORE_INDEX = -100  # label value that HF causal-LM losses skip


@dataclass(frozen=True)
class Limits:
    max_length: int
    max_prompt_length: int
    overlong: str = "truncate"  # or "drop"


def _as_messages(text: Text, role: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}] if isinstance(text, str) else list(text)


def _plain(text: Text) -> str:
    # a message list without a chat template: "role: content" lines
    if isinstance(text, str):
        return text
    return "".join(f"{m['role']}: {m['content']}\n" for m in text)


def uses_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


# How a template without a tools section still shows the schemas: in the system prompt, in the
# words of the Hermes / Qwen 2.5 templates (which put them there themselves)
TOOLS_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{schemas}\n</tools>\n\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
_PROBE = "rlhfkit_probe_7f3a"  # a name no template writes on its own
_shown: dict[tuple[str, str], bool] = {}  # (template, what) -> whether it renders it
_warned: set[str] = set()


def _template_shows(tokenizer, what: str) -> bool:
    """Whether the chat template renders the ``tools`` it is given, or a system message."""
    key = (tokenizer.chat_template, what)
    if key not in _shown:
        user = [{"role": "user", "content": "hi"}]
        if what == "tools":
            probe = {"type": "function", "function": {"name": _PROBE, "parameters": {}}}
            text = tokenizer.apply_chat_template(user, tools=[probe], tokenize=False)
        else:
            system = [{"role": "system", "content": _PROBE}]
            text = tokenizer.apply_chat_template(system + user, tokenize=False)
        _shown[key] = _PROBE in text
    return _shown[key]


class ToolsNotShown(ValueError):
    """The chat template shows neither the tools it is given nor a system message."""


def tools_in_system(messages: list[dict], tools: list[dict]) -> list[dict]:
    """``messages`` with the tool schemas rendered into the system prompt (``TOOLS_SYSTEM``),
    after the system message's own text when there is one."""
    import json

    text = TOOLS_SYSTEM.format(schemas="\n".join(json.dumps(t) for t in tools))
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def tools_for_template(tokenizer, messages: list[dict], tools: list[dict] | None):
    """(messages, tools) to render: as they are when the chat template shows tools; else the
    schemas go into the system prompt (a warning says so, once per template), so that a model
    whose template has no tools section (SmolLM2's) still sees what it can call. A template that
    shows no system message either cannot show them: ``ToolsNotShown``."""
    if not tools or not uses_chat_template(tokenizer) or _template_shows(tokenizer, "tools"):
        return messages, tools
    if not _template_shows(tokenizer, "system"):
        raise ToolsNotShown(
            f"the chat template of {tokenizer.name_or_path!r} renders neither the tools it is "
            "given nor a system message, so the model could never see the tool schemas; use a "
            "tokenizer whose template shows one of them"
        )
    if tokenizer.chat_template not in _warned:
        _warned.add(tokenizer.chat_template)
        warnings.warn(
            f"the chat template of {tokenizer.name_or_path!r} has no tools section: the tool "
            "schemas are rendered into the system prompt (the Hermes/Qwen convention, "
            "rlhfkit.data.tokenize.TOOLS_SYSTEM)",
            stacklevel=2,
        )
    return tools_in_system(messages, tools), None


def check_tools_shown(tokenizer, key: str) -> None:
    """At start-up, for a config that gives the model tools (``key``: e.g. ``env.tools``): a
    ``ConfigError`` naming the key and the template when the template cannot show them, and the
    warning of ``tools_for_template`` when they go into the system prompt."""
    from rlhfkit.config import ConfigError

    probe = {"type": "function", "function": {"name": _PROBE, "parameters": {}}}
    try:
        tools_for_template(tokenizer, [{"role": "user", "content": "hi"}], [probe])
    except ToolsNotShown as e:
        raise ConfigError(f"{key}: {e}") from None


def render_prompt(tokenizer, prompt: Text, tools: list[dict] | None = None) -> str:
    """The exact text the policy sees before its response (``tools``: JSON schemas the chat
    template renders, for tool traces; ``tools_for_template`` when it has no place for them)."""
    if uses_chat_template(tokenizer):
        messages, tools = tools_for_template(tokenizer, _as_messages(prompt, "user"), tools)
        return tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )
    return _plain(prompt)


def render_completion(
    tokenizer, prompt: Text, completion: Text, where: str, tools: list[dict] | None = None
) -> str:
    """The response text that follows ``render_prompt(prompt)``, without trailing template whitespace."""
    if not uses_chat_template(tokenizer):
        return _plain(completion)
    p = render_prompt(tokenizer, prompt, tools)
    messages, tools = tools_for_template(tokenizer, _as_messages(prompt, "user"), tools)
    full = tokenizer.apply_chat_template(
        messages + _as_messages(completion, "assistant"), tools=tools, tokenize=False
    )
    if not full.startswith(p):
        raise DataError(
            f"{where}: the chat template does not render the prompt as a prefix of prompt+completion"
        )
    return full[len(p) :].rstrip()


def encode_prompt(tokenizer, prompt: Text, tools: list[dict] | None = None) -> list[int]:
    text = render_prompt(tokenizer, prompt, tools)
    # a chat template writes its own BOS; plain text gets the tokenizer's special tokens
    return tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer))["input_ids"]


def encode_completion(
    tokenizer, prompt: Text, completion: Text, where: str, tools: list[dict] | None = None
) -> list[int]:
    ids = tokenizer(
        render_completion(tokenizer, prompt, completion, where, tools), add_special_tokens=False
    )["input_ids"]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids = ids + [
            tokenizer.eos_token_id
        ]  # without EOS in the data the model never learns to stop
    return ids


def fit(
    prompt_ids: list[int], completion_ids: list[int], limits: Limits
) -> tuple[list[int], list[int]] | None:
    """Apply the length limits: prompts are cut from the left, completions from the right.

    Returns None when the example is over a limit and ``overlong == 'drop'``.
    """
    over = (
        len(prompt_ids) > limits.max_prompt_length
        or len(prompt_ids) + len(completion_ids) > limits.max_length
    )
    if not over:
        return prompt_ids, completion_ids
    if limits.overlong == "drop":
        return None
    prompt_ids = prompt_ids[-limits.max_prompt_length :]
    return prompt_ids, completion_ids[: max(limits.max_length - len(prompt_ids), 1)]


def sft_labels(
    prompt_ids: list[int], completion_ids: list[int], train_on_prompt: bool
) -> list[int]:
    """Labels aligned with input_ids = prompt + completion; prompt positions are ignored by default."""
    masked = list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return masked + list(completion_ids)


def pad_right(seqs: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids padded on the right, and the (B, L) attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_left(
    seqs: list[list[int]], pad_id: int, device=None, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids padded on the left (for generation), and the (B, P) attention mask.
    ``width``: pad to at least this many columns (a fixed layout), else to the longest."""
    width = max([len(s) for s in seqs] + [width or 0])
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Which sequences share each row of a padding-free batch: first fit, in order, rows of at most
    ``capacity`` tokens (a longer sequence gets a row of its own). Returns indices per row."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def packed_batch(
    seqs: list[list[int]], capacity: int, pad_id: int, labels: list[list[int]] | None = None
) -> dict[str, torch.Tensor]:
    """Several sequences per row, no attention mask: position ids restart at 0 for each sequence,
    which is how transformers (>= 4.53 masking_utils) keeps attention within each one, for every
    attention implementation. The padding at a row's end is a sequence of its own (positions from
    0, label -100). Returns input_ids, position_ids (R, L), labels (R, L) when given (the first
    token of each sequence is never a target: nothing before it in its sequence predicts it), and
    ``ends`` (N, 2): the (row, column) of each sequence's last token, in input order."""
    rows = pack_rows([len(s) for s in seqs], capacity)
    width = max(sum(len(seqs[i]) for i in r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    ends = torch.zeros((len(seqs), 2), dtype=torch.long)
    for r, members in enumerate(rows):
        col = 0
        for i in members:
            n = len(seqs[i])
            ids[r, col : col + n] = torch.tensor(seqs[i])
            pos[r, col : col + n] = torch.arange(n)
            if labels is not None:
                lab[r, col + 1 : col + n] = torch.tensor(labels[i][1:], dtype=torch.long)
            ends[i] = torch.tensor([r, col + n - 1])
            col += n
        pos[r, col:] = torch.arange(width - col)  # the padding: a sequence of its own
    out = {"input_ids": ids, "position_ids": pos, "ends": ends}
    if labels is not None:
        out["labels"] = lab
    return out
