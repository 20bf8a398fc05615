"""Loading Hugging Face models and tokenizers: policies (``AutoModelForCausalLM``) and scalar
models (``AutoModelForSequenceClassification`` with ``num_labels=1``: reward models and critics),
with dropout off and the options of ``ModelConfig`` (dtype, device, LoRA, checkpointing)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhfkit.config import ConfigError, ModelConfig
from rlhfkit.launch import tune_glibc_malloc
from rlhfkit.models.compat import enable_checkpointing, quiet_peft_wrapping
from rlhfkit.models.cpu_fused import fuse_blocks
from rlhfkit.models.cpu_gemm import use_onednn

PAD_TOKEN = "<|pad|>"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.float32}  # weights


def autocast(dtype: str, device) -> torch.autocast:
    """The compute precision of ``model.dtype`` around a forward: bf16 autocast for
    ``bf16-mixed`` (matmuls in bf16, the fp32 master weights cast per op), nothing otherwise.
    Logprobs are reduced in fp32 whatever the logits' dtype (``algos.logprobs``)."""
    return torch.autocast(
        device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bf16-mixed"
    )


def _quiet_transformers() -> None:
    # the per-load progress bars and "score.weight MISSING" report are noise: we init that head
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def check_source(name: str, key: str) -> None:
    """A model or tokenizer source must be an existing directory or a hub id ("org/name"): a
    path that does not exist is a config error naming ``key``, not a hub lookup's traceback."""
    if not name:
        raise ConfigError(f"{key}: empty; set a local model directory or a hub id")
    path = Path(name).expanduser()
    if path.is_file():
        raise ConfigError(f"{key}: {name}: is a file; a model directory is needed")
    if path.exists():
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise ConfigError(f"{key}: {name}: the directory does not exist")


def load_tokenizer(cfg: ModelConfig):
    """Tokenizer with a pad token distinct from EOS (with PAD == EOS, masking EOS out of the
    loss means the model never learns to stop). Adds ``<|pad|>`` when needed."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    src = cfg.tokenizer or cfg.name_or_path
    check_source(src, "model.tokenizer" if cfg.tokenizer else "model.name_or_path")
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file and not cfg.tokenizer:
        kwargs["gguf_file"] = cfg.gguf_file
    tok = AutoTokenizer.from_pretrained(src, **kwargs)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {src!r} has no EOS token; set one before training")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    return tok


def _no_dropout_kwargs(path: str, trust_remote_code: bool) -> dict[str, float]:
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return {k: 0.0 for k, v in conf.to_dict().items() if "dropout" in k and isinstance(v, float)}


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout makes rollout logprobs differ from update logprobs (ratio != 1): switch it off."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    conf = getattr(model, "config", None)
    if conf is not None:
        for k, v in conf.to_dict().items():
            if "dropout" in k and isinstance(v, float):
                setattr(conf, k, 0.0)
    return model


def _fit_vocab(model, tokenizer) -> None:
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def _load_kwargs(cfg: ModelConfig, path: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[cfg.dtype],
        "trust_remote_code": cfg.trust_remote_code,
        "use_safetensors": None
        if (cfg.gguf_file or cfg.allow_pickle)
        else True,  # no pickle unless opted in
    }
    if cfg.gguf_file:
        from transformers import GgufConfig

        kwargs["gguf_file"] = cfg.gguf_file
        # dequantized: a plain fp32 model that can be trained and saved (a GGUF-quantized one cannot)
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    else:
        kwargs.update(_no_dropout_kwargs(path, cfg.trust_remote_code))
    return {k: v for k, v in kwargs.items() if v is not None}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def _apply_options(model, cfg: ModelConfig, trainable: bool):
    model.to(resolve_device(cfg.device))
    if device_of(model).type == "cpu":
        tune_glibc_malloc()  # large CPU tensors stay mapped between steps (rlhfkit.launch)
    disable_dropout(model)
    if cfg.cpu_gemm != "torch":  # a no-op on other devices and dtypes at call time (cpu_gemm)
        use_onednn(model, cfg.cpu_gemm)
    if cfg.cpu_blocks == "fused":
        fuse_blocks(model)  # fp32 CPU training only, decided at call time (models.cpu_fused)
    if cfg.gradient_checkpointing and trainable:
        enable_checkpointing(model)
        model.config.use_cache = False
    if cfg.lora.enabled and trainable:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            task_type="CAUSAL_LM" if hasattr(model, "lm_head") else "SEQ_CLS",
        )
        with quiet_peft_wrapping():
            model = get_peft_model(model, lcfg)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def load_policy(cfg: ModelConfig, tokenizer, path: str | None = None, trainable: bool = True):
    """AutoModelForCausalLM from a hub id or local dir, dropout off, optional LoRA/checkpointing."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    src = path or cfg.name_or_path
    check_source(src, "model.name_or_path")
    model = AutoModelForCausalLM.from_pretrained(src, **_load_kwargs(cfg, src))
    _fit_vocab(model, tokenizer)
    return _apply_options(model, cfg, trainable)


def init_scalar_head(head: nn.Linear) -> None:
    """N(0, 1/sqrt(d_model + 1)) weights, zero bias (Stiennon et al. 2020; OpenAI lm-human-preferences)."""
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(head.in_features + 1))
        if head.bias is not None:
            head.bias.zero_()


def scalar_head(model) -> nn.Linear:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.score


def load_scalar_model(
    cfg: ModelConfig, tokenizer, path: str, fresh_head: bool, trainable: bool = True
):
    """Backbone + scalar head (AutoModelForSequenceClassification, num_labels=1).

    fresh_head=True: start from a causal-LM checkpoint (SFT) and initialise the head;
    fresh_head=False: load a trained reward model / critic as it is.
    """
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    check_source(path, "reward_model" if not fresh_head else "model.name_or_path")
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, **_load_kwargs(cfg, path)
    )
    _fit_vocab(model, tokenizer)
    if fresh_head:
        init_scalar_head(model.score)
    return _apply_options(model, cfg, trainable)


def backbone(model):
    """The transformer body (no LM/score head) of an HF or peft-wrapped model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model
