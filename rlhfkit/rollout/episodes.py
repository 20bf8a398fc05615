"""Multi-turn episodes: the model and an environment take turns, batched over the chunk.

    reset(row) --chat template--> prompt ids
    turn 1..max_turns:  every live episode generates in one batch (``sampling.generate``),
                        the environments step concurrently (a thread pool), each observation
                        is rendered by the chat template and appended as a delta
    -> one row per episode: [prompt | model turn | env turn | model turn | ...]

The model's tokens are kept exactly as sampled (never decoded and re-tokenized); the
environment's tokens are the chat template's rendering of its turn, tokenized on their own.
``action_mask`` marks the model's tokens: the only ones the losses, the KL and the entropy see.

An episode ends when the environment says done, when a model turn runs out of tokens without
EOS (truncated: the environment still scores that turn), after ``rollout.max_turns`` turns, or
when the next observation would pass ``rollout.max_total_tokens`` (truncated, counted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhfkit.data.build import PromptItem
from rlhfkit.data.tokenize import _plain, encode_prompt, pad_left, uses_chat_template
from rlhfkit.envs import EnvError, as_messages, as_step, make_factory, parser_for
from rlhfkit.rollout.engines import HFEngine
from rlhfkit.rollout.sampling import Generation, generate

# markers of a stand-in conversation: the delta of an observation is what the template writes
# after the assistant's end-of-turn token
_USER, _ASSISTANT = "rlhfkit-user-turn-marker", "rlhfkit-assistant-turn-marker"


@dataclass
class EnvSettings:
    """What the episode loop needs from the config (``env.*`` and ``rollout.*``)."""

    factory: Any  # () -> env
    name: str  # for errors: the factory's 'module:function' or the tool list
    max_turns: int
    max_new_tokens: int  # per turn
    max_total_tokens: int  # the whole trajectory after the prompt
    max_prompt_length: int
    on_error: str = "raise"  # or "skip"
    timeout: float = 60.0  # seconds for one reset / step
    threads: int = 8
    reward_at: str = "end"  # or "turn": each step's reward at the last token of its model turn
    max_observation_chars: int = 2000  # longer observation messages are cut (0 = never)


@dataclass
class Episodes:
    prompt_ids: torch.Tensor  # (B, P) left-padded starts
    prompt_mask: torch.Tensor  # (B, P)
    gen: Generation  # (B, T) the whole trajectory after the prompt, model and env tokens
    action_mask: torch.Tensor  # (B, T) bool: the model's own tokens
    env_reward: list[float]  # (B,) the sum of each episode's step rewards (0 with reward_at: turn)
    final_text: list[str]  # (B,) the model's last turn, decoded
    skipped: torch.Tensor  # (B,) bool: dropped by env.on_error: skip (no tokens to train on)
    counts: dict[str, float] = field(default_factory=dict)  # summed over the episodes
    # (B, T) with env.reward_at: turn, each step's reward at the last token of the model turn
    # it answered (docs/algorithms.md, "Multi-turn episodes"); else None
    turn_rewards: torch.Tensor | None = None
    envs: list = field(default_factory=list)  # (B,) each episode's environment object


def encode_start(tokenizer, start, tools: list[dict] | None, max_len: int) -> list[int]:
    """The prompt ids of an episode's start (a string or messages), with the env's tools
    rendered by the chat template; cut from the left to ``max_len`` like the data's prompts."""
    return encode_prompt(tokenizer, start, tools or None)[-max_len:]


def observation_ids(tokenizer, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """The tokens the chat template writes for the environment's turn after the model's turn
    (which ended on EOS), through the header of the model's next turn."""
    if not uses_chat_template(tokenizer):
        return tokenizer(_plain(messages), add_special_tokens=False)["input_ids"]
    base = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT}]
    full = tokenizer.apply_chat_template(
        base + messages, tools=tools or None, add_generation_prompt=True, tokenize=False
    )
    at, eos = full.rfind(_ASSISTANT), tokenizer.eos_token
    end = full.find(eos, at) if at >= 0 else -1
    if end < 0:
        raise EnvError(
            f"the chat template does not end an assistant turn with the EOS token {eos!r}; "
            "cannot append the environment's turn after the model's"
        )
    return tokenizer(full[end + len(eos) :], add_special_tokens=False)["input_ids"]


class _Episode:
    """One episode's growing trajectory."""

    def __init__(self, env, prompt: PromptItem, start_ids: list[int]):
        self.env, self.prompt, self.start = env, prompt, start_ids
        self.tokens: list[int] = []
        self.action: list[bool] = []
        self.logprobs: list[float] = []
        self.entropy: list[float] = []
        self.reward, self.turns, self.final_text = 0.0, 0, ""
        self.step_rewards: list[tuple[int, float]] = []  # (last token of the turn, reward)
        self.done = self.stopped = self.truncated = self.skipped = False

    def where(self, name: str, what: str) -> str:
        text = self.prompt.prompt
        loc = f" ({self.prompt.where})" if self.prompt.where else ""
        return f"env {name}: {what} for the prompt{loc} {str(text)[:60]!r}"


def _run(pool: ThreadPoolExecutor, calls: list, timeout: float) -> list[tuple[Any, Exception]]:
    """Run ``(fn, arg)`` pairs concurrently; (result, None) or (None, the exception) each. A
    call past ``timeout`` seconds gives a ``TimeoutError``."""
    futures = [pool.submit(fn, arg) for fn, arg in calls]
    deadline = time.monotonic() + timeout  # they run concurrently: one deadline for all
    out = []
    for f in futures:
        try:
            out.append((f.result(timeout=max(deadline - time.monotonic(), 0.0)), None))
        except FutureTimeout:
            out.append((None, TimeoutError(f"no answer within {timeout:g} s (env.timeout)")))
        except Exception as e:
            out.append((None, e))
    return out


def _fail(ep: _Episode, settings: EnvSettings, what: str, err: Exception, counts: dict) -> None:
    """An environment that raised or timed out: an error naming the env and the prompt, or,
    with ``env.on_error: skip``, the episode dropped and counted."""
    if settings.on_error != "skip":
        if isinstance(err, EnvError):  # ours: it already names the env, the step and the prompt
            raise err
        raise EnvError(ep.where(settings.name, what) + f": {type(err).__name__}: {err}") from err
    ep.done = ep.skipped = True
    counts["skipped"] += 1


@torch.no_grad()
def run_episodes(
    actor,
    tokenizer,
    prompts: list[PromptItem],
    settings: EnvSettings,
    sample: dict,
    prompt_width: int | None = None,
    engine=generate,
) -> Episodes:
    """Play one episode per row of ``prompts``, each model turn sampled by ``engine``
    (``rollout.engine``; called as ``generate`` is). ``sample``: ``generate``'s sampling keywords
    (eos_id, pad_id, temperature, top_k, top_p, stop_sequences, compile_decode).
    ``prompt_width`` (a fixed layout below fp32): starts padded to it, trajectories to
    ``max_total_tokens``."""
    device = next(actor.parameters()).device
    counts = {"turns": 0.0, "truncated": 0.0, "skipped": 0.0, "observations_cut": 0.0}
    eps = []
    # not a `with` block: its exit waits for every thread, so a step past its timeout would
    # hold the run; the error is raised at once and the stuck thread is left to finish
    pool = ThreadPoolExecutor(settings.threads, thread_name_prefix="rlhfkit-env")
    try:
        envs = [settings.factory() for _ in prompts]
        rows = [{"prompt": p.prompt, **p.columns} for p in prompts]
        starts = _run(
            pool, [(e.reset, r) for e, r in zip(envs, rows, strict=True)], settings.timeout
        )
        for env, p, (start, err) in zip(envs, prompts, starts, strict=True):
            ep = _Episode(env, p, [])
            eps.append(ep)
            if err is None:
                try:
                    as_messages(start, ep.where(settings.name, "reset"))
                    tools = getattr(env, "tools", None)
                    ep.start = encode_start(tokenizer, start, tools, settings.max_prompt_length)
                except EnvError as e:
                    err = e
            if err is not None:
                _fail(ep, settings, "reset", err, counts)
                ep.start = [tokenizer.pad_token_id]  # a placeholder row, masked out
        for _turn in range(settings.max_turns):
            live = [ep for ep in eps if not ep.done]
            if not live:
                break
            _model_turn(actor, tokenizer, live, settings, sample, device, engine)
            _env_turn(pool, tokenizer, live, settings, counts)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    for ep in eps:
        for k, v in getattr(ep.env, "counts", {}).items():
            counts[k] = counts.get(k, 0.0) + v
        _close(ep.env)
    return _batch(eps, settings, counts, tokenizer.pad_token_id, device, prompt_width)


def _close(env) -> None:
    """An environment with ``close`` (a session with a server) is closed when its episode is
    over; a failure to close loses nothing of the episode, so it is not raised."""
    with contextlib.suppress(Exception):
        getattr(env, "close", lambda: None)()


def _model_turn(actor, tokenizer, live: list[_Episode], settings, sample, device, engine) -> None:
    """Every live episode samples its next turn, in one batch."""
    budget = [settings.max_total_tokens - len(ep.tokens) for ep in live]
    ids, mask = pad_left([ep.start + ep.tokens for ep in live], tokenizer.pad_token_id, device)
    per_turn = min(settings.max_new_tokens, max(budget))
    sample = {k: v for k, v in sample.items() if k != "max_new_tokens"}  # per turn, from settings
    gen = engine(actor, ids, mask, max_new_tokens=per_turn, **sample)
    for i, ep in enumerate(live):
        n = min(int(gen.lengths[i]), budget[i])  # a row past its total budget is cut there
        toks = gen.tokens[i, :n].tolist()
        ep.tokens += toks
        ep.action += [True] * n
        ep.logprobs += gen.logprobs[i, :n].tolist()
        ep.entropy += gen.entropy[i, :n].tolist()
        ep.stopped = bool(gen.stopped[i]) and n == int(gen.lengths[i])
        ep.turns += 1
        ep.final_text = tokenizer.decode(toks, skip_special_tokens=True)


def _env_turn(pool, tokenizer, live: list[_Episode], settings, counts) -> None:
    """Every live environment answers the model's turn, concurrently; observations are
    appended as deltas, or end the episode."""
    results = _run(pool, [(ep.env.step, ep.final_text) for ep in live], settings.timeout)
    for ep, (res, err) in zip(live, results, strict=True):
        counts["turns"] += 1
        what = f"step {ep.turns}"
        if err is None:
            try:
                obs, reward, done = as_step(res, ep.where(settings.name, what))
            except EnvError as e:
                err = e
        if err is not None:
            _fail(ep, settings, what, err, counts)
            continue
        ep.reward += reward
        ep.step_rewards.append((len(ep.tokens) - 1, reward))  # the turn's last token
        out_of_turns = ep.turns >= settings.max_turns
        if done or obs is None or not ep.stopped or out_of_turns:
            ep.done = True
            ep.truncated = not done and obs is not None
            ep.stopped = ep.stopped and done
            counts["truncated"] += ep.truncated
            continue
        obs = cap_observation(obs, settings.max_observation_chars, counts)
        delta = observation_ids(tokenizer, obs, getattr(ep.env, "tools", None))
        if len(ep.tokens) + len(delta) >= settings.max_total_tokens:  # no room for a reply
            ep.done, ep.truncated, ep.stopped = True, True, False
            counts["truncated"] += 1
            continue
        ep.tokens += delta
        ep.action += [False] * len(delta)
        ep.logprobs += [0.0] * len(delta)
        ep.entropy += [0.0] * len(delta)


def cap_observation(messages: list[dict], cap: int, counts: dict) -> list[dict]:
    """Each message's content cut to ``cap`` characters with a marker that says how much was
    cut (``env.max_observation_chars``; 0 = never), counted in ``counts["observations_cut"]``:
    a tool that returns a page of text would otherwise end the episode as truncated, and the
    model would never read it."""
    out = []
    for m in messages:
        text = m["content"]
        if cap and len(text) > cap:
            counts["observations_cut"] += 1
            m = {**m, "content": text[:cap] + f"... [cut {len(text) - cap} characters]"}
        out.append(m)
    return out


def _batch(eps, settings, counts, pad_id, device, prompt_width) -> Episodes:
    prompt_ids, prompt_mask = pad_left([ep.start for ep in eps], pad_id, device, prompt_width)
    width = settings.max_total_tokens if prompt_width else max(len(ep.tokens) for ep in eps)
    width = max(width, 1)
    b = len(eps)
    tokens = torch.full((b, width), pad_id, dtype=torch.long)
    action = torch.zeros(b, width, dtype=torch.bool)
    logprobs, entropy = torch.zeros(b, width), torch.zeros(b, width)
    lengths = torch.zeros(b, dtype=torch.long)
    for i, ep in enumerate(eps):
        if ep.skipped:  # nothing of it is trained on (no action tokens)
            continue
        n = len(ep.tokens)
        tokens[i, :n] = torch.tensor(ep.tokens, dtype=torch.long)
        action[i, :n] = torch.tensor(ep.action)
        logprobs[i, :n] = torch.tensor(ep.logprobs)
        entropy[i, :n] = torch.tensor(ep.entropy)
        lengths[i] = n
    stopped = torch.tensor([ep.stopped for ep in eps])
    gen = Generation(
        tokens.to(device), lengths.to(device), stopped.to(device), logprobs.to(device),
        entropy.to(device),
    )  # fmt: skip
    per_turn = settings.reward_at == "turn"
    turn_rewards = None
    if per_turn:
        turn_rewards = torch.zeros(b, width)
        for i, ep in enumerate(eps):
            for pos, r in ep.step_rewards if not ep.skipped else []:
                turn_rewards[i, pos] += r
        turn_rewards = turn_rewards.to(device)
    return Episodes(
        prompt_ids,
        prompt_mask,
        gen,
        action.to(device),
        [0.0 if per_turn else ep.reward for ep in eps],
        [ep.final_text for ep in eps],
        torch.tensor([ep.skipped for ep in eps], device=device),
        counts,
        turn_rewards,
        [getattr(ep.env, "instance", ep.env) for ep in eps],  # an adapter's wrapped object
    )


class MultiTurn:
    """The rollout's sampler with an environment (``env.factory`` or ``env.tools``)."""

    provides = ("env_reward", "final_response", "environments")  # see ``columns``

    def __init__(self, settings: EnvSettings, engine=None):
        self.settings = settings
        self.engine = engine or HFEngine()  # rollout.engine: samples each model turn

    def __call__(self, actor, tokenizer, prompts, sample: dict, prompt_width) -> Episodes:
        width = self.settings.max_prompt_length if prompt_width is not None else None
        self.engine.sync(actor)  # once: every turn of these episodes samples from one version
        return run_episodes(actor, tokenizer, prompts, self.settings, sample, width, self.engine)

    def columns(self, episodes: Episodes) -> dict[str, list]:
        """What the reward sources may read besides the row's columns: the episode's summed
        environment reward (``rlhfkit.envs:env_reward``), the model's final turn, and the
        environment objects (a TRL-style class's instance, as TRL's reward functions get it)."""
        return {
            "env_reward": episodes.env_reward,
            "final_response": episodes.final_text,
            "environments": episodes.envs,
        }


def multi_turn(env_cfg, max_turns: int, max_new_tokens: int, max_total_tokens: int,
               max_prompt_length: int, chat_template: str | None = None,
               engine=None) -> MultiTurn:  # fmt: skip
    """The sampler of a config's ``env`` section (``env.factory`` or ``env.tools``): the
    settings that ``EnvConfig`` and ``EnvSettings`` share are taken by name. ``chat_template``:
    the policy tokenizer's, from which ``env.tool_parser: auto`` picks the tool-call format."""
    parser = parser_for(chat_template, env_cfg.tool_parser)
    factory, name = make_factory(env_cfg, parser)
    shared = {
        f.name: getattr(env_cfg, f.name)
        for f in dataclasses.fields(EnvSettings)
        if f.name != "factory" and hasattr(env_cfg, f.name)  # env.factory is the spec string
    }
    return MultiTurn(
        EnvSettings(
            factory=factory,
            name=name,
            max_turns=max_turns,
            max_new_tokens=max_new_tokens,
            max_total_tokens=max_total_tokens,
            max_prompt_length=max_prompt_length,
            **shared,
        ),
        engine,
    )
