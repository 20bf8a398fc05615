"""LoRA (peft): merged exports load in plain transformers; PPO's reference is the actor with its
adapters disabled; adapter training resumes exactly."""

import shutil

import torch
from conftest import copy_rows, write_jsonl
from test_ppo import count_good, ppo_cfg
from transformers import AutoModelForCausalLM

from rlhfkit.config import SFTConfig, load_config
from rlhfkit.data.build import load_prompts
from rlhfkit.models.compat import quiet_peft_wrapping
from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer, collect
from rlhfkit.rollout.forward import join, policy_logprobs
from rlhfkit.stages.ppo import load_models, run_ppo
from rlhfkit.stages.sft import run_sft

LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.target_modules=q_proj,v_proj"]


def test_lora_sft_export_equals_base_plus_adapter(tmp_path, tiny_lm):
    from peft import PeftModel

    data = write_jsonl(tmp_path / "sft.jsonl", copy_rows(48))
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"model.name_or_path={tiny_lm}",
            f"data.train_file={data}",
            f"train.output_dir={tmp_path / 'sft'}",
            "train.lr=1e-2",
            "train.max_steps=4",
            "log.progress=false",
            "log.tensorboard=false",
            *LORA,
        ],
    )
    final = run_sft(cfg)
    ckpt = sorted((tmp_path / "sft" / "checkpoints").iterdir())[-1]
    assert (ckpt / "adapter" / "adapter_model.safetensors").exists()
    plain = AutoModelForCausalLM.from_pretrained(final)  # no peft needed
    assert not any("lora" in k for k in plain.state_dict())
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    if base.get_input_embeddings().weight.shape[0] != plain.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(plain.get_input_embeddings().weight.shape[0])
    with quiet_peft_wrapping():
        merged = PeftModel.from_pretrained(base, ckpt / "adapter").merge_and_unload()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    torch.testing.assert_close(plain(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)
    assert not torch.allclose(
        plain(ids).logits, AutoModelForCausalLM.from_pretrained(tiny_lm)(ids).logits
    )


def test_lora_ppo_reference_is_disabled_adapters_and_resume_is_exact(tmp_path, tiny_lm):
    extra = [
        *LORA,
        "run.iterations=3",
        "rollout.episodes_per_iteration=16",
        "ppo.epochs=1",
        "actor.lr=1e-2",
    ]
    cfg_m = ppo_cfg(tmp_path / "m", tiny_lm, *extra)
    models = load_models(cfg_m, None, count_good)
    assert models.ref is None and hasattr(
        models.actor, "disable_adapter"
    )  # no second copy of the weights
    # the reference logprobs are the base model's, not the adapted actor's: give the adapters
    # weights (LoRA's B starts at 0, where adapters on and off agree), then roll out
    with torch.no_grad():
        for name, w in models.actor.named_parameters():
            if "lora_B" in name:
                w.normal_(0, 0.5)
    prompts, _ = load_prompts(cfg_m.data.train_file, models.tokenizer, cfg_m.data)
    exp, _ = collect(
        models, prompts, PromptStream(len(prompts), 0), cfg_m, ScoreNormalizer("none", None, 0)
    )
    seq = join(exp.prompt_ids, exp.prompt_mask, exp.response, exp.response_mask)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    base.resize_token_embeddings(models.actor.get_input_embeddings().weight.shape[0])
    with torch.no_grad():
        base_logp, _ = policy_logprobs(base, seq, cfg_m.rollout.temperature)
    m = exp.response_mask
    torch.testing.assert_close(exp.ref_logprobs[m], base_logp[m], rtol=0, atol=1e-5)
    assert (exp.logprobs[m] - exp.ref_logprobs[m]).abs().max() > 1e-2  # the adapters act
    a = run_ppo(ppo_cfg(tmp_path / "a", tiny_lm, *extra), reward_fn=count_good)
    b_cfg = ppo_cfg(tmp_path / "b", tiny_lm, *extra, "run.save_every=1")
    run_ppo(b_cfg, reward_fn=count_good)
    out = tmp_path / "b" / "ppo"
    shutil.rmtree(out / "checkpoints" / "step-000003")
    shutil.rmtree(out / "final")
    b = run_ppo(b_cfg, reward_fn=count_good)
    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm).state_dict()
    assert not torch.allclose(
        wa["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
    )
