"""The stages that fit a model on a data set: ``rlhfkit sft``, ``rlhfkit rm`` and ``rlhfkit dpo``,
each schema with its own checks (they share ``model``, ``data``, ``train`` and ``log``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhfkit.config.common import (
    DataConfig,
    LogConfig,
    ModelConfig,
    TrainConfig,
    check_parallel,
    check_unused_data,
)
from rlhfkit.config.load import ConfigError, knob, sub


@dataclass(frozen=True)
class SFTConfig:
    model: ModelConfig = sub(ModelConfig, "the pretrained model to fine-tune")
    data: DataConfig = sub(DataConfig, "instruction data: {prompt, completion} or {messages}")
    train: TrainConfig = sub(TrainConfig)
    log: LogConfig = sub(LogConfig)

    def validate(self, prefix: str = "") -> None:
        check_parallel(self.model, self.train.parallel, f"{prefix}train.parallel")


@dataclass(frozen=True)
class RMConfig:
    model: ModelConfig = sub(ModelConfig, "the SFT checkpoint the reward model starts from")
    data: DataConfig = sub(DataConfig, "preferences {prompt, chosen, rejected} or ranked lists")
    train: TrainConfig = sub(TrainConfig)
    log: LogConfig = sub(LogConfig)
    use_margin: bool = knob(
        True, "subtract the data's `margin` field inside the BT loss when present"
    )
    norm_examples: int = knob(
        256,
        "responses of this many train examples scored after training to store the reward mean/std (0 = all)",
        lo=0,
    )

    def validate(self, prefix: str = "") -> None:
        check_parallel(self.model, self.train.parallel, f"{prefix}train.parallel")
        check_unused_data(self.data, ("train_on_prompt",), "rm", prefix)


@dataclass(frozen=True)
class DPOAlgoConfig:
    beta: float = knob(
        0.1,
        "KL strength: implicit reward = beta (log pi - log ref); for loss=ipo this slot is IPO's "
        "tau (the target margin is 1 / (2 tau))",
        lo=0,
        lo_open=True,
    )
    loss: Literal["sigmoid", "cdpo", "ipo"] = knob(
        "sigmoid", "sigmoid = DPO (Rafailov 2023), cdpo = DPO with label smoothing, ipo = IPO"
    )
    label_smoothing: float = knob(
        0.0, "cdpo: assumed probability that a preference label is flipped", lo=0, hi=0.5
    )


@dataclass(frozen=True)
class DPOConfig:
    model: ModelConfig = sub(ModelConfig, "the SFT checkpoint: the policy and the frozen reference")
    data: DataConfig = sub(DataConfig, "preferences {prompt, chosen, rejected} or ranked lists")
    train: TrainConfig = sub(TrainConfig)
    log: LogConfig = sub(LogConfig)
    dpo: DPOAlgoConfig = sub(DPOAlgoConfig, "the preference loss")

    def validate(self, prefix: str = "") -> None:
        check_parallel(self.model, self.train.parallel, f"{prefix}train.parallel")
        check_unused_data(self.data, ("train_on_prompt", "packing"), "dpo", prefix)
        if self.dpo.label_smoothing and self.dpo.loss != "cdpo":
            raise ConfigError(
                f"{prefix}dpo.label_smoothing: only used by dpo.loss: cdpo (it is '{self.dpo.loss}')"
            )
