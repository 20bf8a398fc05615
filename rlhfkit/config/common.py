"""The schemas several stages share: the model (and LoRA), data, training and PPO-run knobs,
logging, sampling (``rollout``), reward sources and environments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from rlhfkit.config.load import ConfigError, knob, sub


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
    cpu_gemm: Literal["auto", "onednn", "torch"] = knob(
        "auto",
        "fp32 linear layers on the CPU: oneDNN's matmul (1-3x MKL's sgemm on the AMD EPYCs "
        "measured; benchmarks/cpu_gemm.py), torch's own (MKL), or auto: oneDNN, except that each "
        "product of a training step takes the faster of the two, timed once per shape class on "
        "this machine and kept in ~/.cache/rlhfkit (models.cpu_gemm.Choices); equal up to fp32 "
        "rounding. Other dtypes and devices always use torch's",
    )
    cpu_blocks: Literal["fused", "hf"] = knob(
        "fused",
        "fp32 CPU training of Llama-family models: fused RMSNorm and SwiGLU-MLP blocks that keep "
        "fewer activations for backward (a SmolLM2 update in micro-batches of 16: peak RSS -2.6 GB; "
        "models.cpu_fused), forward bit-identical to HF's, gradients equal up to fp32 rounding; "
        "or HF's own modules. Other dtypes, devices and adapters always use HF's",
    )
    padding_free: bool = knob(
        True,
        "fp32 RL forwards (the policy's reference, old and new logprobs, a separate critic's "
        "values, an RM's scores) on the real tokens alone: the rows of a batch packed into one, "
        "attention kept within each row "
        "(models.packing; verl's use_remove_padding, TRL's padding_free); equal to the padded "
        "forward up to fp32 rounding. Llama, Qwen2 and Qwen3 on SDPA attention; below fp32 the "
        "rollout's fixed layout is kept (rollout.collect.fixed_layout) and this does not apply",
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


# the knobs every training run has, declared once: SFT, RM and DPO (``train``) and PPO (``run``)
_RUN_KNOBS: dict[str, tuple[Any, str, dict]] = {
    "seed": (0, "seed for init, data order, sampling and updates", {}),
    "keep_last": (2, "checkpoints to keep", {"lo": 1}),
    "resume": (True, "continue from the newest checkpoint in output_dir if there is one", {}),
    "num_threads": (0, "torch CPU threads (0 = torch's default)", {"lo": 0}),
    "max_bad_steps": (
        3,
        "abort after this many non-finite (skipped) optimizer steps in a row",
        {"lo": 1},
    ),
    "parallel": (
        "ddp",
        "under torchrun: DDP (every rank holds all weights) or FSDP2 fully_shard (weights, "
        "gradients and optimizer state split across ranks per transformer block; in PPO the "
        "frozen reference and RM are sharded too)",
        {},
    ),
}


def run_knob(name: str):
    """One of the knobs that ``TrainConfig`` and ``RunConfig`` share (``_RUN_KNOBS``)."""
    default, help, limits = _RUN_KNOBS[name]
    return knob(default, help, **limits)


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = knob("runs/out", "run directory: checkpoints, logs, final model")
    seed: int = run_knob("seed")
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
    keep_last: int = run_knob("keep_last")
    resume: bool = run_knob("resume")
    num_threads: int = run_knob("num_threads")
    max_bad_steps: int = run_knob("max_bad_steps")
    parallel: Literal["ddp", "fsdp"] = run_knob("parallel")


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = knob(True, "write TensorBoard event files under output_dir/tb")
    wandb: bool = knob(False, "also log to Weights & Biases (needs `pip install wandb`)")
    wandb_project: str = knob("rlhfkit", "W&B project name")
    progress: bool = knob(True, "show a progress bar")


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
class OptimConfig:
    lr: float = knob(1e-6, "learning rate", lo=0, lo_open=True)
    weight_decay: float = knob(0.0, "AdamW weight decay", lo=0)
    max_grad_norm: float = knob(1.0, "grad norm clip (0 = off)", lo=0)
    warmup_iterations: int = knob(0, "linear LR warm-up, in iterations", lo=0)


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = knob("runs/ppo", "run directory: checkpoints, logs, final actor and critic")
    seed: int = run_knob("seed")
    iterations: int = knob(20, "rollout + update iterations", lo=1)
    save_every: int = knob(0, "checkpoint every N iterations (0 = only at the end)", lo=0)
    sample_every: int = knob(5, "log sample generations every N iterations (0 = never)", lo=0)
    keep_last: int = run_knob("keep_last")
    resume: bool = run_knob("resume")
    num_threads: int = run_knob("num_threads")
    max_bad_steps: int = run_knob("max_bad_steps")
    warn_kl: float = knob(50.0, "warn when the mean per-sequence KL exceeds this", lo=0)
    parallel: Literal["ddp", "fsdp"] = run_knob("parallel")


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
    max_staleness: int = knob(
        0,
        "0: sample, then train (synchronous); k >= 1: the next batch is sampled by a rollout "
        "worker while this one trains, and no batch is trained on more than k policy versions "
        "after the one that sampled it (logged as rollout/staleness; use "
        "ppo.rollout_correction: tis)",
        lo=0,
    )
    engine: Literal["hf", "vllm"] = knob(
        "hf",
        "what samples the responses: hf = rlhfkit's own KV-cache decode loop over the HF model "
        "(exact logprobs, no extra install); vllm = vLLM (pip install 'rlhfkit[vllm]', "
        "docs/vllm.md), its weights synced from the actor before every rollout; the trainer "
        "then recomputes log pi_old and keeps vLLM's as the sampler's (ppo.rollout_correction)",
    )
    vllm_mode: Literal["colocate", "server"] = knob(
        "colocate",
        "engine vllm: colocate = an in-process vllm.LLM; server = `rlhfkit vllm-serve` at "
        "rollout.vllm_url (its own process or machine, its own virtualenv)",
    )
    vllm_url: str = knob("", "engine vllm, vllm_mode server: the server's base URL")
    vllm_kv_cache_gb: float = knob(
        2.0, "engine vllm, colocate, on the CPU: the KV cache's memory in GB", lo=0, lo_open=True
    )
    vllm_lora_sync: Literal["merged", "adapter"] = knob(
        "merged",
        "engine vllm, a LoRA actor: merged = send the base weights with the adapters' deltas "
        "added (vLLM without LoRA; 2.2x faster sampling on the CPU); adapter = send the adapters "
        "alone after each update, applied unmerged by vLLM's LoRA kernels (a server needs "
        "--max-lora-rank)",
    )

    def validate(self, prefix: str = "") -> None:
        if self.engine != "vllm":
            for key in ("vllm_mode", "vllm_url", "vllm_lora_sync"):
                if getattr(self, key) != getattr(RolloutConfig, key):
                    raise ConfigError(f"{prefix}{key}: needs {prefix}engine: vllm")
            return
        if self.vllm_mode == "server" and not self.vllm_url:
            raise ConfigError(
                f"{prefix}vllm_url: vllm_mode server needs the server's URL "
                "(start one with `rlhfkit vllm-serve MODEL_DIR`)"
            )
        if self.vllm_mode == "colocate" and self.vllm_url:
            raise ConfigError(f"{prefix}vllm_url: only with {prefix}vllm_mode: server")
        if self.compile:
            raise ConfigError(
                f"{prefix}compile: compiles the hf engine's decode step; vLLM has its own"
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
    mcp: list[str] = knob(
        [],
        "MCP tool servers: a URL (Streamable HTTP) or a command that starts one on stdio; their "
        "tools join env.tools, schemas from MCP (needs the envs extra)",
    )
    url: str = knob(
        "",
        "instead of a factory: an OpenEnv server (http://host:port, started by OpenEnv's "
        "create_app); each episode opens its own session (needs the envs extra)",
    )
    tool_parser: Literal["auto", "hermes", "llama3", "mistral"] = knob(
        "auto",
        "how tool calls are read from the model's text: hermes <tool_call>{json}</tool_call>, "
        'llama3 {"name", "parameters"} JSON, mistral [TOOL_CALLS][...]; auto = the format '
        "the tokenizer's chat template writes (hermes when it shows none)",
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
        given = [k for k in ("factory", "tools", "url") if getattr(self, k)]
        given += ["mcp"] if self.mcp and not self.tools else []  # mcp's tools join env.tools
        if len(given) > 1:
            raise ConfigError(" / ".join(prefix + k for k in given) + ": set only one of them")

    @property
    def enabled(self) -> bool:
        return bool(self.factory or self.tools or self.url or self.mcp)


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
