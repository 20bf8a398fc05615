"""Padding-free forwards (``models.packing``, ``model.padding_free``): the packed forward's
logprobs, entropies and gradients against the padded forward and a float64 reference."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from rlhfkit.models.packing import PACKED, hf_config, packable, packed_attention, rows_of
from rlhfkit.rollout.forward import join, policy_logprobs

CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,  # biases on q, k, v
    "qwen3": Qwen3Config,  # q and k RMSNorms
}
EPS32 = torch.finfo(torch.float32).eps


def tiny(kind: str):
    torch.manual_seed(0)
    cfg = CONFIGS[kind](
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as SmolLM2's
        head_dim=16,
        max_position_embeddings=128,
        attn_implementation="sdpa",
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def batch(seed: int = 0):
    """Left-padded prompts and right-padded responses of mixed lengths (one response of length 1,
    one prompt of length 1, one row with no padding at all)."""
    g = torch.Generator().manual_seed(seed)
    plen, rlen = torch.tensor([7, 3, 5, 1, 6]), torch.tensor([9, 2, 5, 1, 7])
    b, p, t = 5, 7, 9
    pm = torch.arange(p)[None] >= (p - plen)[:, None]
    rm = torch.arange(t)[None] < rlen[:, None]
    pid = torch.where(pm, torch.randint(1, 97, (b, p), generator=g), 0)
    rid = torch.where(rm, torch.randint(1, 97, (b, t), generator=g), 0)
    return pid, pm, rid, rm


def outputs(model, packed: bool, temperature: float = 0.7):
    """logp, entropy (B, T) and the gradients of sum((w logp + entropy) * mask)."""
    pid, pm, rid, rm = batch()
    model.zero_grad(set_to_none=True)
    seq = join(pid, pm, rid, rm, packed=packed)
    lp, ent = policy_logprobs(model, seq, temperature, with_entropy=True)
    w = torch.randn(rm.shape, generator=torch.Generator().manual_seed(1)).to(lp.dtype)
    ((lp * w + ent) * rm).sum().backward()
    return lp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()], rm


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_packed_forward_matches_padded_and_float64(kind):
    model = tiny(kind)
    assert packable(model)
    lp_pad, ent_pad, g_pad, rm = outputs(model, packed=False)
    lp, ent, g, _ = outputs(model, packed=True)
    lp64, ent64, g64, _ = outputs(copy.deepcopy(model).double(), packed=False)
    assert model.config._attn_implementation == "sdpa"  # restored after the packed forward
    # both fp32 forwards sit within fp32 rounding of the float64 one, in eps of the outputs'
    # magnitude: measured at most 3.3 eps for logprobs and entropies and 5.5 eps for gradients
    # on all three families (both forwards alike); 32 eps leaves room for other CPUs' kernels,
    # while a row seeing another row or a position off by one is off by orders more
    for x, x_pad, x64 in ((lp, lp_pad, lp64), (ent, ent_pad, ent64)):
        tol = 32 * EPS32 * max(1.0, float(x64[rm].abs().max()))
        assert float((x.double() - x64)[rm].abs().max()) <= tol
        assert float((x_pad.double() - x64)[rm].abs().max()) <= tol
        assert float(x[~rm].abs().max()) == 0.0  # after a response's end: 0, as the sampler's
    for a, a_pad, a64 in zip(g, g_pad, g64, strict=True):
        tol = 32 * EPS32 * max(1.0, float(a64.abs().max()))
        assert float((a.double() - a64).abs().max()) <= tol
        assert float((a_pad.double() - a64).abs().max()) <= tol


def test_rows_layout_round_trips():
    lengths = torch.tensor([3, 1, 4])
    r = rows_of(lengths)
    assert (r.rows, r.width) == (3, 4)
    packed = torch.arange(8) + 100  # tokens 100..107: rows [100..102], [103], [104..107]
    cells = packed[r.gather].view(3, 4)
    assert cells[0, :3].tolist() == [100, 101, 102] and cells[1, 0] == 103
    assert cells[2].tolist() == [104, 105, 106, 107]
    assert torch.equal(cells.flatten()[r.scatter], packed)  # back to the packed order


def test_rows_do_not_see_each_other():
    """A token in one row changes no other row's logprobs: attention stays within rows."""
    model = tiny("llama")
    pid, pm, rid, rm = batch()
    with torch.no_grad():
        before, _ = policy_logprobs(model, join(pid, pm, rid, rm, packed=True), 1.0)
        rid2 = rid.clone()
        rid2[0, 3] = (rid2[0, 3] % 96) + 1  # row 0's 4th response token
        after, _ = policy_logprobs(model, join(pid, pm, rid2, rm, packed=True), 1.0)
    assert torch.equal(before[1:], after[1:])
    assert not torch.equal(before[0, 4:], after[0, 4:])  # row 0 itself does see it


def test_other_threads_and_unpacked_forwards_are_unchanged():
    """While one forward runs packed, another thread's forward on the same model is HF's own
    (the row layout is per thread); after an error inside, the config is restored."""
    model = tiny("llama")
    pid, pm, rid, rm = batch()
    seq = join(pid, pm, rid, rm)
    with torch.no_grad():
        expect, _ = policy_logprobs(model, seq, 1.0)
        got = {}
        with packed_attention(model, torch.tensor([4, 4])):
            assert model.config._attn_implementation == PACKED
            th = threading.Thread(target=lambda: got.update(lp=policy_logprobs(model, seq, 1.0)[0]))
            th.start()
            th.join()
        assert torch.equal(got["lp"], expect)
    with pytest.raises(RuntimeError, match="inside"), packed_attention(model, torch.tensor([2])):
        raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"


def test_unpackable_models_run_padded():
    model = tiny("llama")
    model.config._attn_implementation = "eager"
    assert not packable(model)
    pid, pm, rid, rm = batch()
    with torch.no_grad():
        lp_packed_flag, _ = policy_logprobs(model, join(pid, pm, rid, rm, packed=True), 1.0)
        lp, _ = policy_logprobs(model, join(pid, pm, rid, rm), 1.0)
    assert torch.equal(lp_packed_flag, lp)  # the padded path, garbage after the end included
    assert float(lp[~rm].abs().max()) > 0


def test_wrappers_reach_the_config():
    """DDP-style (``.module``) and PEFT wrappers: the HF config under them is the one toggled."""
    peft = pytest.importorskip("peft")
    model = tiny("llama")
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    )

    class Wrapper(torch.nn.Module):  # what DDP and FSDP look like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kw):
            return self.module(**kw)

    for m in (lora, Wrapper(lora)):
        assert hf_config(m) is model.config and packable(m)
    pid, pm, rid, rm = batch()
    with torch.no_grad():
        a, _ = policy_logprobs(Wrapper(lora), join(pid, pm, rid, rm, packed=True), 1.0)
        b, _ = policy_logprobs(lora, join(pid, pm, rid, rm), 1.0)
    torch.testing.assert_close(a[rm], b[rm], rtol=0, atol=64 * EPS32 * float(b[rm].abs().max()))


def test_a_hole_before_a_response_token_is_an_error():
    model = tiny("llama")
    pid, pm, rid, rm = batch()
    rm = rm.clone()
    rm[0, 2] = False  # row 0: a padding column inside its response
    with pytest.raises(ValueError, match="packed forward"):
        policy_logprobs(model, join(pid, pm, rid, rm, packed=True), 1.0)


def test_a_batch_without_padding_runs_padded(monkeypatch):
    """Below ``PACK_MIN_PADDING`` the gathers would cost more than the padding they remove."""
    from rlhfkit.models import packing
    from rlhfkit.rollout.forward import PACK_MIN_PADDING, padding_share

    model = tiny("llama")
    layouts: list = []
    rows_of = packing.rows_of
    monkeypatch.setattr(packing, "rows_of", lambda n: layouts.append(n) or rows_of(n))
    pid, pm, rid, rm = batch()
    full = join(pid[:1], pm[:1], rid[:1], rm[:1], packed=True)  # row 0 has no padding
    mixed = join(pid, pm, rid, rm, packed=True)
    assert padding_share(full) == 0.0 and padding_share(mixed) >= PACK_MIN_PADDING
    with torch.no_grad():
        policy_logprobs(model, full, 1.0)
        assert layouts == []
        policy_logprobs(model, mixed, 1.0)
    assert len(layouts) == 1


def test_scalar_models_packed_match_padded():
    """A critic's V(s_t) and an RM's score (``PerTokenScalar``) from one packed row equal the
    padded forward's up to fp32 rounding, gradients included; 0 at padding columns."""
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.models import PerTokenScalar
    from rlhfkit.rollout.forward import critic_values, reward_scores

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                      attn_implementation="sdpa")  # fmt: skip
    scalar = PerTokenScalar(AutoModelForSequenceClassification.from_config(cfg))
    assert packable(scalar)
    pid, pm, rid, rm = batch()
    got = {}
    for packed in (False, True):
        scalar.zero_grad(set_to_none=True)
        seq = join(pid, pm, rid, rm, packed=packed)
        v, r = critic_values(scalar, seq), reward_scores(scalar, seq)
        ((v * rm).sum() + r.sum()).backward()
        got[packed] = (v.detach(), r.detach(), [p.grad.clone() for p in scalar.parameters()])
    (v0, r0, g0), (v1, r1, g1) = got[False], got[True]
    p = pid.shape[1]
    real = torch.cat([pm, rm], 1)[:, p - 1 : p - 1 + rm.shape[1]]  # the states that are tokens
    assert bool((real & ~rm).any())  # the state after a response's last token is one of them
    tol = 64 * EPS32 * max(1.0, float(v0[real].abs().max()), float(r0.abs().max()))
    torch.testing.assert_close(v1[real], v0[real], rtol=0, atol=tol)
    torch.testing.assert_close(r1, r0, rtol=0, atol=tol)
    assert float(v1[~real].abs().max()) == 0.0  # padding columns: 0
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=64 * EPS32 * max(1.0, float(b.abs().max())))


def test_activation_checkpointing_runs_padded():
    """A checkpointed layer recomputes its forward in backward, outside the packed context: the
    model runs padded then, and its gradients stay the padded forward's."""
    model = tiny("llama")
    _, _, g_plain, _ = outputs(model, packed=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert not packable(model)
    _, _, g_ckpt, _ = outputs(model, packed=True)
    for a, b in zip(g_ckpt, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=64 * EPS32 * max(1.0, float(b.abs().max())))


def test_two_threads_packed_on_one_model():
    """Thread A enters a packed forward, thread B enters one, A leaves: B's forward still runs
    packed (the config is restored when the last one leaves, not the first)."""
    model = tiny("llama")
    pid, pm, rid, rm = batch()
    seq = join(pid, pm, rid, rm, packed=True)
    with torch.no_grad():
        want, _ = policy_logprobs(model, seq, 1.0)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    got = {}

    def a():
        with packed_attention(model, torch.tensor([3])):
            a_in.set()
            b_in.wait()
        a_out.set()

    def b():
        a_in.wait()
        real = seq.attention_mask.bool()
        with torch.no_grad(), packed_attention(model, real.sum(1)):
            b_in.set()
            a_out.wait()  # A has left: B's forward runs after that
            assert model.config._attn_implementation == PACKED
            got["ok"] = True

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {"ok": True} and model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        again, _ = policy_logprobs(model, seq, 1.0)
    assert torch.equal(again, want)
