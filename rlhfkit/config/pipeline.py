"""``rlhfkit pipeline``: SFT -> RM -> PPO (and/or DPO) -> evaluation in one config, and the
generated config reference (docs/config.md)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.config.eval import EvalConfig, EvalRunConfig
from rlhfkit.config.load import ConfigError, help_text, knob, sub
from rlhfkit.config.ppo import PPOConfig
from rlhfkit.config.supervised import DPOConfig, RMConfig, SFTConfig


@dataclass(frozen=True)
class PipelineConfig:
    base_model: str = knob(
        "", "pretrained model (hub id or dir); sft.model.name_or_path overrides it"
    )
    output_dir: str = knob("runs/pipeline", "stages write to output_dir/{sft,rm,ppo,eval}")
    sft: SFTConfig = sub(SFTConfig, "stage 1; model and output_dir are filled in by the pipeline")
    rm: RMConfig = sub(RMConfig, "stage 2; starts from the SFT output")
    ppo: PPOConfig = sub(
        PPOConfig, "stage 3; actor/critic/reference from SFT, reward model from RM"
    )
    methods: list[str] = knob(
        ["ppo"],
        "what follows SFT: ppo (RM -> PPO), dpo (DPO on the RM's preference data), or both; the "
        "evaluation compares every policy trained",
    )
    dpo: DPOConfig = sub(DPOConfig, "the DPO stage; starts from the SFT output, data from rm.data")
    eval: EvalConfig = sub(EvalConfig, "stage 4: SFT vs PPO (and DPO) policies on held-out prompts")

    def validate(self, prefix: str = "") -> None:
        bad = [m for m in self.methods if m not in ("ppo", "dpo")] or (
            [] if self.methods else ["(empty)"]
        )
        if bad:
            raise ConfigError(f"{prefix}methods: {bad} not in ['ppo', 'dpo']")


def reference_markdown() -> str:
    """docs/config.md: every key of every command (a test keeps the file in sync with the code)."""
    parts = [
        "# Config reference\n",
        "Generated from the config dataclasses (`rlhfkit <command> --help-config`",
        "prints the same). Set keys in YAML, or override them: `key.sub=value`.\n",
    ]
    for name, cls in (
        ("sft", SFTConfig),
        ("rm", RMConfig),
        ("ppo", PPOConfig),
        ("dpo", DPOConfig),
        ("eval", EvalRunConfig),
        ("pipeline", PipelineConfig),
    ):
        parts += [f"## `rlhfkit {name}`\n", "```", help_text(cls), "```\n"]
    return "\n".join(parts)
