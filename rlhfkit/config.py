"""Typed run configs: dataclass defaults <- YAML file <- ``key.sub=value`` overrides.

Every knob carries its help text (``rlhfkit <stage> --help-config`` prints them) and, where it
has one, its valid range. Loading fails with a ``ConfigError`` that names the key; configs are
never written to afterwards.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key is unknown, or its value has the wrong type or range."""


def knob(
    default: Any,
    help: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
):
    """A config field with help text and an optional range [lo, hi] (or (lo, hi] with lo_open)."""
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def sub(cls: type, help: str = ""):
    return field(default_factory=cls, metadata={"help": help})


# --------------------------------------------------------------------------- shared pieces


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = knob(False, "train LoRA adapters (peft) instead of all weights")
    r: int = knob(8, "LoRA rank", lo=1)
    alpha: float = knob(16.0, "LoRA scaling alpha", lo=0, lo_open=True)
    dropout: float = knob(
        0.0, "LoRA dropout (kept 0 so rollout and update logprobs agree)", lo=0, hi=1
    )
    target_modules: list[str] = knob(
        ["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get adapters"
    )


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = knob("", "HF hub id or local directory of the pretrained causal LM")
    tokenizer: str = knob("", "tokenizer id/path; empty = same as name_or_path")
    gguf_file: str = knob("", "load this GGUF file inside name_or_path (dequantized)")
    dtype: Literal["fp32", "bf16"] = knob(
        "fp32", "weights/compute dtype; fp32 is the exact default"
    )
    gradient_checkpointing: bool = knob(False, "recompute activations in backward to save memory")
    trust_remote_code: bool = knob(
        False, "allow model repos to run their own Python code (off: security)"
    )
    lora: LoraConfig = sub(LoraConfig, "LoRA adapters")


@dataclass(frozen=True)
class DataConfig:
    train_file: str = knob(
        "", "JSONL/JSON/Parquet/CSV file, a saved HF dataset dir, or a hub dataset name"
    )
    eval_file: str = knob(
        "", "held-out file in the same format; empty = split eval_fraction off train"
    )
    eval_fraction: float = knob(
        0.0, "share of train held out for evaluation when eval_file is empty", lo=0, hi=0.9
    )
    split: str = knob("train", "split to read from an HF dataset")
    max_length: int = knob(512, "max tokens of prompt + completion", lo=2)
    max_prompt_length: int = knob(256, "max prompt tokens (prompts are cut from the left)", lo=1)
    overlong: Literal["truncate", "drop"] = knob(
        "truncate", "what to do with examples over max_length"
    )
    on_error: Literal["raise", "skip"] = knob(
        "raise", "bad records: stop with an error, or skip and count"
    )
    train_on_prompt: bool = knob(
        False, "SFT: put loss on prompt tokens too (default: completion only)"
    )


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = knob("runs/out", "run directory: checkpoints, logs, final model")
    seed: int = knob(0, "seed for init, shuffling and sampling")
    epochs: int = knob(1, "passes over the training data", lo=1)
    max_steps: int = knob(0, "stop after this many optimizer steps (0 = run all epochs)", lo=0)
    batch_size: int = knob(8, "examples per micro-batch", lo=1)
    grad_accum_steps: int = knob(1, "micro-batches per optimizer step", lo=1)
    lr: float = knob(1e-5, "peak learning rate (AdamW)", lo=0, lo_open=True)
    weight_decay: float = knob(0.0, "AdamW weight decay", lo=0)
    adam_beta1: float = knob(0.9, "AdamW beta1", lo=0, hi=1)
    adam_beta2: float = knob(0.999, "AdamW beta2", lo=0, hi=1)
    warmup_steps: int = knob(0, "linear warm-up steps", lo=0)
    schedule: Literal["cosine", "linear", "constant"] = knob("cosine", "LR decay after warm-up")
    max_grad_norm: float = knob(1.0, "clip the global grad norm to this (0 = no clipping)", lo=0)
    eval_every: int = knob(0, "evaluate every N optimizer steps (0 = only at the end)", lo=0)
    save_every: int = knob(0, "checkpoint every N optimizer steps (0 = only at the end)", lo=0)
    log_every: int = knob(10, "log train metrics every N optimizer steps", lo=1)
    keep_last: int = knob(2, "checkpoints to keep", lo=1)
    resume: bool = knob(True, "continue from the newest checkpoint in output_dir if there is one")
    num_threads: int = knob(0, "torch CPU threads (0 = torch's default)", lo=0)


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = knob(True, "write TensorBoard event files under output_dir/tb")
    wandb: bool = knob(False, "also log to Weights & Biases (needs `pip install wandb`)")
    wandb_project: str = knob("rlhfkit", "W&B project name")
    progress: bool = knob(True, "show a progress bar")


# --------------------------------------------------------------------------- stage configs


@dataclass(frozen=True)
class SFTConfig:
    model: ModelConfig = sub(ModelConfig, "the pretrained model to fine-tune")
    data: DataConfig = sub(DataConfig, "instruction data: {prompt, completion} or {messages}")
    train: TrainConfig = sub(TrainConfig)
    log: LogConfig = sub(LogConfig)


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


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # from a command-line override: a,b,c
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of sub-keys, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")


def _check_range(f: dataclasses.Field, value: Any, key: str) -> None:
    lo, hi, lo_open = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("lo_open")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{key}: {value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} must be <= {hi}")


def _build(cls: type, data: dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            close = difflib.get_close_matches(str(k), fields, n=1)
            hint = (
                f"; did you mean '{prefix}{close[0]}'?"
                if close
                else f"; valid keys: {sorted(fields)}"
            )
            raise ConfigError(f"unknown config key '{prefix}{k}'{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        value = _coerce(data[name], hints[name], prefix + name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_range(f, value, prefix + name)
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(prefix)
    return obj


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-5", "model.lora.enabled=true"]`` -> nested dict (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file with yaml.safe_load (no tags, so a config cannot execute code)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not valid UTF-8 (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """defaults <- YAML file <- overrides; raises ConfigError naming the key (and the file)."""
    tree = read_yaml(path) if path else {}
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        return _build(cls, tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def from_dict(cls: type, data: dict[str, Any]):
    """Rebuild a config saved with ``to_dict`` (validated the same way)."""
    return _build(cls, data)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def help_text(cls: type, prefix: str = "") -> str:
    """One line per knob: key, type, default, help (the config reference in the README comes from this)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(help_text(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{key:<34} {_type_name(tp):<26} {default!r:<12} {f.metadata.get('help', '')}")
    return "\n".join(lines)
