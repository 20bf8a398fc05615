"""Fused RMSNorm and SwiGLU blocks (models.cpu_fused): the backward formulas against finite
differences in float64; the fp32 forward bit-identical to HF's and the fp32 gradients within the
rounding bound of their dot products against float64; what autograd keeps (the point of the
fusion); the routing; and a loaded model's training step and checkpoint."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import lm_step, loads_plain
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from rlhfkit.config import ModelConfig
from rlhfkit.models import cpu_fused, cpu_gemm, load_policy, load_tokenizer

pytestmark = pytest.mark.cpu_isa  # oneDNN's and the vector kernels differ by CPU

EPS = torch.finfo(torch.float32).eps
D, INTER = 48, 112  # hidden and intermediate sizes of the block tests


def _mlp() -> LlamaMLP:
    m = LlamaMLP(
        LlamaConfig(
            hidden_size=D, intermediate_size=INTER, num_attention_heads=4, hidden_act="silu"
        )
    )
    cpu_gemm.use_onednn(m)
    return m


def _norm() -> LlamaRMSNorm:
    m = LlamaRMSNorm(D, eps=1e-5)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
    return m


def _fused(m: nn.Module) -> nn.Module:
    f = copy.deepcopy(m)
    assert cpu_fused.fuse_blocks(f) == 1
    return f


def test_backward_formulas_match_finite_differences_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    w = torch.rand(D, dtype=torch.float64).add_(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: cpu_fused._RMSNorm.apply(x, w, 1e-5), (x, w))
    x2 = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(n, k, dtype=torch.float64).mul_(0.2).requires_grad_()
          for n, k in ((INTER, D), (INTER, D), (D, INTER))]  # fmt: skip
    assert torch.autograd.gradcheck(lambda *a: cpu_fused._SwiGLU.apply(*a, False), (x2, *ws))


def _within(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor):
    err = (got.double() - ref).abs()
    assert bool((err <= bound).all()), float((err - bound).max())


def test_fp32_swiglu_is_hfs_forward_and_gradients_within_the_rounding_bound():
    """Forward: the same ops as HF's, bit for bit. Backward: each gradient against float64 within
    (K + c) eps times the same products over absolute values (Higham 3.5), with the error of
    dL/dh = dy W_d (an H-term sum) carried into dL/dg and dL/du."""
    torch.manual_seed(1)
    hf = _mlp()
    fused = _fused(hf)
    x = torch.randn(3, 9, D, requires_grad=True)
    xf = x.detach().clone().requires_grad_()
    y, yf = hf(x), fused(xf)
    assert torch.equal(y, yf)
    dy = torch.randn_like(y)
    yf.backward(dy)
    # float64 intermediates and their absolute-value counterparts
    x2, g2 = x.detach().double().reshape(-1, D), dy.double().reshape(-1, D)
    wg, wu, wd = (m.weight.detach().double() for m in (hf.gate_proj, hf.up_proj, hf.down_proj))
    g, u = x2 @ wg.T, x2 @ wu.T
    s, sig = F.silu(g), torch.sigmoid(g)
    dsilu = sig * (1 + g * (1 - sig))
    dh = g2 @ wd
    dg, du = dh * u * dsilu, dh * s
    dh_abs = g2.abs() @ wd.abs()
    dg_abs, du_abs = dh_abs * u.abs() * dsilu.abs(), dh_abs * s.abs()
    m = x2.shape[0]
    f = fused
    _within(f.down_proj.weight.grad, g2.T @ (s * u), (m + 4) * EPS * (g2.abs().T @ (s * u).abs()))
    _within(f.gate_proj.weight.grad, dg.T @ x2, (m + D + 8) * EPS * (dg_abs.T @ x2.abs()))
    _within(f.up_proj.weight.grad, du.T @ x2, (m + D + 8) * EPS * (du_abs.T @ x2.abs()))
    dx_bound = (INTER + D + 8) * EPS * (dg_abs @ wg.abs() + du_abs @ wu.abs())
    _within(xf.grad.reshape(-1, D), dg @ wg + du @ wu, dx_bound)
    frozen = _fused(hf).requires_grad_(False)  # weights frozen: dx only, the same bits
    xz = x.detach().clone().requires_grad_()
    frozen(xz).backward(dy)
    assert torch.equal(xz.grad, xf.grad) and all(p.grad is None for p in frozen.parameters())


def test_fp32_rmsnorm_is_hfs_forward_and_gradients_within_the_rounding_bound():
    torch.manual_seed(2)
    hf = _norm()
    fused = _fused(hf)
    x = torch.randn(4, 6, D, requires_grad=True) * 3
    x.retain_grad()
    y = fused(x)
    assert torch.equal(y, hf(x.detach()))
    dy = torch.randn_like(y)
    y.backward(dy)
    xd, gd, w = x.detach().double(), dy.double(), hf.weight.detach().double()
    r = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    n, gn = xd * r, gd * w
    dx = r * (gn - n * (gn * n).mean(-1, keepdim=True))
    bound = (D + 8) * EPS * r * (gn.abs() + n.abs() * (gn * n).abs().mean(-1, keepdim=True))
    _within(x.grad, dx, bound)
    rows = xd.reshape(-1, D).shape[0]
    _within(
        fused.weight.grad,
        (gd * n).reshape(-1, D).sum(0),
        (rows + 4) * EPS * (gd.abs() * n.abs()).reshape(-1, D).sum(0),
    )


def _saved_floats(module: nn.Module, x: torch.Tensor) -> int:
    """Floats of activations autograd keeps for backward in one forward (parameters and the
    input excluded; a storage kept twice counted once)."""
    skip = {p.data_ptr() for p in module.parameters()} | {x.data_ptr()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def test_the_fused_blocks_keep_fewer_activations_for_backward():
    """Per token: the MLP keeps W_g x and W_u x (2 x INTER floats; HF's graph also keeps silu(W_g x)
    and the product), the norm keeps 1/rms (1 float; HF's also keeps the normalized x, D)."""
    torch.manual_seed(3)
    rows = 20
    x = torch.randn(rows, D, requires_grad=True)
    mlp, norm = _mlp(), _norm()
    assert _saved_floats(_fused(mlp), x) == rows * 2 * INTER
    assert _saved_floats(mlp, x) == rows * 4 * INTER
    assert _saved_floats(_fused(norm), x) == rows
    assert _saved_floats(norm, x) == rows * (D + 1)


def _counting(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name in ("_SwiGLU", "_RMSNorm"):
        fn = getattr(cpu_fused, name)
        orig = fn.apply
        monkeypatch.setattr(fn, "apply", lambda *a, _o=orig, _n=name: calls.append(_n) or _o(*a))
    return calls


def test_only_fp32_cpu_training_takes_the_fused_path(monkeypatch):
    """Without autograd, in bf16, under autocast, or with an adapter on the MLP's layers, the
    module runs HF's forward (and gives HF's result)."""
    from peft import LoraConfig, get_peft_model

    calls = _counting(monkeypatch)
    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    hf = LlamaForCausalLM(cfg)
    model = copy.deepcopy(hf)
    assert cpu_fused.fuse_blocks(model) == 4  # 2 norms + 1 MLP per layer, the final norm
    ids = torch.randint(0, 50, (2, 7))
    model(ids).logits.sum().backward()
    assert calls.count("_SwiGLU") == 1 and calls.count("_RMSNorm") == 3
    calls.clear()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hf(ids).logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids).logits.sum().backward()
    model16, hf16 = copy.deepcopy(model).bfloat16(), copy.deepcopy(hf).bfloat16()
    assert torch.equal(model16(ids).logits, hf16(ids).logits)
    assert calls == []
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["up_proj"]))
    lora(ids).logits.sum().backward()
    # the LoRA'd MLP runs HF's forward; of the norms only the final one sees a gradient now
    # (the frozen embeddings and attention feed the others)
    assert calls == ["_RMSNorm"]
    cpu_fused.unfuse_blocks(model)
    assert {type(m) for m in model.modules()} == {type(m) for m in hf.modules()}


@pytest.fixture(scope="module")
def tok(tiny_lm):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_lm)))


def test_a_loaded_models_training_step_equals_hfs_and_saves_plain(tiny_lm, tok, tmp_path):
    """``model.cpu_blocks``: fused by default, HF's when told; one step's loss and gradients equal
    to fp32 rounding; the checkpoint loads with plain from_pretrained as HF's classes."""
    a = load_policy(ModelConfig(name_or_path=str(tiny_lm)), tok)
    b = load_policy(ModelConfig(name_or_path=str(tiny_lm), cpu_blocks="hf"), tok)
    assert sum(type(m) in cpu_fused._SWAPPED.values() for m in a.modules()) == 7
    assert not any(type(m) in cpu_fused._SWAPPED.values() for m in b.modules())
    ids = torch.tensor([tok("copy : red blue : red blue")["input_ids"]] * 3)
    (la, ga), (lb, gb) = lm_step((a, b), ids)
    assert torch.equal(la, lb)  # the forward is HF's, bit for bit
    # a few 32-wide dot products and 2 layers deep: the same allowance as test_cpu_gemm's
    assert float((ga - gb).abs().max()) <= 1024 * EPS * float(gb.abs().max())
    kinds = {type(m) for m in loads_plain(a, tmp_path / "ck").modules()}
    assert not kinds & set(cpu_fused._SWAPPED.values()) and cpu_gemm.OneDNNLinear not in kinds
