"""Experience collection: the prompt stream, n responses per prompt, chunked generation, and the
reference, critic and reward forwards, into one ``Experience`` with its group ids.

    prompts --stream--> (B/n prompts, each repeated n times) --generate--> responses
            --forwards--> log pi_old, entropy, V_old (if a critic), log pi_ref, R_final
            --normalise--> scores (+ the missing-EOS penalty)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from rlhfkit.algos import masked_mean, overlong_penalty
from rlhfkit.config import PPOConfig
from rlhfkit.data.build import PromptItem
from rlhfkit.data.tokenize import pad_left
from rlhfkit.models import autocast, device_of
from rlhfkit.models.cpu_gemm import packed_weights
from rlhfkit.rollout.columns import columns_of
from rlhfkit.rollout.engines import HFEngine
from rlhfkit.rollout.episodes import Episodes
from rlhfkit.rollout.experience import Experience, concat
from rlhfkit.rollout.forward import join, policy_logprobs
from rlhfkit.rollout.rewards import ScoreNormalizer
from rlhfkit.train import dist


class PromptStream:
    """Prompts in a seeded order, epoch after epoch; its position is part of a checkpoint."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.index = n, seed, 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        return torch.randperm(
            self.n, generator=torch.Generator().manual_seed(self.seed + 7919 * self.epoch)
        ).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._perm()
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, s: dict[str, int]) -> None:
        self.epoch, self.index = s["epoch"], s["index"]
        self._order = self._perm()


@dataclass
class Timings:
    """What one collection spent, in seconds, and the entropy it saw (summed over episodes)."""

    generate: float = 0.0
    score: float = 0.0
    entropy_sum: float = 0.0
    episodes: float = 0.0  # sampled, filtered ones included (the entropy is their mean)
    # rollout.filter_groups (DAPO dynamic sampling): groups sampled, dropped as all-equal, put
    # back to fill a short batch, and sampling rounds used
    groups: float = 0.0
    groups_filtered: float = 0.0
    groups_filled: float = 0.0
    rounds: float = 0.0
    # what an environment's episodes counted (rollout/episodes.py: turns, truncated, skipped,
    # observations cut; and whatever the env's own ``counts`` hold, ToolEnv's tool calls and
    # errors among them), summed: logged as env/<key>
    env: dict[str, float] = field(default_factory=dict)

    def __iadd__(self, other: Timings) -> Timings:
        for f in dataclasses.fields(self):
            if f.name == "env":
                for k, v in other.env.items():
                    self.env[k] = self.env.get(k, 0.0) + v
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


def fixed_layout(dtype: str) -> bool:
    """Below fp32 (``model.dtype`` bf16 or bf16-mixed), logprobs depend on the padding around a
    sequence (up to ~0.1 nats per token in bf16, issue 6), so the rollout's and the update's
    forwards must see each row in the same layout: prompts padded to the longest prompt of the
    data set, responses to max_new_tokens, and minibatches not trimmed. In fp32 the layout
    changes results only by rounding (~1e-6)."""
    return dtype != "fp32"


def packs(model_cfg) -> bool:
    """Whether the policy's forwards pack the rows (``model.padding_free``, in fp32 only)."""
    return model_cfg.padding_free and not fixed_layout(model_cfg.dtype)


def sampler_logprobs_usable(choice: str, dtype: str) -> bool:
    """``rollout.old_logprobs``: fp32 logprobs from the KV-cache sampler equal a full forward's to
    rounding; bf16 ones can differ by ~0.1 nats with the layout, which would bias the PPO ratio
    (issue 6), so ``auto`` recomputes them below fp32."""
    if choice != "auto":
        return choice == "sampling"
    return not fixed_layout(dtype)


def _pad_generation(gen, width: int, pad_id: int):
    """Right-pad a ``Generation`` to ``width`` response columns (a fixed layout)."""
    extra = width - gen.tokens.shape[1]
    if extra <= 0:
        return gen
    pad = torch.nn.functional.pad
    return dataclasses.replace(
        gen,
        tokens=pad(gen.tokens, (0, extra), value=pad_id),
        logprobs=pad(gen.logprobs, (0, extra)),
        entropy=pad(gen.entropy, (0, extra)),
    )


class SingleTurn:
    """The rollout's sampler without an environment: one response per prompt, from ``engine``
    (``rollout.engine``: rlhfkit's own decode loop by default)."""

    provides: tuple[str, ...] = ()  # columns it adds for the reward sources

    def __init__(self, engine=None):
        self.engine = engine or HFEngine()

    def __call__(self, actor, tokenizer, prompts, sample: dict, prompt_width) -> Episodes:
        ids, mask = pad_left(
            [p.prompt_ids for p in prompts], tokenizer.pad_token_id, device_of(actor), prompt_width
        )  # (B, P)
        self.engine.sync(actor)
        gen = self.engine(actor, ids, mask, **sample)
        none = torch.zeros(len(prompts), dtype=torch.bool, device=ids.device)
        return Episodes(ids, mask, gen, None, [0.0] * len(prompts), [], none)

    def columns(self, episodes: Episodes) -> dict[str, list]:
        return {}


@dataclass
class RolloutModels:
    """What a rollout runs: the learner (actor and critic mode, ``rl.critics``), the frozen
    reference (None = the LoRA actor with its adapters off), the reward source, and the sampler
    (one response per prompt, or episodes with an environment: ``rollout.episodes``)."""

    tokenizer: object
    learner: object
    ref: object | None
    reward: object  # rollout.rewards: called with (Sequences, tokenizer) -> (B,) raw scores
    sampler: object = field(default_factory=SingleTurn)  # SingleTurn or episodes.MultiTurn
    # the sampling RNG: None = torch's global one; a rollout worker on its own thread has its
    # own (rollout.staleness), so that the trainer's draws never interleave with its samples
    rng: torch.Generator | None = None

    @property
    def actor(self):
        return self.learner.actor


def _sampling(tok, rc, rng: torch.Generator | None = None) -> dict:
    """``generate``'s keywords from ``rollout.*`` (and the sampling RNG, when not torch's)."""
    extra = {} if rng is None else {"generator": rng}
    return extra | dict(
        max_new_tokens=rc.max_new_tokens,
        eos_id=None if rc.ignore_eos else tok.eos_token_id,
        pad_id=tok.pad_token_id,
        temperature=rc.temperature,
        top_k=rc.top_k,
        top_p=rc.top_p,
        stop_sequences=[tok(s, add_special_tokens=False)["input_ids"] for s in rc.stop_strings],
        compile_decode=rc.compile,
    )


@torch.no_grad()
@packed_weights()  # the sampling and scoring forwards share one reordered copy of each weight
def rollout_chunk(
    models: RolloutModels,
    prompts: list[PromptItem],
    group: torch.Tensor,
    cfg: PPOConfig,
    normalize: ScoreNormalizer,
    prompt_width: int | None = None,
) -> tuple[Experience, Timings]:
    """One chunk of episodes, one per row of ``prompts`` (a prompt repeated n times gives a group;
    ``group`` (B,) holds the ids). ``prompt_width``: pad prompts to it (the fixed layout)."""
    tok, rc, learner = models.tokenizer, cfg.rollout, models.learner
    actor = learner.actor
    t0 = time.perf_counter()
    with dist.full_weights(learner.generator):  # FSDP: no collectives per token
        ep = models.sampler(actor, tok, prompts, _sampling(tok, rc, models.rng), prompt_width)
    t1 = time.perf_counter()
    gen, prompt_ids, prompt_mask = ep.gen, ep.prompt_ids, ep.prompt_mask
    if prompt_width is not None:  # fixed layout: every response is max_new_tokens columns wide
        gen = _pad_generation(gen, rc.max_new_tokens, tok.pad_token_id)
    # the model's own tokens: all of a single-turn response, the model's turns of an episode
    action = gen.mask if ep.action_mask is None else _pad_cols(ep.action_mask, gen.mask)
    seq = join(prompt_ids, prompt_mask, gen.tokens, gen.mask, packs(cfg.model))
    # the sampler's logprobs as log pi_old when they are the policy's own (the hf engine's, in
    # fp32); another engine's are kept for the rollout correction only
    exact = sampler_logprobs_usable(rc.old_logprobs, cfg.model.dtype)
    sampled = (
        (gen.logprobs, gen.entropy) if exact and models.sampler.engine.exact_logprobs else None
    )
    logprobs, entropy, values = learner.rollout_outputs(seq, rc.temperature, sampled)  # (B, T)
    if models.ref is None:
        with actor.disable_adapter():
            ref_logprobs, _ = policy_logprobs(actor, seq, rc.temperature)
    else:
        ref_logprobs, _ = policy_logprobs(models.ref, seq, rc.temperature)
    columns = {**columns_of(prompts), **models.sampler.columns(ep)}
    kept = ~ep.skipped
    raw = _score_kept(models.reward, seq, tok, columns, kept).to(prompt_ids.device)  # (B,)
    pc = cfg.ppo
    scores = (
        normalize(raw, kept)
        - rc.missing_eos_penalty * (~gen.stopped).float()
        + overlong_penalty(gen.lengths, rc.max_new_tokens, pc.overlong_buffer, pc.overlong_penalty)
    )
    # an episode dropped by env.on_error: skip keeps its row (every rank keeps its batch size)
    # with no action tokens, a score of 0 and a group of its own (out of every group baseline)
    skipped = ep.skipped
    group = own_groups(group.to(skipped.device), skipped, rc.samples_per_prompt)
    raw, scores = (torch.where(skipped, torch.zeros_like(x), x) for x in (raw, scores))
    timings = Timings(
        generate=t1 - t0,
        score=time.perf_counter() - t1,
        entropy_sum=float(masked_mean(entropy, action)) * len(prompts),
        episodes=len(prompts),
        env={k: float(v) for k, v in ep.counts.items()},
    )
    exp = Experience(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response=gen.tokens,
        response_mask=gen.mask,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        scores=scores,
        raw_scores=raw,
        stopped=gen.stopped,
        group=group.to(prompt_ids.device),
        sampler_logprobs=gen.logprobs if pc.rollout_correction != "none" else None,
        action_mask=None if ep.action_mask is None else action,
        turn_rewards=None if ep.turn_rewards is None else _pad_cols(ep.turn_rewards, gen.mask),
    )
    return exp, timings


# the fields of ``Sequences`` that hold one row per episode
SEQUENCE_ROWS = ("input_ids", "attention_mask", "position_ids", "response", "response_mask")


def _score_kept(reward, seq, tokenizer, columns: dict, keep: torch.Tensor) -> torch.Tensor:
    """R_final (B,) of the rows in ``keep``, 0 elsewhere: an episode dropped by
    ``env.on_error: skip`` is never shown to the reward source (a checker would count its
    placeholder as unparsed, a server would score it). With every row dropped the batch is
    scored whole and zeroed, so that every rank still makes its reward call."""
    if bool(keep.all()) or not bool(keep.any()):
        return torch.where(keep.cpu(), reward(seq, tokenizer, columns).cpu().float(), 0.0)
    idx = keep.nonzero().squeeze(1)  # (K,)
    sub = dataclasses.replace(
        seq, **{f: getattr(seq, f)[idx] for f in SEQUENCE_ROWS}
    )  # the kept rows, same layout
    sub_cols = {k: [v[i] for i in idx.tolist()] for k, v in columns.items()}
    out = torch.zeros(len(keep))
    out[idx.cpu()] = reward(sub, tokenizer, sub_cols).cpu().float()
    return out


def own_groups(group: torch.Tensor, skipped: torch.Tensor, n: int) -> torch.Tensor:
    """Group ids with each skipped row in a group of its own, -1 - (group x n + its place): out
    of every group baseline, and traceable to the group it was sampled in (``parent_groups``)."""
    place = torch.arange(len(group), device=group.device) % n
    return torch.where(skipped, -1 - (group * n + place), group)


def skipped_rows(group: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the rows ``own_groups`` put in a group of their own (skipped episodes)."""
    return group < 0


def parent_groups(group: torch.Tensor, n: int) -> torch.Tensor:
    """The group each row was sampled in: ``own_groups`` undone for the skipped rows."""
    return torch.where(skipped_rows(group), torch.div(-1 - group, n, rounding_mode="floor"), group)


def _pad_cols(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x`` right-padded with zeros (False) to ``like``'s width."""
    return torch.nn.functional.pad(x, (0, like.shape[1] - x.shape[1]))


def collect(
    models: RolloutModels,
    prompts: list[PromptItem],
    stream: PromptStream,
    cfg: PPOConfig,
    normalize: ScoreNormalizer,
) -> tuple[Experience, Timings]:
    """Fill the experience buffer with ``episodes_per_iteration`` episodes, ``chunk_size`` at a time,
    ``samples_per_prompt`` (n) per prompt. Data-parallel: every rank reads the same prompt stream
    and generates for its own slice of each chunk's prompts, so a group never spans two ranks.
    Group ids are the prompt's place in this iteration's stream: the same on every rank.

    With ``rollout.filter_groups`` (DAPO's dynamic sampling) groups whose scores are all equal
    are set aside and whole rounds are sampled again, up to ``max_sampling_rounds``, until each
    rank holds its share of informative groups; a batch still short is filled with set-aside
    groups. Every rank runs the same number of rounds (their collectives stay in step)."""
    actor = models.learner.actor
    actor.eval()
    world, n = dist.world(), cfg.rollout.samples_per_prompt
    target = cfg.rollout.episodes_per_iteration // world  # this rank's episodes
    total, taken, kept, flat = Timings(), 0, [], []
    for _ in range(cfg.rollout.max_sampling_rounds if cfg.rollout.filter_groups else 1):
        chunks, taken = _sample_round(models, prompts, stream, cfg, normalize, taken, total)
        total.rounds += 1
        if not cfg.rollout.filter_groups:
            kept = chunks
            break
        for exp in chunks:
            good, bad = split_flat_groups(exp, n)
            kept += [good] if len(good) else []
            flat += [bad] if len(bad) else []
        short = sum(len(e) for e in kept) < target
        if dist.all_reduce_sum(torch.tensor(float(short))) == 0:  # every rank is full
            break
    actor.train()
    pad = models.tokenizer.pad_token_id
    if not cfg.rollout.filter_groups:
        return concat(kept, pad), total
    total.groups_filtered = sum(len(e) for e in flat) / n
    total.groups = total.groups_filtered + sum(len(e) for e in kept) / n
    buffer = concat(kept + flat, pad)  # informative groups first, whole groups of n rows
    total.groups_filled = max(target - sum(len(e) for e in kept), 0) / n
    return buffer.select(torch.arange(target), trim=False), total


def _sample_round(models, prompts, stream, cfg, normalize, taken: int, total: Timings):
    """One round of ``episodes_per_iteration`` episodes (this rank's share), in chunks; returns
    the chunks and the prompts taken from the stream so far (for the group ids)."""
    actor = models.learner.actor
    world, r, n = dist.world(), dist.rank(), cfg.rollout.samples_per_prompt
    width = max(len(p.prompt_ids) for p in prompts) if fixed_layout(cfg.model.dtype) else None
    chunks = []
    left = cfg.rollout.episodes_per_iteration // (world * n)  # prompts for this rank
    while left > 0:
        k = min(max(cfg.rollout.chunk_size // n, 1), left)  # prompts in this chunk
        mine = stream.take(k * world)[r * k : (r + 1) * k]
        ids = torch.arange(taken + r * k, taken + (r + 1) * k).repeat_interleave(n)  # (k n,)
        chosen = [prompts[i] for i in mine for _ in range(n)]
        with autocast(cfg.model.dtype, device_of(actor)):  # bf16-mixed: bf16 compute
            exp, t = rollout_chunk(models, chosen, ids, cfg, normalize, width)
        chunks.append(exp)
        total += t
        taken += k * world
        left -= k
    return chunks, taken


def split_flat_groups(exp: Experience, n: int) -> tuple[Experience, Experience]:
    """(the groups whose scores differ, the groups whose scores are all equal): a group of equal
    scores gives every group baseline a zero advantage, so it carries no policy gradient (DAPO,
    sec. 3.2). Rows keep their order and their layout. An episode dropped by ``env.on_error:
    skip`` goes with the group it was sampled in and takes no part in the comparison, so that
    each part holds whole groups of ``n`` rows (a batch cut at a multiple of n never cuts one);
    a group with fewer than two scored rows is flat."""
    skipped = skipped_rows(exp.group)
    _, inv = torch.unique(parent_groups(exp.group, n), return_inverse=True)
    s = torch.where(skipped, torch.nan, exp.scores.float())
    k = int(inv.max()) + 1
    hi = torch.full((k,), -torch.inf).scatter_reduce(0, inv, s.nan_to_num(-torch.inf), "amax")
    lo = torch.full((k,), torch.inf).scatter_reduce(0, inv, s.nan_to_num(torch.inf), "amin")
    flat = ~(hi > lo)[inv]  # (B,)
    return (
        exp.select(torch.nonzero(~flat).squeeze(1), trim=False),
        exp.select(torch.nonzero(flat).squeeze(1), trim=False),
    )
