"""Tiny local models and tokenizers (no hub): for tests, the offline demo and benchmarks.

A word-level tokenizer over a fixed vocabulary and a randomly initialised Llama-style causal LM,
written as a normal HF directory that ``from_pretrained`` loads.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL = {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<|pad|>"}


def build_tokenizer(words: list[str], chat_template: str | None = None):
    """PreTrainedTokenizerFast over ``words`` split on whitespace; BOS is prepended to plain text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {
        tok: i
        for i, tok in enumerate([SPECIAL["pad"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["unk"]])
    }
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk"]))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    bos = vocab[SPECIAL["bos"]]
    tk.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A", special_tokens=[(SPECIAL["bos"], bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        unk_token=SPECIAL["unk"],
        pad_token=SPECIAL["pad"],
    )
    if chat_template:
        tok.chat_template = chat_template
    return tok


def build_tiny_lm(
    directory: str | Path,
    words: list[str],
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 256,
    seed: int = 0,
    chat_template: str | None = None,
) -> Path:
    """Write a random-init LlamaForCausalLM and its tokenizer to ``directory``; returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" is noise in a user's terminal
    tok = build_tokenizer(words, chat_template)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory
