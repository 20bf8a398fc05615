"""Property-based fuzzing of the data readers and the config loader (hypothesis).

Whatever bytes or values come in, the outcome is a parsed example, a counted skip, or a
DataError / ConfigError that names the file and line (or the key); never another exception."""

import json
import string
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhfkit.config import ConfigError, PPOConfig, SFTConfig, load_config
from rlhfkit.data.formats import parse_all, parse_preference, parse_prompt, parse_ranked, parse_sft
from rlhfkit.data.readers import DataError, Record, read_records

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
keys = st.sampled_from(
    [
        "prompt",
        "completion",
        "messages",
        "chosen",
        "rejected",
        "margin",
        "responses",
        "ranking",
        "scores",
        "role",
        "content",
        "extra",
    ]
)
records = st.dictionaries(
    keys, json_values | st.text() | st.lists(st.text(), max_size=4), max_size=6
)
PARSERS = [parse_sft, parse_preference, parse_ranked, parse_prompt]


@FUZZ
@given(st.binary(max_size=400), st.sampled_from([".jsonl", ".json", ".csv"]))
def test_readers_on_arbitrary_bytes(raw, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(raw)
        try:
            recs = read_records(path)
        except DataError as e:
            assert str(path) in str(e)
            return
        assert all(isinstance(r.fields, dict) and str(path) in r.where for r in recs)


@FUZZ
@given(st.lists(records, min_size=1, max_size=5), st.sampled_from(PARSERS))
def test_parsers_raise_data_errors_that_name_the_record_or_skip_and_count(rows, parse):
    recs = [Record(r, f"f.jsonl:{i + 1}") for i, r in enumerate(rows)]
    ok, skipped = parse_all(recs, parse, "skip")
    assert len(ok) + skipped == len(recs)
    for i, rec in enumerate(recs):
        try:
            parse(rec)
        except DataError as e:
            assert str(e).startswith(f"f.jsonl:{i + 1}: field '")


@FUZZ
@given(st.lists(records, max_size=4), st.text(alphabet=string.printable, max_size=30))
def test_jsonl_files_with_odd_unicode_and_garbage_lines(rows, garbage):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.jsonl"
        lines = [json.dumps(r, ensure_ascii=False) for r in rows] + [garbage]
        path.write_text("\n".join(lines), encoding="utf-8")
        try:
            recs = read_records(path)
        except DataError as e:
            assert f"{path}:" in str(e)
            return
        for rec in recs:
            try:
                parse_preference(rec)
            except DataError as e:
                assert str(e).startswith(rec.where)


config_trees = st.dictionaries(
    st.sampled_from(
        ["model", "data", "train", "log", "ppo", "rollout", "run", "bogus", "reward_fn"]
    ),
    st.dictionaries(
        st.sampled_from(
            [
                "lr",
                "epochs",
                "name_or_path",
                "schedule",
                "enabled",
                "x",
                "clip_eps",
                "estimator",
                "max_length",
            ]
        ),
        json_values,
        max_size=3,
    )
    | json_values,
    max_size=4,
)


@FUZZ
@given(config_trees, st.sampled_from([SFTConfig, PPOConfig]))
def test_config_loader_gives_config_errors_only(tree, cls):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(yaml.safe_dump(tree))
        try:
            cfg = load_config(cls, path)
        except ConfigError as e:
            assert str(e).startswith(f"{path}: ")
            return
        assert isinstance(cfg, cls)


@FUZZ
@given(st.text(max_size=60))
def test_config_overrides_from_the_command_line(text):
    try:
        cfg = load_config(SFTConfig, None, [text])
    except ConfigError as e:
        assert str(e)  # a message, never another exception type
        return
    assert isinstance(cfg, SFTConfig)
