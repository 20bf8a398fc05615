"""``rlhfkit eval``: held-out evaluation of policies, its schema and checks."""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.config.common import DataConfig, RewardKeys, RolloutConfig
from rlhfkit.config.load import ConfigError, knob, sub


@dataclass(frozen=True)
class EvalConfig:
    prompts_file: str = knob("", "held-out prompts {prompt}, never trained on (required)")
    max_prompts: int = knob(128, "prompts evaluated", lo=1)
    judge: str = knob(
        "", "optional independent judge 'module:function(prompts, responses) -> scores'"
    )
    samples_in_report: int = knob(8, "sample responses shown per policy", lo=0)
    samples_per_prompt: int = knob(
        1,
        "n responses per prompt; with a reward source (a checker such as "
        "rlhfkit.rewards.verify:math) n > 1 reports the unbiased pass@k for k = 1, 2, 4, ... n "
        "and mean@n (Chen et al. 2021)",
        lo=1,
    )
    pass_score: float = knob(1.0, "a sample passes when its reward is >= this (pass@k)")


@dataclass(frozen=True)
class EvalRunConfig(RewardKeys):
    policy: str = knob("", "the policy to evaluate: a model directory or hub id")
    reference: str = knob(
        "",
        "the reference policy (usually the SFT checkpoint): KL to it, and its own samples for the win rate",
    )
    output_dir: str = knob("runs/eval", "writes eval.json and eval.html here")
    seed: int = knob(0, "sampling seed (the same for every policy)")
    eval: EvalConfig = sub(EvalConfig, "held-out prompts, judge and report")
    max_prompt_length: int = knob(256, "max prompt tokens (prompts are cut from the left)", lo=1)
    max_new_tokens: int = knob(32, "response length limit", lo=1)
    temperature: float = knob(1.0, "sampling temperature", lo=0, lo_open=True)
    top_k: int = knob(0, "sample from the k most likely tokens (0 = off)", lo=0)
    top_p: float = knob(1.0, "nucleus sampling mass (1 = off)", lo=0, hi=1, lo_open=True)
    max_turns: int = knob(
        1, "with an env: model turns per episode at most (max_new_tokens is per turn)", lo=1
    )
    max_total_tokens: int = knob(
        256, "with an env: tokens of a whole episode after its prompt (model and env turns)", lo=1
    )

    def validate(self, prefix: str = "") -> None:
        self.check_reward_keys(prefix)
        if self.max_turns != 1 and not self.env.enabled:
            raise ConfigError(f"{prefix}max_turns: more than one turn needs {prefix}env")

    def sampling(self) -> tuple[DataConfig, RolloutConfig]:
        """The prompt-reading and sampling settings in the form the rollout code takes."""
        data = DataConfig(max_prompt_length=self.max_prompt_length)
        rollout = RolloutConfig(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
        )
        return data, rollout
