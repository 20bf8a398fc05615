"""oneDNN linear layers (models.cpu_gemm): the three products of a linear layer against float64,
within the fp32 bound of a K-term dot product; the routing (which calls reach oneDNN, which fall
back to F.linear exactly); and a whole model and its training step equal to torch's path."""

import time

import pytest
import torch
import torch.nn.functional as F
from conftest import lm_step, loads_plain
from torch import nn

from rlhfkit.config import ModelConfig
from rlhfkit.models import cpu_gemm, load_policy, load_tokenizer

pytestmark = [
    pytest.mark.skipif(not cpu_gemm.available(), reason="torch build without oneDNN"),
    pytest.mark.cpu_isa,  # oneDNN picks its kernels by CPU: run again capped at AVX2
]

EPS = torch.finfo(torch.float32).eps


def _bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|fl(a @ b) - a @ b| <= K eps |a| @ |b| elementwise (Higham, Accuracy and Stability, 3.5),
    for float64 a (M, K) and b (K, N); plus one rounding of the result."""
    k = a.shape[-1]
    return (k + 1) * EPS * (a.abs() @ b.abs())


def _check(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor, extra: torch.Tensor | None = None):
    ref = a @ b + (0 if extra is None else extra)
    err = (got.double() - ref).abs()
    bound = _bound(a, b) + (0 if extra is None else 2 * EPS * extra.abs())
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize(
    "shape,n,bias",
    [((7, 13), 5, True), ((3, 4, 16), 1, False), ((2, 576), 3000, False), ((2, 5, 8), 3, True)],
)
def test_forward_and_both_backward_products_within_the_fp32_bound(shape, n, bias):
    torch.manual_seed(0)
    k = shape[-1]
    layer = nn.Linear(k, n, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    y = cpu_gemm.linear(x, layer.weight, layer.bias)
    g = torch.randn_like(y)
    y.backward(g)
    x2, w = x.detach().double().reshape(-1, k), layer.weight.detach().double()
    g2 = g.double().reshape(-1, n)
    b = layer.bias.detach().double() if bias else None
    assert y.shape == (*shape[:-1], n)
    _check(y.reshape(-1, n), x2, w.T, b)
    _check(x.grad.reshape(-1, k), g2, w)  # dx = dy W
    _check(layer.weight.grad, g2.T, x2)  # dW = dy^T x
    if bias:
        torch.testing.assert_close(layer.bias.grad.double(), g2.sum(0), rtol=0, atol=n * 8 * EPS)


def test_strided_inputs_and_gradients():
    torch.manual_seed(1)
    layer = nn.Linear(16, 8)
    base = torch.randn(4, 10, 16)
    for x in (base[:, 2:7], torch.randn(16, 6).t(), base[:, ::2]):
        x = x.detach().requires_grad_(True)
        y = cpu_gemm.linear(x, layer.weight, layer.bias)
        _check(y.reshape(-1, 8), x.detach().double().reshape(-1, 16), layer.weight.double().T,
               layer.bias.double())  # fmt: skip
        y.sum().backward()  # an expanded (stride 0) gradient
        ones = torch.ones(y.numel() // 8, 8, dtype=torch.float64)
        _check(x.grad.reshape(-1, 16), ones, layer.weight.detach().double())


def _counting(monkeypatch) -> list[int]:
    calls: list[int] = []
    op = cpu_gemm._OP

    def counted(*args):
        calls.append(1)
        return op(*args)

    monkeypatch.setattr(cpu_gemm, "_OP", counted)
    return calls


def test_fp32_cpu_calls_reach_onednn_and_others_fall_back_exactly(monkeypatch):
    calls = _counting(monkeypatch)
    torch.manual_seed(2)
    layer = nn.Linear(8, 4)
    cpu_gemm.use_onednn(layer)
    assert isinstance(layer, nn.Linear) and type(layer) is cpu_gemm.OneDNNLinear
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()
    assert len(calls) == 3  # forward, dx, dW
    calls.clear()
    with torch.no_grad():
        layer(x)
    assert len(calls) == 1
    calls.clear()
    # bf16 weights, bf16 autocast and an empty batch take F.linear, bit for bit
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        want = F.linear(x, layer.weight, layer.bias)
    assert torch.equal(got, want) and got.dtype == torch.bfloat16
    lb = nn.Linear(8, 4).to(torch.bfloat16)
    cpu_gemm.use_onednn(lb)
    xb = x.detach().to(torch.bfloat16)
    assert torch.equal(lb(xb), F.linear(xb, lb.weight, lb.bias))
    assert layer(torch.randn(0, 8)).shape == (0, 4)
    assert calls == []
    cpu_gemm.use_torch(layer)
    assert type(layer) is nn.Linear


@pytest.fixture(scope="module")
def tok(tiny_lm):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_lm)))


def test_the_loaded_model_uses_onednn_by_default_and_torch_when_told(tiny_lm, tok):
    on = load_policy(ModelConfig(name_or_path=str(tiny_lm)), tok)
    off = load_policy(ModelConfig(name_or_path=str(tiny_lm), cpu_gemm="torch"), tok)
    kinds_on = {type(m) for m in on.modules() if isinstance(m, nn.Linear)}
    kinds_off = {type(m) for m in off.modules() if isinstance(m, nn.Linear)}
    assert kinds_on == {cpu_gemm.OneDNNLinear} and kinds_off == {nn.Linear}
    assert on.state_dict().keys() == off.state_dict().keys()


def test_a_training_step_equals_torchs_path(tiny_lm, tok, tmp_path):
    """Loss, gradients and the saved checkpoint of one SGD step: oneDNN vs MKL, to fp32 rounding;
    the checkpoint loads with plain from_pretrained as plain nn.Linear layers."""
    cfg = ModelConfig(name_or_path=str(tiny_lm))
    a = load_policy(cfg, tok)
    b = load_policy(ModelConfig(name_or_path=str(tiny_lm), cpu_gemm="torch"), tok)
    ids = torch.tensor([tok("copy : red blue : red blue")["input_ids"]] * 3)
    (la, ga), (lb, gb) = lm_step((a, b), ids)
    # logits of magnitude ~1-10 through a few layers of 32-wide products: a few hundred fp32 eps
    torch.testing.assert_close(la, lb, rtol=256 * EPS, atol=0)
    scale = float(gb.abs().max())
    assert float((ga - gb).abs().max()) <= 1024 * EPS * scale
    plain = loads_plain(a, tmp_path / "ck")
    assert {type(m) for m in plain.modules() if isinstance(m, nn.Linear)} == {nn.Linear}


def _reorders(monkeypatch) -> list[tuple]:
    made: list[tuple] = []
    reorder = cpu_gemm._REORDER

    def counted(w, batch):
        made.append(tuple(w.shape))
        return reorder(w, batch)

    monkeypatch.setattr(cpu_gemm, "_REORDER", counted)
    return made


@pytest.mark.parametrize("shape,bias", [((40, 24), True), ((24, 72), False), ((130, 64), False)])
def test_packed_weights_give_the_plain_weights_bits(monkeypatch, shape, bias):
    """Inside ``packed_weights`` a no-grad forward equals the plain weight's bit for bit, at
    every row count (one row takes the plain weight); each layer is packed once per scope and
    the copies are dropped when the scope closes."""
    made = _reorders(monkeypatch)
    torch.manual_seed(3)
    layer = nn.Linear(shape[1], shape[0], bias=bias)
    cpu_gemm.use_onednn(layer)
    xs = [torch.randn(m, shape[1]) for m in [*range(1, 34), 64, 257]] + [
        torch.randn(3, 5, shape[1])
    ]
    with torch.no_grad():
        plain = [layer(x) for x in xs]
        with cpu_gemm.packed_weights():
            with cpu_gemm.packed_weights():  # nested scopes share the copies
                packed = [layer(x) for x in xs]
            assert len(cpu_gemm._Packs.by_layer) == 1
        assert cpu_gemm._Packs.by_layer == {} and cpu_gemm._Packs.depth == 0
    assert made == [shape]
    for x, a, b in zip(xs, plain, packed, strict=True):
        assert torch.equal(a, b), x.shape


def test_packed_weights_follow_a_changed_weight_and_skip_recorded_calls(monkeypatch):
    made = _reorders(monkeypatch)
    calls = _counting(monkeypatch)
    torch.manual_seed(4)
    layer = nn.Linear(16, 8)
    cpu_gemm.use_onednn(layer)
    x = torch.randn(5, 16)
    with cpu_gemm.packed_weights():
        layer(x).sum().backward()  # records a gradient: the plain weight, no copy
        assert made == [] and len(calls) == 2  # forward and dW (x needs no gradient)
        with torch.no_grad():
            layer(x)
            layer.weight.add_(0.5)  # changed in place: its version moves, so it is packed again
            got = layer(x)
            layer.weight = nn.Parameter(layer.weight.detach().clone() * 2)  # a new tensor
            got2 = layer(x)
    assert made == [(8, 16)] * 3
    with torch.no_grad():
        assert torch.equal(got2, layer(x))
        layer.weight.mul_(0.5)
        assert torch.equal(got, layer(x))


def test_generation_with_packed_weights_is_bit_identical(tiny_lm, tok, monkeypatch):
    """``generate`` packs the weights for its forwards: the same samples, logprobs and entropies
    on a seed as without packing (``_REORDER`` removed)."""
    from rlhfkit.data.tokenize import pad_left
    from rlhfkit.rollout.sampling import generate

    model = load_policy(ModelConfig(name_or_path=str(tiny_lm)), tok, trainable=False)
    prompts = [tok("copy : red blue :")["input_ids"], tok("say gold")["input_ids"]] * 3
    ids, mask = pad_left(prompts, tok.pad_token_id)
    kw = dict(max_new_tokens=12, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    made = _reorders(monkeypatch)
    a = generate(model, ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    n_linear = sum(type(m) is cpu_gemm.OneDNNLinear for m in model.modules())
    assert len(made) == n_linear  # each layer once, for the whole generation
    monkeypatch.setattr(cpu_gemm, "_REORDER", None)
    b = generate(model, ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    for f in ("tokens", "lengths", "stopped", "logprobs", "entropy"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_packing_turns_off_with_its_environment_variable():
    import os
    import subprocess
    import sys

    assert cpu_gemm._REORDER is not None  # on by default (this process)
    code = "from rlhfkit.models import cpu_gemm; print(cpu_gemm._REORDER is None)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "RLHFKIT_PACKED_WEIGHTS": "0"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == "True"


def _kernels(monkeypatch, slow: str | None = None, delay: float = 0.1) -> list[str]:
    """Count the calls of each kernel of ``Choices``; ``slow``: that one sleeps ``delay`` first."""
    calls: list[str] = []
    for name, f in list(cpu_gemm.KERNELS.items()):

        def wrapped(*args, _f=f, _name=name):
            calls.append(_name)
            if _name == slow:
                time.sleep(delay)
            return _f(*args)

        monkeypatch.setitem(cpu_gemm.KERNELS, name, wrapped)
    return calls


def _auto_step(rows: int, seed: int = 0):
    """One forward and backward of a 512 x 512 layer on ``cpu_gemm.use_onednn(.., "auto")``:
    each product is 512 * 512 * rows multiply-adds, timed for rows >= 4096 (TIMED_MACS)."""
    torch.manual_seed(seed)
    layer = nn.Linear(512, 512, bias=True)
    cpu_gemm.use_onednn(layer, "auto")
    x = torch.randn(rows, 512, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    return layer, x, y, g


@pytest.mark.parametrize("slow", ["onednn", "torch"])
def test_auto_times_each_product_class_once_and_keeps_the_faster(monkeypatch, tmp_path, slow):
    """``model.cpu_gemm: auto``: the kernel made slower by 100 ms a call loses the A B A B timing
    of each product (forward, dx, dW), for good: the class's next products, in this process and
    in the next one on the same machine (the choices read back from disk), run the other kernel
    without timing again. Every product equals float64 within the fp32 bound either way."""
    fast = "torch" if slow == "onednn" else "onednn"
    calls = _kernels(monkeypatch, slow)
    choices = cpu_gemm.Choices(tmp_path)
    monkeypatch.setattr(cpu_gemm, "_CHOICES", choices)
    layer, x, y, g = _auto_step(4100)
    assert sorted(choices.made) == ["512x8192x512/tt", "8192x512x512/nn+b", "8192x512x512/nt"]
    assert set(choices.made.values()) == {fast} and calls.count(slow) == 3 * 2
    x2, w, g2 = x.detach().double(), layer.weight.detach().double(), g.double()
    _check(y, x2, w.T, layer.bias.detach().double())
    _check(x.grad, g2, w)
    _check(layer.weight.grad, g2.T, x2)
    # the same classes (rows 4100 and 6000 both round up to 8192), a new process's choices
    again = cpu_gemm.Choices(tmp_path)
    assert again.made == choices.made and again.path == choices.path
    monkeypatch.setattr(cpu_gemm, "_CHOICES", again)
    calls.clear()
    _auto_step(6000, seed=1)
    assert calls == [fast] * 3 and again.timings == {}


def test_auto_leaves_small_products_on_onednn_and_keys_choices_by_machine(monkeypatch, tmp_path):
    calls = _kernels(monkeypatch, slow="onednn")
    choices = cpu_gemm.Choices(tmp_path)
    monkeypatch.setattr(cpu_gemm, "_CHOICES", choices)
    _auto_step(4000)  # 1.05e9 multiply-adds a product: below TIMED_MACS, not timed
    assert calls == ["onednn"] * 3 and choices.made == {} and not choices.path.exists()
    key = cpu_gemm.machine_key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # another ISA cap: another machine's choices
    assert cpu_gemm.machine_key() != key
    with pytest.raises(ValueError, match="'onednn' or 'auto'"):
        cpu_gemm.use_onednn(nn.Linear(2, 2), "mkl")
