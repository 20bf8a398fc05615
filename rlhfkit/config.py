"""Typed run configs: dataclass defaults <- YAML file <- ``key.sub=value`` overrides.

Every knob carries its help text (``rlhfkit <stage> --help-config`` prints them) and, where it
has one, its valid range. Loading fails with a ``ConfigError`` that names the key; configs are
never written to afterwards.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
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
    device: str = knob("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    dtype: Literal["fp32", "bf16", "bf16-mixed"] = knob(
        "fp32",
        "fp32 (the exact default); bf16 (weights, compute and AdamW state in bf16); bf16-mixed "
        "(fp32 master weights and AdamW state, forwards and backwards under bf16 autocast, "
        "logprobs and losses in fp32: what GPU users want, docs/decisions.md)",
    )
    gradient_checkpointing: bool = knob(False, "recompute activations in backward to save memory")
    cpu_gemm: Literal["onednn", "torch"] = knob(
        "onednn",
        "fp32 linear layers on the CPU: oneDNN's matmul (2-3x MKL's sgemm on the AMD EPYCs "
        "measured, forward and backward; benchmarks/cpu_gemm.py) or torch's own (MKL); equal up "
        "to fp32 rounding. Other dtypes and devices always use torch's",
    )
    cpu_blocks: Literal["fused", "hf"] = knob(
        "fused",
        "fp32 CPU training of Llama-family models: fused RMSNorm and SwiGLU-MLP blocks that keep "
        "fewer activations for backward (a SmolLM2 update in micro-batches of 16: peak RSS -2.6 GB; "
        "models.cpu_fused), forward bit-identical to HF's, gradients equal up to fp32 rounding; "
        "or HF's own modules. Other dtypes, devices and adapters always use HF's",
    )
    allow_pickle: bool = knob(
        False, "allow loading .bin (pickle) weights; off: safetensors only (security)"
    )
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
    packing: bool = knob(
        False,
        "SFT/RM: padding-free batches, several examples per row of at most max_length tokens "
        "(position ids restart per example, attention stays within it; loss and gradients equal "
        "the padded batch's)",
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
    max_bad_steps: int = knob(3, "abort after this many non-finite (skipped) steps in a row", lo=1)
    parallel: Literal["ddp", "fsdp"] = knob(
        "ddp",
        "under torchrun: DDP (every rank holds all weights) or FSDP2 fully_shard (weights, "
        "gradients and optimizer state split across ranks per transformer block)",
    )


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = knob(True, "write TensorBoard event files under output_dir/tb")
    wandb: bool = knob(False, "also log to Weights & Biases (needs `pip install wandb`)")
    wandb_project: str = knob("rlhfkit", "W&B project name")
    progress: bool = knob(True, "show a progress bar")


# --------------------------------------------------------------------------- stage configs


def check_unused_data(data: DataConfig, keys: tuple[str, ...], stage: str, prefix: str) -> None:
    """A data key this stage does not read is an error when set, never silently ignored."""
    default = DataConfig()
    for k in keys:
        if getattr(data, k) != getattr(default, k):
            raise ConfigError(
                f"{prefix}data.{k}: `rlhfkit {stage}` does not use this key; remove it "
                "(docs/config.md says which stage reads which key)"
            )


def check_parallel(model: ModelConfig, parallel: str, key: str) -> None:
    if parallel == "fsdp" and model.lora.enabled:
        raise ConfigError(
            f"{key}: 'fsdp' with model.lora.enabled is not supported; LoRA adapters are small, "
            "use 'ddp' (docs/distributed.md)"
        )


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


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
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
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
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
        raw = data[name]
        shorthand = getattr(hints[name], "SHORTHAND", None)  # `env: m:f` = `env.factory: m:f`
        if isinstance(raw, dict) and _SHORT in raw:
            if not shorthand:
                raise ConfigError(f"'{prefix}{name}' is not a section; it cannot have sub-keys")
            raw = {shorthand: raw[_SHORT], **{k: v for k, v in raw.items() if k != _SHORT}}
        if shorthand and isinstance(raw, str):
            raw = {shorthand: raw}
        if dataclasses.is_dataclass(f.default) and isinstance(raw, dict):
            raw = _merge(dataclasses.asdict(f.default), raw)  # a section's own defaults (critic.lr)
        if raw is None:
            raw = _unset(f, hints[name], prefix + name)
        value = _coerce(raw, hints[name], prefix + name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_range(f, value, prefix + name)
        kwargs[name] = value
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(prefix)
    return obj


def _unset(f: dataclasses.Field, tp: Any, key: str) -> Any:
    """``key=null`` (YAML's null, or ``null`` / ``~`` on the command line): the key unset, for
    keys whose unset value is their empty default (``reward_model=null`` undoes a preset's RM)
    or None. Any other key needs a value, and the error says which one it has by default."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    if type(None) in args:
        return None
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if default in ("", []):
        return default
    raise ConfigError(
        f"{key}: null unsets only keys that can be empty; this one needs a value "
        f"(its default is {default!r})"
    )


_SHORT = "__shorthand__"  # a section given as one value (``EnvConfig.SHORTHAND``) plus sub-keys


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):  # `env=m:f env.timeout=5`: a section's shorthand value
            nxt = node[p] = {_SHORT: nxt}
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-5", "model.lora.enabled=true"]`` -> nested dict (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = (
                raw  # not a YAML scalar: keep the text; the type check names the key if it is wrong
            )
        if not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"override {item!r}: empty key")
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and k in out and not isinstance(out[k], dict):
            out[k] = {_SHORT: out[k]}  # a shorthand value, then keys of its section
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
            lines.append(help_text(tp, key + "."))  # nested defaults shown from the class
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{key:<34} {_type_name(tp):<26} {default!r:<12} {f.metadata.get('help', '')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- PPO


@dataclass(frozen=True)
class RolloutConfig:
    episodes_per_iteration: int = knob(
        64, "episodes collected into the experience buffer per iteration", lo=1
    )
    samples_per_prompt: int = knob(
        1,
        "responses sampled per prompt (n); the n responses form a group (GRPO, RLOO and "
        "REINFORCE++-baseline need n >= 2)",
        lo=1,
    )
    chunk_size: int = knob(32, "episodes generated (and scored) at once; size it to memory", lo=1)
    max_new_tokens: int = knob(32, "response length limit; longer responses are truncated", lo=1)
    temperature: float = knob(
        1.0, "sampling temperature (logprobs use the same one)", lo=0, lo_open=True
    )
    top_k: int = knob(0, "sample from the k most likely tokens (0 = off)", lo=0)
    top_p: float = knob(1.0, "nucleus sampling mass (1 = off)", lo=0, hi=1, lo_open=True)
    stop_strings: list[str] = knob([], "extra strings that end a response (besides EOS)")
    ignore_eos: bool = knob(
        False, "never stop at EOS: every response is max_new_tokens (benchmarks)"
    )
    missing_eos_penalty: float = knob(
        0.0, "subtracted from the score of responses cut at max_new_tokens", lo=0
    )
    compile: bool = knob(
        False,
        "run the decode step through torch.compile with a static KV cache (a one-off compile of "
        "~20 s per shape; CUDA graphs on a GPU). On CPU the compiled step keeps torch's MKL "
        "linears and is slower than the eager step on oneDNN (model.cpu_gemm): 18.8 vs 13.0 "
        "ms/step measured on the tiny benchmark model; off = eager HF forward",
    )
    old_logprobs: Literal["auto", "sampling", "recompute"] = knob(
        "auto",
        "log pi_old: the sampler's own logits (saves the actor's scoring forward; equal to a "
        "forward to ~1e-6 in fp32), a training-layout forward (needed in bf16, whose logprobs "
        "depend on the layout), or auto = sampling in fp32, recompute otherwise",
    )
    filter_groups: bool = knob(
        False,
        "DAPO dynamic sampling (Yu et al. 2025, sec. 3.2): drop groups whose scores are all "
        "equal (no signal for a group baseline) and sample more prompts until the batch is full "
        "or max_sampling_rounds is reached; needs samples_per_prompt >= 2",
    )
    max_sampling_rounds: int = knob(
        3,
        "filter_groups: rounds of episodes_per_iteration episodes at most; a batch still short "
        "after them is filled with filtered groups (logged as rollout/filled)",
        lo=1,
    )
    max_turns: int = knob(
        1, "with an env: model turns per episode at most (max_new_tokens is per turn)", lo=1
    )
    max_total_tokens: int = knob(
        256,
        "with an env: tokens of a whole episode after its prompt (model and env turns); an "
        "episode that would pass it is truncated and counted (env/truncated)",
        lo=1,
    )


@dataclass(frozen=True)
class PPOAlgoConfig:
    epochs: int = knob(4, "PPO epochs over each experience buffer", lo=1)
    minibatch_size: int = knob(16, "episodes per optimizer step", lo=1)
    micro_batch_size: int = knob(16, "episodes per forward/backward (gradient accumulation)", lo=1)
    clip_eps: float = knob(
        0.2, "policy ratio clip epsilon (the lower one with clip_eps_high)", lo=0, lo_open=True
    )
    clip_eps_high: float | None = knob(
        None, "upper ratio clip epsilon (DAPO clip-higher); empty = clip_eps", lo=0, lo_open=True
    )
    dual_clip: float = knob(
        0.0,
        "dual clip c > 1: a negative advantage's loss is at most -c A (Ye et al. 2020); 0 = off",
        lo=0,
    )
    value_clip_eps: float = knob(
        0.2, "value clip around the rollout values (0 = unclipped MSE)", lo=0
    )
    estimator: str = knob(
        "gae",
        "advantage estimator, a name in algos.ESTIMATORS: the seed's td, mc, gae (with a critic), "
        "or the critic-free grpo, dr_grpo, rloo, reinforce++, reinforce++_baseline "
        "(docs/algorithms.md)",
    )
    gamma: float = knob(1.0, "discount", lo=0, hi=1)
    lam: float = knob(0.95, "GAE lambda", lo=0, hi=1)
    kl_coef: float = knob(0.05, "beta in r_t = -beta * KL_t (initial value when adaptive)", lo=0)
    kl_estimator: Literal["k1", "k2", "k3"] = knob("k1", "per-token KL estimator (Schulman)")
    kl_in: Literal["reward", "loss"] = knob(
        "reward",
        "where the KL penalty goes: into the rewards (r_t = -beta KL_t, the seed) or into the "
        "policy loss (+ beta KL_t, as GRPO does with k3)",
    )
    adaptive_kl: bool = knob(False, "adapt beta towards kl_target (Ziegler et al. 2019)")
    kl_target: float = knob(
        6.0, "target per-sequence KL for the adaptive controller", lo=0, lo_open=True
    )
    kl_horizon: float = knob(10000.0, "adaptive controller horizon, in episodes", lo=1)
    ent_coef: float = knob(0.0, "entropy bonus coefficient", lo=0)
    vf_coef: float = knob(0.5, "value loss coefficient", lo=0)
    whiten_advantages: bool = knob(
        True,
        "normalise td/mc/gae advantages to mean 0, std 1 over the buffer (the critic-free "
        "estimators follow their papers: reinforce++ always whitens, the group ones never)",
    )
    reward_norm: Literal["none", "rm_stats", "running"] = knob(
        "rm_stats",
        "normalise scores: RM's stored mean/std (falls back to running), running stats, or none",
    )
    reward_clip: float = knob(0.0, "clip normalised scores to [-c, c] (0 = off)", lo=0)
    aggregation: Literal["auto", "token", "sequence", "token_sum_norm"] = knob(
        "auto",
        "loss average over tokens, over sequences, or token sum / (max_new_tokens x sequences) "
        "(Dr. GRPO's length-unbiased form; with an env, max_total_tokens x sequences); auto = "
        "the policy loss's paper: sequence for gspo (each response weighs 1/G), token otherwise",
    )
    critic_warmup_iterations: int = knob(0, "iterations that update only the critic, first", lo=0)
    policy_loss: Literal["ppo", "gspo", "cispo"] = knob(
        "ppo",
        "ppo = the clipped surrogate (clip_eps, clip_eps_high, dual_clip); gspo = GSPO's "
        "sequence-level ratio clipped with gspo_clip_eps(_high) (Zheng et al. 2025); cispo = "
        "CISPO's clipped stop-gradient IS weight times log pi (MiniMax-M1 2025)",
    )
    gspo_clip_eps: float = knob(
        3e-4,
        "gspo: lower clip epsilon of the sequence ratio (the paper's 3e-4)",
        lo=0,
        lo_open=True,
    )
    gspo_clip_eps_high: float = knob(
        4e-4,
        "gspo: upper clip epsilon of the sequence ratio (the paper's 4e-4)",
        lo=0,
        lo_open=True,
    )
    cispo_clip_eps_high: float = knob(
        4.0,
        "cispo: the IS weight is capped at 1 + this (no lower bound, as MiniMax-M1; 4 caps it at "
        "5, TRL's and ScaleRL's choice)",
        lo=0,
        lo_open=True,
    )
    overlong_buffer: int = knob(
        0,
        "DAPO overlong reward shaping (eq. 13): responses longer than max_new_tokens - this get a "
        "linear penalty reaching -overlong_penalty at max_new_tokens (0 = off)",
        lo=0,
    )
    overlong_penalty: float = knob(1.0, "overlong_buffer: the penalty at max_new_tokens", lo=0)
    rollout_correction: Literal["none", "tis", "mis"] = knob(
        "none",
        "correct for the sampler's logprobs differing from the trainer's (bf16, compiled or "
        "external decoders): tis = per-token weight min(pi_old / pi_sampler, cap) (truncated IS); "
        "mis = per-sequence weight prod_t pi_old / pi_sampler, responses above cap masked out",
    )
    rollout_correction_cap: float = knob(
        2.0, "rollout_correction: the cap C of the weight (> 1)", lo=1, lo_open=True
    )

    def loss_aggregation(self) -> str:
        """``aggregation`` with ``auto`` resolved: GSPO's objective is (1/G) sum_i of a
        response's mean (Zheng et al. 2025, eq. 5), so each response weighs the same whatever
        its length; the clipped surrogate and CISPO average over tokens (DAPO, MiniMax-M1)."""
        if self.aggregation != "auto":
            return self.aggregation
        return "sequence" if self.policy_loss == "gspo" else "token"


@dataclass(frozen=True)
class OptimConfig:
    lr: float = knob(1e-6, "learning rate", lo=0, lo_open=True)
    weight_decay: float = knob(0.0, "AdamW weight decay", lo=0)
    max_grad_norm: float = knob(1.0, "grad norm clip (0 = off)", lo=0)
    warmup_iterations: int = knob(0, "linear LR warm-up, in iterations", lo=0)


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = knob("runs/ppo", "run directory: checkpoints, logs, final actor and critic")
    seed: int = knob(0, "seed for prompt order, sampling and updates")
    iterations: int = knob(20, "rollout + update iterations", lo=1)
    save_every: int = knob(0, "checkpoint every N iterations (0 = only at the end)", lo=0)
    sample_every: int = knob(5, "log sample generations every N iterations (0 = never)", lo=0)
    keep_last: int = knob(2, "checkpoints to keep", lo=1)
    resume: bool = knob(True, "continue from the newest checkpoint in output_dir if there is one")
    num_threads: int = knob(0, "torch CPU threads (0 = torch's default)", lo=0)
    max_bad_steps: int = knob(
        3, "abort after this many non-finite (skipped) updates in a row", lo=1
    )
    warn_kl: float = knob(50.0, "warn when the mean per-sequence KL exceeds this", lo=0)
    parallel: Literal["ddp", "fsdp"] = knob(
        "ddp",
        "under torchrun: DDP (every rank holds all weights) or FSDP2 fully_shard (weights, "
        "gradients and optimizer state split across ranks per transformer block; the frozen reference and RM are sharded too)",
    )


@dataclass(frozen=True)
class RewardSourceConfig:
    name: str = knob("", "the source's name: its score is logged as score/<name>")
    weight: float = knob(1.0, "the score is sum_i weight_i x score_i")
    model: str = knob("", "an RM directory (its own tokenizer is detected and used)")
    fn: str = knob("", "a Python reward 'module:function(prompts, responses) -> scores'")
    url: str = knob("", "a reward server: POST {prompts, responses} -> {scores} (docs/rewards.md)")
    normalize: Literal["none", "running", "rm_stats"] = knob(
        "none",
        "this source's own normalisation before weighting: none, running mean/std, or the RM's "
        "stored reward_stats.json (model sources only)",
    )

    def validate(self, prefix: str = "") -> None:
        given = [k for k in ("model", "fn", "url") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(
                f"{prefix[:-1]}: set exactly one of model, fn, url (got {given or 'none'})"
            )
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ConfigError(f"{prefix}name: {self.name!r} must be letters, digits and _")
        if self.normalize == "rm_stats" and not self.model:
            raise ConfigError(f"{prefix}normalize: 'rm_stats' needs a model source")


@dataclass(frozen=True)
class EnvConfig:
    """An environment for multi-turn episodes (docs/agents.md). ``env: module:factory`` is
    short for ``env.factory: module:factory``."""

    SHORTHAND = "factory"
    factory: str = knob(
        "",
        "'module:factory': called with no arguments, it returns one environment per episode, "
        "with reset(row) -> prompt and step(text) -> (observation, reward, done)",
    )
    tools: list[str] = knob(
        [],
        "instead of a factory: tool functions ['module:fn', ...]; their JSON schemas (type hints "
        "+ docstring) go to the chat template and the model's calls are run",
    )
    tool_parser: Literal["hermes"] = knob(
        "hermes", "how tool calls are read from the model's text: <tool_call>{json}</tool_call>"
    )
    tool_timeout: float = knob(
        10.0, "seconds a tool call may take; past it the model gets an error", lo=0, lo_open=True
    )
    timeout: float = knob(
        60.0, "seconds an environment's reset or step may take", lo=0, lo_open=True
    )
    on_error: Literal["raise", "skip"] = knob(
        "raise",
        "an env that raises or times out in reset/step: stop with an error naming the env and "
        "the prompt, or drop the episode and count it (env/skipped)",
    )
    threads: int = knob(8, "environment steps run concurrently on this many threads", lo=1)
    max_observation_chars: int = knob(
        2000,
        "an observation message (a tool's output, an env's turn) longer than this is cut to it "
        "and ends in '... [cut N characters]' (counted: env/observations_cut), so that the "
        "model sees it within rollout.max_total_tokens (0 = never cut)",
        lo=0,
    )
    reward_at: Literal["end", "turn"] = knob(
        "end",
        "where the env's step rewards go: end = summed into R_final at the episode's end (the "
        "reward source rlhfkit.envs:env_reward); turn = each at the last token of the model "
        "turn it answers, as a per-token reward (not normalised; env_reward is then 0)",
    )

    def validate(self, prefix: str = "") -> None:
        if self.factory and self.tools:
            raise ConfigError(f"{prefix}factory / {prefix}tools: set only one of them")

    @property
    def enabled(self) -> bool:
        return bool(self.factory or self.tools)


@dataclass(frozen=True)
class RewardKeys:
    """Where R_final comes from (docs/rewards.md): the keys PPO and `rlhfkit eval` share."""

    reward_model: str = knob("", "RM checkpoint directory (from `rlhfkit rm`)")
    reward_fn: str = knob(
        "", "instead of an RM: a Python reward 'module:function(prompts, responses) -> scores'"
    )
    reward_url: str = knob(
        "",
        "instead of an RM: a reward server URL, e.g. http://127.0.0.1:8000/score (docs/rewards.md)",
    )
    reward_batch_size: int = knob(64, "responses per request to a reward server", lo=1)
    reward_concurrency: int = knob(4, "requests in flight at once to a reward server", lo=1)
    reward_timeout: float = knob(
        60.0, "seconds to wait for a reward server's answer", lo=0, lo_open=True
    )
    reward_retries: int = knob(
        3, "retries (exponential backoff) on connection errors, timeouts and 5xx answers", lo=0
    )
    reward_token_env: str = knob(
        "", "name of an environment variable holding a bearer token for the reward server"
    )
    rewards: list[RewardSourceConfig] = knob(
        [],
        "several reward sources, combined as the weighted sum of their scores; each "
        "{name, weight, model | fn | url, normalize}. Instead of reward_model / reward_fn / reward_url",
    )
    env: EnvConfig = sub(
        EnvConfig, "multi-turn episodes with an environment or tools (docs/agents.md)"
    )

    def check_reward_keys(self, prefix: str = "") -> None:
        # "none of them" is checked where a reward is needed: the pipeline fills reward_model in
        singles = [k for k in ("reward_model", "reward_fn", "reward_url") if getattr(self, k)]
        if len(singles) + bool(self.rewards) > 1:
            given = [prefix + k for k in singles] + ([prefix + "rewards"] if self.rewards else [])
            raise ConfigError(f"{' / '.join(given)}: set only one reward source key")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ConfigError(f"{prefix}rewards: names must differ, got {names}")

    def has_reward(self) -> bool:
        """A reward source is set; an environment is one (its rewards, ``rlhfkit.envs:env_reward``)."""
        keys = (self.reward_model, self.reward_fn, self.reward_url, self.rewards, self.env.enabled)
        return any(bool(k) for k in keys)


@dataclass(frozen=True)
class RLEvalConfig:
    every: int = knob(
        0,
        "evaluate on held-out prompts (data.eval_file, or data.eval_fraction of the prompts) every "
        "N iterations and at the end (0 = never)",
        lo=0,
    )
    max_prompts: int = knob(64, "held-out prompts sampled per evaluation", lo=1)
    judge: str = knob(
        "",
        "an independent judge 'module:function(prompts, responses) -> scores' for eval/judge_score "
        "and eval/win_rate (a monitor passed in Python takes its place)",
    )
    keep_best: Literal["judge", "rm", "last"] = knob(
        "last",
        "also keep output_dir/best/, the policy of the evaluation with the highest held-out judge "
        "or RM score (last = only final/)",
    )


@dataclass(frozen=True)
class PPOConfig(RewardKeys):
    model: ModelConfig = sub(ModelConfig, "the SFT checkpoint: actor, critic trunk and reference")
    critic_init: Literal["sft", "rm"] = knob(
        "sft", "critic trunk from SFT (fresh value head) or from the RM"
    )
    shared_trunk: bool = knob(
        False,
        "critic = a value head on the actor's own transformer (one trunk, one forward, one "
        "optimizer with the critic's lr on the head); off = a separate critic model",
    )
    data: DataConfig = sub(DataConfig, "prompts: {prompt}")
    rollout: RolloutConfig = sub(RolloutConfig)
    ppo: PPOAlgoConfig = sub(PPOAlgoConfig)
    actor: OptimConfig = sub(OptimConfig, "actor optimizer")
    critic: OptimConfig = knob(OptimConfig(lr=1e-5), "critic optimizer")
    run: RunConfig = sub(RunConfig)
    log: LogConfig = sub(LogConfig)
    eval: RLEvalConfig = sub(RLEvalConfig, "held-out evaluation during the run")

    def validate(self, prefix: str = "") -> None:
        check_parallel(self.model, self.run.parallel, f"{prefix}run.parallel")
        check_unused_data(self.data, ("max_length", "train_on_prompt", "packing"), "ppo", prefix)
        held_out = self.data.eval_file or self.data.eval_fraction
        if held_out and not self.eval.every:
            raise ConfigError(
                f"{prefix}data.eval_file / eval_fraction: held-out prompts need {prefix}eval.every > 0"
            )
        if self.eval.every and not held_out:
            raise ConfigError(
                f"{prefix}eval.every: set {prefix}data.eval_file (or data.eval_fraction) to the held-out prompts"
            )
        if self.eval.keep_best != "last" and not self.eval.every:
            raise ConfigError(f"{prefix}eval.keep_best: needs {prefix}eval.every > 0")
        if self.rollout.compile and self.run.parallel == "fsdp":
            raise ConfigError(
                f"{prefix}rollout.compile: not supported with {prefix}run.parallel: fsdp "
                "(the compiled decode step is not tested on sharded modules); use one of them"
            )
        self.check_reward_keys(prefix)
        if self.shared_trunk and self.critic_init != "sft":
            raise ConfigError(
                f"{prefix}critic_init: a shared trunk is the actor's own (SFT) transformer; "
                f"'{self.critic_init}' needs {prefix}shared_trunk: false"
            )
        if self.critic_init == "rm" and not self.reward_model:
            raise ConfigError(f"{prefix}critic_init: 'rm' needs {prefix}reward_model")
        self._validate_estimator(prefix)
        self._validate_env(prefix)
        if self.ppo.minibatch_size % self.ppo.micro_batch_size:
            raise ConfigError(
                f"{prefix}ppo.micro_batch_size must divide {prefix}ppo.minibatch_size"
            )
        if self.rollout.episodes_per_iteration % self.ppo.minibatch_size:
            raise ConfigError(
                f"{prefix}ppo.minibatch_size must divide {prefix}rollout.episodes_per_iteration"
            )

    def token_budget(self) -> int:
        """The most tokens one response row can hold: ``max_new_tokens``, or with an
        environment the whole episode's ``max_total_tokens`` (its turns and the env's).
        Dr. GRPO's constant (``aggregation: token_sum_norm``) is sequences x this."""
        rc = self.rollout
        return rc.max_total_tokens if self.env.enabled else rc.max_new_tokens

    def _validate_env(self, prefix: str) -> None:
        """Multi-turn keys without an environment, or settings an episode cannot meet."""
        rc = self.rollout
        if not self.env.enabled:
            if rc.max_turns != 1:
                raise ConfigError(
                    f"{prefix}rollout.max_turns: more than one turn needs an environment "
                    f"({prefix}env.factory or {prefix}env.tools)"
                )
            return
        if rc.max_total_tokens < rc.max_new_tokens:
            raise ConfigError(
                f"{prefix}rollout.max_total_tokens ({rc.max_total_tokens}) must be >= "
                f"{prefix}rollout.max_new_tokens ({rc.max_new_tokens}), the first turn's limit"
            )
        if self.ppo.overlong_buffer:
            raise ConfigError(
                f"{prefix}ppo.overlong_buffer: the overlong penalty is for single responses; an "
                f"episode's length is bounded by {prefix}rollout.max_total_tokens"
            )
        # the environment's turn is appended after the model's end-of-turn token (EOS), as the
        # chat template writes a conversation: a turn that ends another way has none
        if rc.stop_strings:
            raise ConfigError(
                f"{prefix}rollout.stop_strings: a turn that ends on a stop string has no "
                "end-of-turn token before the environment's turn, so the context would no "
                "longer match the chat template; with an env a model turn ends at EOS"
            )
        if rc.ignore_eos:
            raise ConfigError(
                f"{prefix}rollout.ignore_eos: with an env every model turn would run to "
                f"{prefix}rollout.max_new_tokens and end the episode as truncated after one "
                "turn; remove the key"
            )

    def _validate_policy_loss(self, prefix: str, est) -> None:
        """Keys the chosen policy loss would ignore are errors; GSPO needs one advantage per
        response (an outcome estimator), its ratio being one per response."""
        pc = self.ppo
        name = f"{prefix}ppo.policy_loss: '{pc.policy_loss}'"
        if pc.policy_loss != "ppo":
            for key, bad in (
                ("clip_eps_high", pc.clip_eps_high is not None),
                ("dual_clip", pc.dual_clip),
            ):
                if bad:
                    raise ConfigError(
                        f"{prefix}ppo.{key}: only used by ppo.policy_loss: ppo ({name[len(prefix) :]} "
                        "has its own epsilons)"
                    )
        if pc.policy_loss == "gspo" and "rewards" in est.inputs:
            raise ConfigError(
                f"{name} clips one ratio per response, so it needs one advantage per response; "
                f"{prefix}ppo.estimator: '{pc.estimator}' gives per-token advantages. Use an "
                "outcome estimator: grpo, dr_grpo or rloo"
            )

    def _validate_estimator(self, prefix: str) -> None:
        """What the estimator cannot provide or use is an error, not a silent no-op."""
        from rlhfkit.algos import ESTIMATORS

        if self.ppo.estimator not in ESTIMATORS:
            raise ConfigError(
                f"{prefix}ppo.estimator: {self.ppo.estimator!r} is not one of {sorted(ESTIMATORS)}"
            )
        est, pc, n = ESTIMATORS[self.ppo.estimator], self.ppo, self.rollout.samples_per_prompt
        name = f"{prefix}ppo.estimator: '{pc.estimator}'"
        if est.needs_groups and n < 2:
            raise ConfigError(
                f"{name} compares the responses to the same prompt; set "
                f"{prefix}rollout.samples_per_prompt >= 2 (it is {n})"
            )
        if not est.needs_values:
            for key, bad in (
                ("shared_trunk", self.shared_trunk),
                ("critic_init", self.critic_init != "sft"),
                ("ppo.critic_warmup_iterations", pc.critic_warmup_iterations > 0),
            ):
                if bad:
                    raise ConfigError(f"{prefix}{key}: {name} uses no critic; remove the key")
        if self.rollout.episodes_per_iteration % n or self.rollout.chunk_size % n:
            raise ConfigError(
                f"{prefix}rollout.samples_per_prompt ({n}) must divide "
                f"{prefix}rollout.episodes_per_iteration and {prefix}rollout.chunk_size"
            )
        if pc.clip_eps_high is not None and pc.clip_eps_high < pc.clip_eps:
            # clip-higher (DAPO) widens the upper bound; a tighter one makes exploration harder
            # and is almost always a swapped pair of keys (docs/decisions.md)
            raise ConfigError(
                f"{prefix}ppo.clip_eps_high: {pc.clip_eps_high} is below {prefix}ppo.clip_eps "
                f"({pc.clip_eps}); the upper epsilon must be >= the lower one"
            )
        self._validate_policy_loss(prefix, est)
        if self.rollout.filter_groups and n < 2:
            raise ConfigError(
                f"{prefix}rollout.filter_groups: drops groups whose scores are all equal; it needs "
                f"{prefix}rollout.samples_per_prompt >= 2 (it is {n})"
            )
        if pc.overlong_buffer >= self.rollout.max_new_tokens:
            raise ConfigError(
                f"{prefix}ppo.overlong_buffer: {pc.overlong_buffer} must be below "
                f"{prefix}rollout.max_new_tokens ({self.rollout.max_new_tokens})"
            )
        if pc.dual_clip and pc.dual_clip <= 1:
            raise ConfigError(f"{prefix}ppo.dual_clip: {pc.dual_clip} must be > 1 (or 0 = off)")


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
