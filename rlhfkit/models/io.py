"""Writing and reading what training produces: plain HF directories (LoRA merged), LoRA adapters
for exact resume, the shared trunk's value head, and the RM's score statistics. Every directory
written here loads with plain ``from_pretrained``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rlhfkit.models.adapters import ActorCritic

REWARD_STATS_FILE = "reward_stats.json"  # mean/std of the RM's scores on a reference set


VALUE_HEAD_FILE = "value_head.safetensors"


def save_value_head(weight: torch.Tensor, directory: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": weight.detach().contiguous()}, str(Path(directory, VALUE_HEAD_FILE)))


def load_value_head(head: nn.Linear, directory: str | Path) -> None:
    from safetensors.torch import load_file

    path = Path(directory, VALUE_HEAD_FILE)
    if not path.exists():
        raise FileNotFoundError(f"{path}: the shared-trunk checkpoint has no value head")
    with torch.no_grad():
        head.weight.copy_(load_file(str(path))["weight"])


def shared_state(ac: ActorCritic, full: dict | None) -> tuple[dict | None, torch.Tensor | None]:
    """Split ``ActorCritic`` weights (``full``: consolidated, or None = the module's own) into the
    policy's state dict (None = its own) and the value head's weight."""
    if full is None:
        return None, ac.value_head.weight
    if not full:  # a sharded module's full state lives on rank 0 only
        return {}, None
    policy = {k.removeprefix("policy."): v for k, v in full.items() if k.startswith("policy.")}
    return policy, full["value_head.weight"]


def export_shared_critic(
    ac: ActorCritic, tokenizer, directory: str | Path, full: dict | None = None
) -> None:
    """V_phi of a shared trunk as a plain sequence-classification directory (trunk + ``score`` =
    the value head), so it loads with transformers like a separately trained critic."""
    from transformers import AutoModelForSequenceClassification

    policy_sd, head = shared_state(ac, full)
    export_model(ac.policy, tokenizer, directory, policy_sd)  # the trunk (LoRA merged)
    critic = AutoModelForSequenceClassification.from_pretrained(
        directory, num_labels=1, dtype=head.dtype
    )
    with torch.no_grad():
        critic.score.weight.copy_(head)
    critic.save_pretrained(directory, safe_serialization=True)


def save_reward_stats(directory: str | Path, mean: float, std: float, n: int) -> None:
    Path(directory, REWARD_STATS_FILE).write_text(
        json.dumps({"mean": mean, "std": std, "n": n}, indent=2)
    )


def read_reward_stats(directory: str | Path) -> dict[str, float] | None:
    p = Path(directory, REWARD_STATS_FILE)
    return json.loads(p.read_text()) if p.exists() else None


def export_model(model, tokenizer, directory: str | Path, state_dict: dict | None = None) -> None:
    """Write a plain HF directory (safetensors + config + tokenizer). LoRA adapters are merged into
    a copy first so that the directory loads without peft. ``state_dict``: the consolidated
    weights of a sharded (FSDP) model, from ``dist.full_state_dict``."""
    if hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(directory)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def write_trainable(model, tokenizer, directory: Path, state_dict: dict | None = None) -> None:
    """Checkpoint a trained model: a plain HF dir under model/, and the LoRA adapter (for exact
    resume of adapter training) under adapter/."""
    export_model(model, tokenizer, directory / "model", state_dict)
    if is_peft(model):
        model.save_pretrained(directory / "adapter", safe_serialization=True)


def restore_adapter(model, checkpoint: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(
        model, load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    )
