"""The GGUF conversion's two guards (rlhfkit.demo.gguf), without SmolLM2's 28-s conversion: one
parse per file while transformers reads it three times, and a seeded conversion (the pad row
that transformers adds was random). tests/test_smollm2.py converts the real file."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from rlhfkit.demo import gguf as conversion  # noqa: E402


def write_gguf(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_one_parse_per_file_shares_the_reader_and_restores_gguf(tmp_path):
    a, b = write_gguf(tmp_path / "a.gguf"), write_gguf(tmp_path / "b.gguf")
    real = gguf.GGUFReader
    with conversion._one_parse_per_file():
        first = gguf.GGUFReader(a)
        assert gguf.GGUFReader(str(a)) is first  # str or path, the same file: the same reader
        assert gguf.GGUFReader(b) is not first
        (t,) = first.tensors
        assert t.name == "token_embd.weight" and t.data.reshape(-1).tolist() == list(range(12))
    assert gguf.GGUFReader is real
    assert gguf.GGUFReader(a) is not first  # outside the context: a fresh parse


def test_the_conversion_is_seeded_and_leaves_the_callers_generator_alone(tmp_path, monkeypatch):
    """What load_policy draws (transformers' new pad-token row) is the same on every conversion;
    the caller's random stream goes on as if no conversion had run."""

    def load_policy(cfg, tok, trainable):
        return torch.randn(4)  # stands for the resized embedding's random row

    def export(model, tok, d):
        torch.save(model, d / "row.pt")

    monkeypatch.setattr(conversion, "load_tokenizer", lambda cfg: None)
    monkeypatch.setattr(conversion, "load_policy", load_policy)
    monkeypatch.setattr(conversion, "export_model", export)
    rows = []
    for name, caller_seed in (("one", 123), ("two", 456)):  # two processes' generators differ
        torch.manual_seed(caller_seed)
        expected_next = torch.rand(3)
        torch.manual_seed(caller_seed)
        (tmp_path / name).mkdir()
        conversion.dequantize("src", "f.gguf", tmp_path / name)
        rows.append(torch.load(tmp_path / name / "row.pt"))
        assert torch.equal(torch.rand(3), expected_next)
    assert torch.equal(rows[0], rows[1])


def test_a_gguf_file_is_converted_once_per_machine_and_copied(tmp_path, monkeypatch):
    """convert_gguf converts into the machine's cache once (keyed by the file's name, size and
    time), then copies: a second output directory is a copy of the first conversion, and a
    write into it leaves the cache alone."""
    src = tmp_path / "pkg"
    src.mkdir()
    (src / "m.gguf").write_bytes(b"x" * 10)
    calls = []

    def dequantize(src_dir, gguf_file, out):
        calls.append(gguf_file)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"w" * 8)

    monkeypatch.setenv("RLHFKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(conversion, "dequantize", dequantize)
    a = conversion.convert_gguf(str(src), "m.gguf", tmp_path / "a")
    b = conversion.convert_gguf(str(src), "m.gguf", tmp_path / "b")
    assert calls == ["m.gguf"] and a != b
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    (b / "model.safetensors").write_bytes(b"changed")  # a save into an output directory
    cached = conversion.converted_gguf(str(src), "m.gguf")
    assert (cached / "model.safetensors").read_bytes() == b"w" * 8
    assert cached.parent == tmp_path / "cache" / "gguf" and calls == ["m.gguf"]
    (src / "m.gguf").write_bytes(b"y" * 11)  # another file (a new package version): converted again
    conversion.convert_gguf(str(src), "m.gguf", tmp_path / "c")
    assert calls == ["m.gguf", "m.gguf"]
