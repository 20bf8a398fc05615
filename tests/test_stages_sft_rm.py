"""SFT and RM stages end to end on a tiny local model: learning, checkpoints, resume, CLI."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import COLORS, copy_rows, preference_rows, write_jsonl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.config import RMConfig, SFTConfig, load_config
from rlhfkit.data.tokenize import pad_right
from rlhfkit.models import read_reward_stats
from rlhfkit.stages.rm import run_rm
from rlhfkit.stages.sft import run_sft
from rlhfkit.train.logger import read_metrics

QUIET = ["log.progress=false", "log.tensorboard=false", "train.log_every=1"]


def sft_cfg(tmp_path, lm, *extra):
    data = write_jsonl(tmp_path / "sft.jsonl", copy_rows(96))
    return load_config(
        SFTConfig,
        None,
        [
            f"model.name_or_path={lm}",
            f"data.train_file={data}",
            "data.eval_fraction=0.1",
            f"train.output_dir={tmp_path / 'sft'}",
            "train.lr=3e-3",
            "train.batch_size=8",
            "train.seed=1",
            *QUIET,
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_lm):
    tmp = tmp_path_factory.mktemp("sftrun")
    cfg = sft_cfg(tmp, tiny_lm, "train.epochs=3", "train.schedule=constant")
    return cfg, run_sft(cfg)


def test_sft_loss_drops_and_checkpoint_reloads_in_plain_transformers(sft_run):
    cfg, final = sft_run
    losses = [m["train/loss"] for m in read_metrics(cfg.train.output_dir) if "train/loss" in m]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3
    evals = [m for m in read_metrics(cfg.train.output_dir) if "eval/loss" in m]
    assert evals[-1]["eval/perplexity"] == pytest.approx(
        torch.tensor(evals[-1]["eval/loss"]).exp().item(), rel=1e-6
    )
    assert (final / "run_config.yaml").exists() and (final / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    ids = torch.tensor([tok("copy : red blue :")["input_ids"]])
    ckpt = sorted((Path(cfg.train.output_dir) / "checkpoints").iterdir())[-1]
    again = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_sft_resume_matches_uninterrupted_run(tmp_path, tiny_lm):
    a = run_sft(sft_cfg(tmp_path / "a", tiny_lm, "train.max_steps=6", "train.grad_accum_steps=2"))
    b_cfg = sft_cfg(
        tmp_path / "b",
        tiny_lm,
        "train.max_steps=6",
        "train.grad_accum_steps=2",
        "train.save_every=2",
    )
    run_sft(b_cfg)
    ckpts = sorted((tmp_path / "b" / "sft" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step-000004", "step-000006"]  # keep_last = 2
    # pretend the run died after step 4: drop what came later, then resume
    shutil.rmtree(ckpts[-1])
    shutil.rmtree(tmp_path / "b" / "sft" / "final")
    b = run_sft(b_cfg)
    wa = AutoModelForCausalLM.from_pretrained(a).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(b).state_dict()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("eval_fraction", ["0", "0.1"])
def test_metrics_log_has_no_empty_row_and_a_rerun_after_the_last_checkpoint_keeps_it(
    tmp_path, tiny_lm, eval_fraction
):
    """Without held-out data the final evaluation is {}: it writes no row. A run killed after its
    final checkpoint (before final/ was exported) and rerun writes its log once, not the final
    evaluation twice (issue 21)."""
    cfg = sft_cfg(tmp_path, tiny_lm, "train.max_steps=4", f"data.eval_fraction={eval_fraction}")
    run_sft(cfg)
    log = Path(cfg.train.output_dir) / "metrics.jsonl"
    first = log.read_text()
    rows = [json.loads(x) for x in first.splitlines()]
    assert len(rows) == 4 + (eval_fraction != "0")  # a train row per step (log_every 1)
    assert all(len(r) > 1 for r in rows)  # every row has a metric besides its step
    assert ("eval/loss" in rows[-1]) == (eval_fraction != "0")
    shutil.rmtree(Path(cfg.train.output_dir) / "final")  # killed after the last checkpoint
    run_sft(cfg)
    assert log.read_text() == first


def rm_cfg(tmp_path, sft_final, data, *extra):
    return load_config(
        RMConfig,
        None,
        [
            f"model.name_or_path={sft_final}",
            f"data.train_file={data}",
            "data.eval_fraction=0.25",
            f"train.output_dir={tmp_path / 'rm'}",
            "train.lr=2e-3",
            "train.batch_size=8",
            "train.epochs=2",
            *QUIET,
            *extra,
        ],
    )


def test_rm_learns_rule_and_reloads(tmp_path, sft_run):
    _, sft_final = sft_run
    data = write_jsonl(tmp_path / "pref.jsonl", preference_rows(160, seed=3))
    cfg = rm_cfg(tmp_path, sft_final, data)
    final = run_rm(cfg)
    ev = [m for m in read_metrics(cfg.train.output_dir) if "eval/accuracy" in m][-1]
    assert ev["eval/accuracy"] > 0.9
    stats = read_reward_stats(final)
    assert stats["n"] == 2 * 120 and stats["std"] > 0
    # plain transformers gives the same scores as our last-token reader
    from rlhfkit.algos import last_index
    from rlhfkit.config import ModelConfig
    from rlhfkit.data.build import load_preferences, train_eval
    from rlhfkit.models import PerTokenScalar, load_scalar_model

    tok = AutoTokenizer.from_pretrained(final)
    plain = AutoModelForSequenceClassification.from_pretrained(final)
    # the stored statistics are the mean and std of the final RM's scores on the training
    # responses (both of each of the 120 training pairs), recomputed here with plain transformers
    train, _, _ = train_eval(load_preferences, tok, cfg.data, cfg.train.seed)
    with torch.no_grad():
        scores = torch.tensor(
            [plain(torch.tensor([s])).logits[0, 0].item() for it in train for s in it.sequences]
        )
    assert stats["mean"] == pytest.approx(scores.mean().item(), abs=1e-5)
    assert stats["std"] == pytest.approx(scores.std().item(), abs=1e-5)
    ours = load_scalar_model(ModelConfig(), tok, str(final), fresh_head=False, trainable=False)
    batch = tok(
        ["say red : good red </s>", "say blue : bad </s>"], return_tensors="pt", padding=True
    )
    assert batch["attention_mask"][1, -1] == 0  # right-padded
    torch.testing.assert_close(
        plain(**batch).logits.squeeze(-1),
        PerTokenScalar(ours)(batch["input_ids"], batch["attention_mask"])[
            torch.arange(2), last_index(batch["attention_mask"])
        ],
    )


def test_rm_k_way_ranking_data_trains(tmp_path, sft_run):
    _, sft_final = sft_run
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(120):
        c = rng.choice(COLORS)
        rows.append(
            {
                "prompt": f"say {c} :",
                "responses": [f"bad {c}", f"good {c}", f"ok {c}"],
                "scores": [0, 2, 1],
            }
        )
    cfg = rm_cfg(tmp_path, sft_final, write_jsonl(tmp_path / "rank.jsonl", rows), "train.epochs=3")
    run_rm(cfg)
    ev = [m for m in read_metrics(cfg.train.output_dir) if "eval/accuracy" in m][-1]
    assert ev["eval/accuracy"] > 0.9 and ev["eval/margin"] > 0


@pytest.mark.slow  # several `python -m rlhfkit` subprocesses (~12 s)
def test_cli_runs_and_reports_config_errors(tmp_path, tiny_lm, capsys):
    """``python -m rlhfkit sft`` trains and writes a plain HF directory (a real process); a
    misspelt key and a missing file exit with 2 and say what is wrong (``main`` in-process: the
    same code, without two more interpreter start-ups)."""
    from rlhfkit.cli import main

    data = write_jsonl(tmp_path / "sft.jsonl", copy_rows(16))
    args = ["sft", "--config", "configs/tiny/sft.yaml"]
    ok = subprocess.run(
        [sys.executable, "-m", "rlhfkit", *args]
        + [
            f"model.name_or_path={tiny_lm}",
            f"data.train_file={data}",
            f"train.output_dir={tmp_path / 'o'}",
            "train.max_steps=2",
            "log.progress=false",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "final") is not None
    capsys.readouterr()
    assert main(args + ["train.lrr=1"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err
    missing = [
        f"model.name_or_path={tiny_lm}",
        f"data.train_file={tmp_path / 'nope.jsonl'}",
        f"train.output_dir={tmp_path / 'o2'}",
    ]
    assert main(args + missing) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("plain_head", [True, False])
def test_sft_loss_on_labelled_positions_equals_hf_loss_and_gradients(tiny_lm, plain_head):
    """The fast path (LM head only where a label is, chunked log-softmax) against HF's own
    ``model(**batch).loss``: the same value and the same gradient, with prompt labels masked
    and right padding in the batch."""
    from rlhfkit.data.tokenize import IGNORE_INDEX
    from rlhfkit.models import LabelledLogprobs
    from rlhfkit.stages.sft import sft_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    ids = torch.randint(4, model.config.vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding
    mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX  # the prompt
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    forward = LabelledLogprobs(model, IGNORE_INDEX)
    forward.plain_head = plain_head
    ours, _ = sft_loss(forward, batch)
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hf = model(**batch, use_cache=False).loss
    hf.backward()
    assert forward(**batch).numel() == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(ours, hf, rtol=0, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_ours[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("k, checkpointing", [(2, False), (3, False), (2, True)])
def test_rm_scores_with_the_prompt_forwarded_once_equal_plain_hf(tiny_lm, k, checkpointing):
    """PromptSharingScorer (prompt once, its KV cache repeated K times) against transformers'
    own AutoModelForSequenceClassification on the whole sequences: the same scores and the same
    gradients; prompts of different lengths, responses of different lengths, one item whose
    sequences share nothing but the first token."""
    from rlhfkit.data.build import RankItem
    from rlhfkit.models import PromptSharingScorer
    from rlhfkit.models.compat import enable_checkpointing
    from rlhfkit.stages.rm import collate_ranked, score_batch

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_lm, num_labels=1)
    model.config.pad_token_id = 0
    if checkpointing:  # no KV cache under checkpointing: the whole-sequence fallback
        enable_checkpointing(model)
    model.train()
    v = model.config.vocab_size

    def rand(n):
        return torch.randint(4, v, (n,)).tolist()

    items = []
    for p_len in (5, 2, 7):
        prompt = [1, *rand(p_len)]
        items.append(RankItem([prompt + rand(2 + 2 * j) for j in range(k)]))
    items.append(RankItem([[1, *rand(4)] for _ in range(k)]))  # shares only the BOS
    batch = collate_ranked(items, pad_id=0)
    assert batch["prompt_ids"].shape[1] == 8  # the longest shared prefix (BOS + 7)
    ours = score_batch(PromptSharingScorer(model), batch)  # (B, K)
    ours.sum().backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    seqs = [s for it in items for s in it.sequences]
    ids, mask = pad_right(seqs, 0)
    plain = model(input_ids=ids, attention_mask=mask).logits.view(len(items), k)
    plain.sum().backward()
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
