"""``rlhfkit sft`` and ``rlhfkit rm``: their schemas and checks."""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.config.common import (
    DataConfig,
    LogConfig,
    ModelConfig,
    TrainConfig,
    check_parallel,
    check_unused_data,
)
from rlhfkit.config.load import knob, sub


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
