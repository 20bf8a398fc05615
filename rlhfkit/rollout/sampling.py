"""Autoregressive sampling with a KV cache, batched over left-padded prompts.

One forward over the prompts (logits for the last position only), then one token per step.
Sampling uses inverse-CDF (cumsum + searchsorted): ``torch.multinomial`` over a 50k vocabulary
costs ~40x more on CPU (issue 6). Rows stop at EOS / a stop sequence; the loop ends as soon as
every row has stopped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

from rlhfkit.algos import position_ids
from rlhfkit.models.compat import cache_kwargs, output_cache
from rlhfkit.models.cpu_gemm import packed_weights


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, T) response tokens, pad after each row's end
    lengths: torch.Tensor  # (B,) tokens in each response, including the stop token
    stopped: torch.Tensor  # (B,) bool, True if the row ended on EOS / a stop sequence
    logprobs: torch.Tensor  # (B, T) float32 log softmax(logits / temperature)[a_t], before top-k/p
    entropy: torch.Tensor  # (B, T) float32 entropy of softmax(logits / temperature)

    @property
    def mask(self) -> torch.Tensor:  # (B, T) bool
        return (
            torch.arange(self.tokens.shape[1], device=self.tokens.device)[None]
            < self.lengths[:, None]
        )


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / top-p (nucleus, Holtzman et al. 2020) set to -inf. (B, V)"""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_logits(
    logits: torch.Tensor, generator: torch.Generator | None = None, u: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row from softmax(logits), by inverse CDF. (B, V) -> (B,)"""
    return sample_from_probs(torch.softmax(logits.float(), dim=-1), generator, u)


def uniforms(rows: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(rows, 1) draws of U(0, 1) from ``generator`` (which may live on the CPU while the model
    runs on a GPU), on ``device``."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(rows, 1, generator=generator, device=gen_device).to(device)


def sample_from_probs(
    probs: torch.Tensor, generator: torch.Generator | None = None, u: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row from probabilities (B, V), by inverse CDF: the first token whose
    cumulative mass reaches u * total, u ~ U(0, 1) (drawn here, or given (B, 1)). Rows need not
    sum to exactly 1. (B,)"""
    cdf = torch.cumsum(probs, dim=-1)
    if u is None:
        u = uniforms(probs.shape[0], generator, probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


class _FilledView(DynamicLayer):
    """One layer of the eager rollout's KV cache: each step's keys/values are written into a
    buffer of ``capacity`` columns and the filled part is returned as a view, where HF's
    ``DynamicLayer`` concatenates the whole cache every step (``torch.cat`` was 24% of an eager
    tiny-model rollout)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def update(self, key_states, value_states, *args, **kwargs):
        start = self.get_seq_length()  # the filled columns; follows HF's crop() and reset()
        if not self.is_initialized:
            b, h, _, d = key_states.shape
            self.dtype, self.device = key_states.dtype, key_states.device
            self.k_buf = key_states.new_empty(b, h, self.capacity, d)
            self.v_buf = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
            self.is_initialized = True
        end = start + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} columns cannot take column {end}")
        self.k_buf[:, :, start:end] = key_states
        self.v_buf[:, :, start:end] = value_states
        self.keys, self.values = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
        return self.keys, self.values

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` of the batch (repeats allowed): a prompt prefilled once, copied to
        each row that samples from it (``generate``)."""
        end = self.get_seq_length()
        self.k_buf, self.v_buf = self.k_buf[index], self.v_buf[index]
        self.keys, self.values = self.k_buf[:, :, :end], self.v_buf[:, :, :end]


def distinct_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """(first, inverse) when some rows of a left-padded prompt batch repeat (a group's n samples
    of one prompt): ``first`` (U,) a row of each distinct prompt, ``inverse`` (B,) the position
    in ``first`` of each row's prompt. None when every row is distinct."""
    key = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    u = int(inverse.max()) + 1
    if u == key.shape[0]:
        return None
    rows = torch.arange(key.shape[0], device=key.device)
    first = torch.full((u,), key.shape[0], device=key.device).scatter_reduce(
        0, inverse, rows, "amin"
    )
    return first, inverse


def preallocated_cache(model, capacity: int) -> DynamicCache | None:
    """A ``DynamicCache`` of ``_FilledView`` layers holding ``capacity`` columns; None when the
    model has a layer type other than plain full attention (sliding windows, ...), which then
    keeps HF's own cache."""
    cache = DynamicCache(config=model.config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [_FilledView(capacity) for _ in cache.layers]
    return cache


class _OwnDtypeStaticLayer(StaticLayer):
    """HF's ``StaticLayer``, with the values stored in their own dtype. Under bf16 autocast
    (``bf16-mixed``) a Llama's keys leave the rotary embedding in fp32 and its values leave
    ``v_proj`` in bf16; some transformers 5.x releases (5.17, the GPU image's) allocate both
    buffers in the keys' dtype, and the first value write then fails in ``index_copy_``."""

    def lazy_initialization(self, key_states, value_states, *args, **kwargs):
        super().lazy_initialization(key_states, value_states, *args, **kwargs)
        if self.values.dtype != value_states.dtype:
            self.values = torch.zeros_like(self.values, dtype=value_states.dtype)
            if not torch.compiler.is_compiling():  # a fixed address, as HF marks its own
                torch._dynamo.mark_static_address(self.values)


def static_cache(model, capacity: int) -> StaticCache:
    """HF's ``StaticCache`` of ``capacity`` columns, its plain layers replaced by
    ``_OwnDtypeStaticLayer`` (other layer types, sliding windows, are kept as HF builds them)."""
    cache = StaticCache(config=model.config, max_cache_len=capacity)
    cache.layers = [
        _OwnDtypeStaticLayer(max_cache_len=capacity) if type(layer) is StaticLayer else layer
        for layer in cache.layers
    ]
    return cache


def _reused_static_cache(model, batch: int, width: int, device: torch.device) -> StaticCache:
    """The compiled decoder's cache, kept on the model and reset between rollouts while the
    batch, width and autocast dtype stay the same. A CUDA graph reads the cache at fixed
    addresses: a new cache per rollout would re-record the graphs every time (and torch stops
    using graphs for a function after ``cudagraph_unexpected_rerecord_limit`` re-records on some
    releases). The price is that the cache's memory stays allocated between rollouts."""
    kind = device.type
    key = (
        batch,
        width,
        str(device),
        torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind),
    )
    kept = getattr(model, "_rlhfkit_static_cache", None)
    if kept is not None and kept[0] == key:
        kept[1].reset()  # zeroes keys, values and the filled length in place
        return kept[1]
    model._rlhfkit_static_cache = None  # free the old one before allocating
    cache = static_cache(model, width)
    model._rlhfkit_static_cache = (key, cache)
    return cache


_BUCKET = 64  # static cache lengths are rounded up to this, so new prompt widths rarely recompile


class _Decoder:
    """The decode step. Eager: a ``DynamicCache`` that fills a preallocated buffer
    (``preallocated_cache``; HF's growing one where that does not apply). Compiled: a
    ``StaticCache`` of P + T columns rounded up to ``_BUCKET`` and a mask of that fixed width
    (zeros mark the columns not written yet), so the compiled graph sees the same shapes at every
    step and for every prompt width in the bucket."""

    def __init__(self, model, prompt_mask: torch.Tensor, max_new_tokens: int, compiled: bool):
        self.static, self.cache = compiled, None
        if not compiled:
            self.cache = preallocated_cache(model, prompt_mask.shape[1] + max_new_tokens)
            self.row_select = self.cache is not None  # a prompt prefilled once for its rows
            return
        self.row_select = False  # the compiled step's static cache has a fixed batch
        b, p = prompt_mask.shape
        width = -(-(p + max_new_tokens) // _BUCKET) * _BUCKET
        self.cache = _reused_static_cache(model, b, width, prompt_mask.device)
        self.mask = torch.zeros(b, width, dtype=torch.long, device=prompt_mask.device)
        self.mask[:, :p] = prompt_mask
        self.p, self.model = p, model
        # on CUDA the compiled step replays as a CUDA graph (mode "reduce-overhead": one launch
        # per step instead of one per kernel); the bucketed cache width and the fixed batch of a
        # rollout chunk keep the number of graphs to a handful
        self.graphs = prompt_mask.is_cuda
        # compiled once per model object (kept on it, so it dies with the model); a new batch
        # size or cache width recompiles, up to torch's recompile limit, then runs eager
        if getattr(model, "_rlhfkit_compiled_forward", None) is None:
            mode = "reduce-overhead" if self.graphs else None
            model._rlhfkit_compiled_forward = torch.compile(model.forward, dynamic=False, mode=mode)
        self.forward = model._rlhfkit_compiled_forward

    def select_rows(self, index: torch.Tensor) -> None:
        for layer in self.cache.layers:
            layer.select_rows(index)

    def step(self, tok: torch.Tensor, position: torch.Tensor, t: int) -> torch.Tensor:
        """Feed token t (B,) at ``position`` (B, 1); returns the next logits (B, V)."""
        col = self.p + t
        self.mask[:, col] = 1
        if self.graphs:  # a new replay: the previous step's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        out = self.forward(
            input_ids=tok[:, None],
            attention_mask=self.mask,
            position_ids=position,
            **cache_kwargs(self.model, self.cache),
            use_cache=True,
            cache_position=torch.tensor([col], device=tok.device),
        )
        # a graph's output buffer is reused by the next replay: keep a copy
        return out.logits[:, -1].clone() if self.graphs else out.logits[:, -1]


# RLHFKIT_SHRINK_DECODE=0 decodes every row to the end (benchmarks/shrinking_decode.py)
_SHRINK = os.environ.get("RLHFKIT_SHRINK_DECODE", "1") != "0"


def _compact(done: torch.Tensor) -> bool:
    """Whether to drop the ended rows from the decode batch (their KV cache rows too): once an
    eighth of the live rows have ended. A row's forward does not depend on the others', so the
    samples stay the same; the copy of the cache (~0.5 GB for 32 SmolLM2 rows at 338 columns,
    ~60 ms) is paid a handful of times per rollout instead of decoding padding to the end."""
    return _SHRINK and int(done.sum()) >= max(1, done.numel() // 8)


def _ends_with(history: torch.Tensor, seqs: list[torch.Tensor]) -> torch.Tensor:
    hit = torch.zeros(history.shape[0], dtype=torch.bool, device=history.device)
    for s in seqs:
        if history.shape[1] >= len(s):
            hit |= (history[:, -len(s) :] == s).all(dim=1)
    return hit


@torch.no_grad()
@packed_weights()  # the weights stay fixed while sampling: reorder them once (models.cpu_gemm)
def generate(
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
    """Sample responses to left-padded prompts (B, P). Stops early once every row has ended.
    eos_id=None: rows end only at stop sequences or max_new_tokens.

    Also records log pi(a_t|s_t) and the entropy of the policy at the sampling temperature, without
    the top-k / top-p filter (the distribution PPO trains), from the logits it samples with: in
    fp32 they equal a training-layout forward's to ~1e-6, so the rollout need not run one.

    compile_decode: run the one-token decode step through ``torch.compile`` with a preallocated
    ``StaticCache`` and a fixed-width attention mask, so every step has the same shapes (see
    ``_Decoder``); the prompt forward stays eager."""
    b = prompt_ids.shape[0]
    device = prompt_ids.device
    stops = [torch.tensor(s, device=device) for s in (stop_sequences or []) if s]
    attn = prompt_mask.long()
    pos = position_ids(attn)  # positions of left-padded prompts start at 0
    decoder = _Decoder(model, attn, max_new_tokens, compile_decode)
    # the prompt forward once per distinct prompt (GRPO's n samples share one), its cache and
    # last logits copied to the rows that share it; rows are independent, so bit for bit the
    # same as prefilling every row (tests/test_sampling.py)
    shared = distinct_prompts(prompt_ids, attn) if decoder.row_select else None
    first = slice(None) if shared is None else shared[0]
    out = model(
        input_ids=prompt_ids[first],
        attention_mask=attn[first],
        position_ids=pos[first],
        **cache_kwargs(model, decoder.cache),
        use_cache=True,
        logits_to_keep=1,
    )
    cache, next_pos = output_cache(out), pos[:, -1:] + 1
    logits = out.logits[:, -1]
    if shared is not None:
        decoder.select_rows(shared[1])
        logits = logits[shared[1]]
    tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((b,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    stopped = torch.zeros(b, dtype=torch.bool, device=device)
    logprobs = torch.zeros(b, max_new_tokens, dtype=torch.float32, device=device)
    entropy = torch.zeros(b, max_new_tokens, dtype=torch.float32, device=device)
    filtered = bool(top_k) or top_p < 1.0
    live = torch.arange(b, device=device)  # the rows the model still decodes (``_compact``)
    longest_stop = max((len(s) for s in stops), default=0)
    for t in range(max_new_tokens):
        # one log-softmax pass per step: its exp is both the sampling distribution (unless a
        # top-k/p filter changes it) and the entropy's weights; no division at temperature 1
        scaled = logits.float() if temperature == 1.0 else logits.float() / temperature  # (n, V)
        logp = torch.log_softmax(scaled, dim=-1)  # (n, V)
        probs = logp.exp()
        u = uniforms(b, generator, device)[live]  # every row's draw: the same stream as uncompacted
        if filtered:
            tok = sample_from_logits(filter_logits(scaled, top_k, top_p), u=u)
        else:
            tok = sample_from_probs(probs, u=u)
        ended = done[live]  # rows that ended but still sit in the batch: they sample padding
        tok = torch.where(ended, torch.full_like(tok, pad_id), tok)
        tokens[live, t] = tok
        logprobs[live, t] = logp.gather(1, tok[:, None]).squeeze(1)
        entropy[live, t] = -(probs * logp).sum(-1)
        tail = tokens[live, max(0, t + 1 - longest_stop) : t + 1]  # all a stop sequence can end in
        hit = (
            _ends_with(tail, stops) if eos_id is None else (tok == eos_id) | _ends_with(tail, stops)
        )
        new_stop = hit & ~ended
        lengths[live] = torch.where(new_stop, torch.full_like(tok, t + 1), lengths[live])
        stopped[live] |= new_stop
        done[live] |= new_stop
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        if decoder.static:
            logits = decoder.step(tok, next_pos, t)
        else:
            if decoder.row_select and _compact(done[live]):
                keep = (~done[live]).nonzero().squeeze(1)
                decoder.select_rows(keep)
                live, tok, attn, next_pos = live[keep], tok[keep], attn[keep], next_pos[keep]
            n = live.numel()
            attn = torch.cat([attn, torch.ones(n, 1, dtype=attn.dtype, device=device)], dim=1)
            out = model(
                input_ids=tok[:, None],
                attention_mask=attn,
                position_ids=next_pos,
                **cache_kwargs(model, cache),
                use_cache=True,
            )
            cache, logits = output_cache(out), out.logits[:, -1]
        next_pos = next_pos + 1
    width = int(lengths.max())
    keep = torch.arange(width, device=device)[None] < lengths[:, None]  # zeros after each end
    return Generation(
        tokens[:, :width],
        lengths,
        stopped,
        torch.where(keep, logprobs[:, :width], 0.0),
        torch.where(keep, entropy[:, :width], 0.0),
    )
