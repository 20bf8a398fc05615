"""What a GPU run relies on, tested where it can be: gradient checkpointing in all three stages
(the recompute equals no recompute), and, on a CUDA machine only (`gpu` marker), an exact resume
with the CUDA RNG in the checkpoint."""

import pytest
import torch

from rlhfkit.algos import pairwise_loss
from rlhfkit.config import ModelConfig
from rlhfkit.models import (
    LabelledLogprobs,
    PerTokenScalar,
    PromptSharingScorer,
    load_policy,
    load_scalar_model,
    load_tokenizer,
)
from rlhfkit.rollout.forward import critic_values, join, policy_logprobs
from rlhfkit.train.checkpoint import rng_state


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def _same(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_gradient_checkpointing_equals_no_recompute(tiny_lm, stage):
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_lm)))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tok), (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    out = []
    for ckpt in (False, True):
        mc = ModelConfig(name_or_path=str(tiny_lm), gradient_checkpointing=ckpt)
        if stage == "sft":
            model = load_policy(mc, tok)
            labels = torch.where(mask.bool(), ids, -100)
            labels[:, :4] = -100  # the prompt

            def loss_fn(m, labels=labels):
                return -LabelledLogprobs(m)(ids, mask, labels).mean()

        elif stage == "rm":
            torch.manual_seed(1)
            model = load_scalar_model(mc, tok, str(tiny_lm), fresh_head=True)

            def loss_fn(m):
                r = PromptSharingScorer(m)(ids[:2, :4], mask[:2, :4], ids[:, 4:], mask[:, 4:]).view(
                    2, 2
                )
                return pairwise_loss(r[:, 0], r[:, 1])[0]

        else:  # ppo: the actor's logprobs and a critic's values over prompt + response
            torch.manual_seed(1)
            model = load_scalar_model(mc, tok, str(tiny_lm), fresh_head=True)
            seq = join(ids[:, :5], mask[:, :5], ids[:, 5:], mask[:, 5:].bool())

            def loss_fn(m, seq=seq):
                return critic_values(PerTokenScalar(m), seq)[seq.response_mask].pow(2).mean()

            policy = load_policy(mc, tok)
            out.append(
                (
                    "policy",
                    _grads(policy, lambda m, seq=seq: -policy_logprobs(m, seq, 1.0)[0].sum()),
                )
            )
        model.train()
        assert (
            getattr(
                model.base_model if stage != "sft" else model.model, "gradient_checkpointing", False
            )
            == ckpt
        )
        out.append(("main", _grads(model, loss_fn)))
    by_kind: dict[str, list] = {}
    for kind, res in out:
        by_kind.setdefault(kind, []).append(res)
    for pair in by_kind.values():
        _same(*pair)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_checks():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "gpu_checks.py"
    spec = importlib.util.spec_from_file_location("gpu_checks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rng_state_has_cuda_generators_exactly_when_cuda_exists():
    assert ("cuda" in rng_state()) == torch.cuda.is_available()


@pytest.mark.gpu
@gpu
def test_cuda_rng_is_in_the_checkpoint_and_a_resume_is_exact_on_cuda(tmp_path, tiny_lm):
    _gpu_checks().check_exact_resume_on_cuda(tmp_path, tiny_lm)


@pytest.mark.gpu
@gpu
def test_cuda_graph_decoding_equals_the_eager_loop(tiny_lm):
    _gpu_checks().check_cuda_graph_decoding(tiny_lm)


@pytest.mark.gpu
@gpu
def test_bf16_mixed_ratio_is_one_before_the_update_on_cuda(tmp_path, tiny_lm):
    _gpu_checks().check_bf16_mixed_ratio(tmp_path, tiny_lm)


@pytest.mark.gpu
@gpu
def test_the_gpu_process_group_reduces_cpu_and_cuda_tensors():
    _gpu_checks().check_collectives()
