"""A reward model scored on text, with its own tokenizer and chat template.

An RM trained by `rlhfkit rm` saw each example as ``encode_prompt(prompt) + encode_completion(
prompt, response)`` with *its* tokenizer (chat template when it has one, EOS appended): text goes
back into exactly that format. Used when the RM's tokenizer differs from the actor's, and by the
reward server."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from rlhfkit.algos import last_index
from rlhfkit.config import ModelConfig
from rlhfkit.data.tokenize import encode_completion, encode_prompt, pad_right
from rlhfkit.models import PerTokenScalar, device_of, load_scalar_model, load_tokenizer


def same_tokenizer(a, b) -> bool:
    """Whether token ids mean the same under ``a`` and ``b``: the same vocabulary (every token
    string to the same id) and the same special tokens. Equal names do not count."""
    if a.get_vocab() != b.get_vocab():
        return False
    specials = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    return all(getattr(a, s, None) == getattr(b, s, None) for s in specials)


def trained_max_length(rm_dir: str | Path, model) -> int:
    """The RM's ``data.max_length`` from the run config written beside it, else its position limit."""
    run_cfg = Path(rm_dir, "run_config.yaml")
    if run_cfg.exists():
        data = (yaml.safe_load(run_cfg.read_text()) or {}).get("data") or {}
        if isinstance(data.get("max_length"), int):
            return data["max_length"]
    return int(getattr(model.config, "max_position_embeddings", 2048))


class TextRM:
    """Scores (prompt, response) texts with an RM and its own tokenizer, in batches, truncated to
    the RM's maximum length (prompt cut from the left, response from the right; counted)."""

    def __init__(
        self, rm_dir: str, device: str = "auto", batch_size: int = 32, dtype: str = "fp32"
    ):
        mc = ModelConfig(name_or_path=str(rm_dir), device=device, dtype=dtype)
        self.tokenizer = load_tokenizer(mc)
        model = load_scalar_model(
            mc, self.tokenizer, str(rm_dir), fresh_head=False, trainable=False
        )
        self.module = PerTokenScalar(model)
        self.max_length = trained_max_length(rm_dir, model)
        self.batch_size = batch_size
        self.truncated = 0  # responses cut to max_length so far

    def encode(self, prompt: str, response: str) -> list[int]:
        tok = self.tokenizer
        p = encode_prompt(tok, prompt)
        r = encode_completion(tok, prompt, response, "reward text")
        if len(p) + len(r) <= self.max_length:
            return p + r
        self.truncated += 1
        p = p[-max(self.max_length // 2, 1) :] if len(p) >= self.max_length else p
        return p + r[: max(self.max_length - len(p), 1)]

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """(B,) float32 scores read at the last token of each prompt + response."""
        out = []
        for i in range(0, len(prompts), self.batch_size):
            seqs = [
                self.encode(p, r)
                for p, r in zip(
                    prompts[i : i + self.batch_size],
                    responses[i : i + self.batch_size],
                    strict=True,
                )
            ]
            ids, mask = pad_right(seqs, self.tokenizer.pad_token_id, device_of(self.module))
            per_pos = self.module(ids, mask)  # (b, L)
            out.append(
                per_pos[torch.arange(len(seqs), device=per_pos.device), last_index(mask)].cpu()
            )
        return torch.cat(out) if out else torch.zeros(0)
