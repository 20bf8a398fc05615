"""Reading, validating, templating, tokenising and collating users' data."""

from rlhfkit.data.formats import (
    PreferenceExample,
    PromptExample,
    RankedExample,
    SFTExample,
    parse_preference,
    parse_prompt,
    parse_ranked,
    parse_sft,
)
from rlhfkit.data.readers import DataError, Record, read_records

__all__ = [
    "DataError",
    "PreferenceExample",
    "PromptExample",
    "RankedExample",
    "Record",
    "SFTExample",
    "parse_preference",
    "parse_prompt",
    "parse_ranked",
    "parse_sft",
    "read_records",
]
