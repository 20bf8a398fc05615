"""Data readers, formats, templates, masking, truncation, and every bad-input error."""

import json

import pytest
from conftest import write_jsonl

from rlhfkit.config import DataConfig, ModelConfig
from rlhfkit.data.build import load_preferences, load_prompts, load_sft
from rlhfkit.data.readers import DataError, read_records
from rlhfkit.data.tokenize import IGNORE_INDEX
from rlhfkit.models import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_lm):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_lm)))


@pytest.fixture(scope="module")
def chat_tok(tiny_chat_lm):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_chat_lm)))


def cfg(**kw):
    return DataConfig(**kw)


def test_sft_labels_mask_prompt_and_append_eos(tmp_path, tok):
    f = write_jsonl(
        tmp_path / "a.jsonl", [{"prompt": "copy : red blue :", "completion": "red blue"}]
    )
    (item,), report = load_sft(str(f), tok, cfg())
    prompt_ids = tok("copy : red blue :")["input_ids"]
    assert prompt_ids[0] == tok.bos_token_id
    completion = tok.convert_tokens_to_ids(["red", "blue"]) + [tok.eos_token_id]
    assert item.input_ids == prompt_ids + completion
    assert item.labels == [IGNORE_INDEX] * len(prompt_ids) + completion
    (item_all,), _ = load_sft(str(f), tok, cfg(train_on_prompt=True))
    assert item_all.labels == item_all.input_ids
    assert report.kept == 1 and report.records == 1


def test_pad_token_added_when_missing_or_equal_to_eos(tmp_path, tiny_lm):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_lm)
    t.pad_token = t.eos_token
    t.save_pretrained(tmp_path)
    loaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    assert loaded.pad_token_id is not None and loaded.pad_token_id != loaded.eos_token_id


def test_chat_template_and_messages(tmp_path, chat_tok):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "say red"},
                {"role": "assistant", "content": "good red"},
            ]
        },
        {"prompt": "say red", "completion": "good red"},
    ]
    f = write_jsonl(tmp_path / "m.jsonl", rows)
    items, _ = load_sft(str(f), chat_tok, cfg())
    assert (
        items[0].input_ids == items[1].input_ids
    )  # a plain string goes through the template as one turn
    text = chat_tok.decode(items[0].input_ids)
    assert text.startswith("<s> user : say red </s> assistant : good red </s>")
    n_label = sum(1 for x in items[0].labels if x != IGNORE_INDEX)
    assert n_label == 3  # "good red </s>": the template's trailing whitespace is not trained on


@pytest.mark.parametrize("suffix", ["json", "csv", "parquet", "hfdir"])
def test_other_sources(tmp_path, tok, suffix):
    rows = [{"prompt": "say red :", "chosen": "good red", "rejected": "bad red"}] * 3
    if suffix == "json":
        path = tmp_path / "p.json"
        path.write_text(json.dumps(rows))
    elif suffix == "csv":
        path = tmp_path / "p.csv"
        path.write_text(
            "prompt,chosen,rejected\n" + "".join("say red :,good red,bad red\n" for _ in rows)
        )
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        if suffix == "parquet":
            path = tmp_path / "p.parquet"
            ds.to_parquet(str(path))
        else:
            path = tmp_path / "dsdir"
            ds.save_to_disk(str(path))
    items, report = load_preferences(str(path), tok, cfg())
    assert report.kept == 3 and len(items[0].sequences) == 2
    assert items[0].sequences[0] != items[0].sequences[1]


def test_ranked_lists_with_ranking_or_scores(tmp_path, tok):
    rows = [
        {
            "prompt": "say red :",
            "responses": ["bad red", "good red", "ok red"],
            "ranking": [1, 2, 0],
        },
        {
            "prompt": "say red :",
            "responses": ["bad red", "good red", "ok red"],
            "scores": [0.1, 0.9, 0.5],
        },
    ]
    items, _ = load_preferences(str(write_jsonl(tmp_path / "r.jsonl", rows)), tok, cfg())
    assert items[0].sequences == items[1].sequences
    words = [
        tok.decode(s[n:], skip_special_tokens=True)
        for s, n in zip(items[0].sequences, items[0].prompt_lens, strict=True)
    ]
    assert words == ["good red", "ok red", "bad red"]


def test_truncate_and_drop_are_counted(tmp_path, tok):
    rows = [
        {"prompt": "copy : red :", "completion": "red " * 20},
        {"prompt": "copy : red :", "completion": "red"},
    ]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    items, report = load_sft(str(f), tok, cfg(max_length=10, max_prompt_length=6))
    assert report.truncated == 1 and len(items) == 2 and len(items[0].input_ids) == 10
    items, report = load_sft(str(f), tok, cfg(max_length=10, max_prompt_length=6, overlong="drop"))
    assert report.dropped_overlong == 1 and len(items) == 1
    items, report = load_prompts(str(f), tok, cfg(max_prompt_length=3))
    assert report.truncated == 2 and all(len(i.prompt_ids) == 3 for i in items)


BAD = [
    ({"completion": "red"}, "a.jsonl:2: field 'prompt': missing", load_sft),
    (
        {"prompt": "x", "completion": 5},
        "a.jsonl:2: field 'completion': expected a string",
        load_sft,
    ),
    ({"prompt": "x", "completion": "   "}, "a.jsonl:2: field 'completion': empty text", load_sft),
    (
        {"prompt": "x", "chosen": "red", "rejected": "red"},
        "a.jsonl:2: field 'rejected': chosen == rejected",
        load_preferences,
    ),
    (
        {"prompt": "x", "chosen": "red", "rejected": "blue", "margin": "big"},
        "a.jsonl:2: field 'margin'",
        load_preferences,
    ),
    ({"prompt": "x", "chosen": "red"}, "a.jsonl:2: field 'rejected': missing", load_preferences),
    (
        {"messages": [{"role": "user", "content": "hi"}]},
        "a.jsonl:2: field 'messages': the last message",
        load_sft,
    ),
]


@pytest.mark.parametrize("bad,message,loader", BAD)
def test_bad_records_name_file_line_and_field(tmp_path, tok, bad, message, loader):
    good = (
        {"prompt": "x", "completion": "red"}
        if loader is load_sft
        else {"prompt": "x", "chosen": "red", "rejected": "blue"}
    )
    f = write_jsonl(tmp_path / "a.jsonl", [good, bad, good])
    with pytest.raises(DataError) as e:
        loader(str(f), tok, cfg())
    assert message in str(e.value)
    items, report = loader(str(f), tok, cfg(on_error="skip"))
    assert report.skipped_bad == 1 and len(items) == 2 and report.records == 3


def test_ranked_bad_permutation(tmp_path, tok):
    rows = [{"prompt": "x", "responses": ["red", "blue"], "ranking": [0, 0]}]
    with pytest.raises(DataError, match=r"r.jsonl:1: field 'ranking': expected a permutation"):
        load_preferences(str(write_jsonl(tmp_path / "r.jsonl", rows)), tok, cfg())


def test_invalid_utf8_malformed_json_missing_and_empty_files(tmp_path, tok):
    f = tmp_path / "u.jsonl"
    f.write_bytes(
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n'
    )
    with pytest.raises(DataError, match=r"u.jsonl:2: invalid UTF-8"):
        read_records(f)
    f = tmp_path / "j.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n')
    with pytest.raises(DataError, match=r"j.jsonl:2: malformed JSON"):
        read_records(f)
    with pytest.raises(DataError, match=r"nope.jsonl does not exist"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"e.jsonl: no usable examples"):
        load_sft(str(tmp_path / "e.jsonl"), tok, cfg())
    d = tmp_path / "dir.jsonl"
    d.mkdir()
    with pytest.raises(DataError, match=r"cannot read data file .*dir.jsonl"):
        read_records(d)
