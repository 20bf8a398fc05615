"""Typed run configs: dataclass defaults <- YAML file <- ``key.sub=value`` overrides.

Every knob carries its help text (``rlhfkit <stage> --help-config`` prints them) and, where it
has one, its valid range. Loading fails with a ``ConfigError`` that names the key; configs are
never written to afterwards.

    load.py      the loader: YAML, overrides, coercion, errors, help text, ``module:fn`` imports
    common.py    the schemas several stages share (model, data, train/run knobs, rollout, env)
    supervised.py  ``rlhfkit sft``, ``rlhfkit rm`` and ``rlhfkit dpo`` (fit on a data set)
    ppo.py       ``rlhfkit ppo`` with its cross-field checks
    eval.py      ``rlhfkit eval``
    pipeline.py  ``rlhfkit pipeline`` and the generated reference (docs/config.md)
"""

from rlhfkit.config.common import (
    DataConfig,
    EnvConfig,
    LogConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RewardKeys,
    RewardSourceConfig,
    RolloutConfig,
    RunConfig,
    TrainConfig,
    check_parallel,
    check_unused_data,
)
from rlhfkit.config.eval import EvalConfig, EvalRunConfig
from rlhfkit.config.load import (
    ConfigError,
    from_dict,
    help_text,
    knob,
    load_callable,
    load_config,
    parse_overrides,
    read_yaml,
    sub,
    to_dict,
)
from rlhfkit.config.pipeline import PipelineConfig, reference_markdown
from rlhfkit.config.ppo import PPOAlgoConfig, PPOConfig, RLEvalConfig
from rlhfkit.config.supervised import DPOAlgoConfig, DPOConfig, RMConfig, SFTConfig

__all__ = [
    "ConfigError",
    "DPOAlgoConfig",
    "DPOConfig",
    "DataConfig",
    "EnvConfig",
    "EvalConfig",
    "EvalRunConfig",
    "LogConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "PPOAlgoConfig",
    "PPOConfig",
    "PipelineConfig",
    "RLEvalConfig",
    "RMConfig",
    "RewardKeys",
    "RewardSourceConfig",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "TrainConfig",
    "check_parallel",
    "check_unused_data",
    "from_dict",
    "help_text",
    "knob",
    "load_callable",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "reference_markdown",
    "sub",
    "to_dict",
]
