"""The only place that loads and saves Hugging Face models and tokenizers, split by concern:

- ``loading``:  tokenizers, policies and scalar models (RM, critic) from HF directories or hub ids
- ``adapters``: forward adapters around them (``PerTokenScalar``, ``LabelledLogprobs``,
  ``ActorCritic``, ``PromptSharingScorer``)
- ``io``:       plain HF directories, LoRA adapters, the value head, reward statistics

Policies are ``AutoModelForCausalLM``; reward models and critics are
``AutoModelForSequenceClassification`` with ``num_labels=1`` (backbone + linear ``score`` head),
so every checkpoint we write loads with plain transformers ``from_pretrained``.
"""

from rlhfkit.models.adapters import (
    ActorCritic,
    LabelledLogprobs,
    PerTokenScalar,
    PromptSharingScorer,
    logit_transform,
)
from rlhfkit.models.io import (
    REWARD_STATS_FILE,
    VALUE_HEAD_FILE,
    export_model,
    export_shared_critic,
    is_peft,
    load_value_head,
    read_reward_stats,
    restore_adapter,
    save_reward_stats,
    save_value_head,
    shared_state,
    write_trainable,
)
from rlhfkit.models.loading import (
    DTYPES,
    PAD_TOKEN,
    autocast,
    backbone,
    check_source,
    device_of,
    disable_dropout,
    init_scalar_head,
    load_policy,
    load_scalar_model,
    load_tokenizer,
    resolve_device,
    scalar_head,
)

__all__ = [
    "DTYPES",
    "PAD_TOKEN",
    "REWARD_STATS_FILE",
    "VALUE_HEAD_FILE",
    "ActorCritic",
    "autocast",
    "LabelledLogprobs",
    "PerTokenScalar",
    "PromptSharingScorer",
    "backbone",
    "check_source",
    "device_of",
    "disable_dropout",
    "export_model",
    "export_shared_critic",
    "init_scalar_head",
    "is_peft",
    "load_policy",
    "load_scalar_model",
    "load_tokenizer",
    "load_value_head",
    "logit_transform",
    "read_reward_stats",
    "resolve_device",
    "restore_adapter",
    "save_reward_stats",
    "save_value_head",
    "scalar_head",
    "shared_state",
    "write_trainable",
]
