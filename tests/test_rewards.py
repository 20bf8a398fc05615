"""Rewards from anywhere: an RM with its own tokenizer, the reward server (`rlhfkit serve-rm`, a
real process on 127.0.0.1) and its client's faults, several rewards combined, reward functions
that fail. No mocks: servers listen on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import torch
from conftest import COLORS, WORDS
from test_ppo import count_good, ppo_cfg

from rlhfkit.config import ConfigError, ModelConfig
from rlhfkit.data.build import load_prompts
from rlhfkit.models import export_model, load_scalar_model, load_tokenizer
from rlhfkit.rewards.http import RewardClient, RewardServerError
from rlhfkit.rewards.text_rm import TextRM, same_tokenizer
from rlhfkit.rollout.collect import PromptStream, ScoreNormalizer, collect
from rlhfkit.rollout.rewards import RewardFunctionError, call_reward_fn, decode_texts
from rlhfkit.stages.ppo import load_models, run_ppo
from rlhfkit.toy import build_tiny_lm
from rlhfkit.train.logger import read_metrics


def make_rm(lm_dir: Path, out: Path, seed: int = 0) -> Path:
    """A reward model (random head, N(0, 1/sqrt(d+1))) on ``lm_dir``'s trunk, as `rlhfkit rm` writes it."""
    mc = ModelConfig(name_or_path=str(lm_dir))
    tok = load_tokenizer(mc)
    torch.manual_seed(seed)
    rm = load_scalar_model(mc, tok, str(lm_dir), fresh_head=True, trainable=False)
    export_model(rm, tok, out)
    return out


@pytest.fixture(scope="module")
def tiny_rm(tiny_lm, tmp_path_factory) -> Path:
    return make_rm(tiny_lm, tmp_path_factory.mktemp("rm") / "rm")


@pytest.fixture(scope="module")
def other_rm(tmp_path_factory) -> Path:
    """An RM whose tokenizer differs: another vocabulary order, an extra word, another size."""
    d = tmp_path_factory.mktemp("other")
    words = ["great", *reversed(WORDS)]
    lm = build_tiny_lm(d / "lm", words, hidden=24, layers=1, heads=2, seed=5)
    return make_rm(lm, d / "rm", seed=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(rm_dir: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhfkit", "serve-rm", str(rm_dir), "--port", str(port)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "RLHFKIT_TCMALLOC": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode()[-2000:])
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("serve-rm did not start")


@pytest.fixture(scope="module")
def rm_server(tiny_rm):
    port = free_port()
    proc = start_server(tiny_rm, port)
    yield f"http://127.0.0.1:{port}/score"
    proc.terminate()
    proc.wait(10)


def _collect(cfg, models):
    prompts, _ = load_prompts(cfg.data.train_file, models.tokenizer, cfg.data)
    return collect(
        models, prompts, PromptStream(len(prompts), 0), cfg, ScoreNormalizer("none", None, 0)
    )[0]


# --------------------------------------------------------------------------- the server


def test_server_rejects_bad_requests_with_400_and_stays_up(rm_server):
    bad = [
        b"not json",
        json.dumps([1, 2]).encode(),
        json.dumps({"prompts": ["a"]}).encode(),
        json.dumps({"prompts": ["a"], "responses": [3]}).encode(),
        json.dumps({"prompts": ["a", "b"], "responses": ["x"]}).encode(),
        json.dumps({"prompts": ["a"] * 2000, "responses": ["x"] * 2000}).encode(),
    ]
    for body in bad:
        r = requests.post(rm_server, data=body, timeout=10)
        assert r.status_code == 400, (body[:40], r.status_code, r.text)
        assert r.json()["detail"]
    ok = requests.post(rm_server, json={"prompts": ["say red :"], "responses": ["good red"]})
    assert ok.status_code == 200 and len(ok.json()["scores"]) == 1
    assert requests.get(rm_server.replace("/score", "/health")).json()["status"] == "ok"


def test_ppo_against_the_server_scores_like_the_rm_in_process(
    tmp_path, tiny_lm, tiny_rm, rm_server
):
    cfg = ppo_cfg(tmp_path, tiny_lm, f"reward_url={rm_server}", "reward_fn=", "reward_batch_size=7")
    torch.manual_seed(0)
    models = load_models(cfg, None, None)
    exp = _collect(cfg, models)
    prompts, responses = decode_texts(
        models.tokenizer, exp.prompt_ids, exp.prompt_mask, exp.response, exp.response_mask
    )
    in_process = TextRM(str(tiny_rm), device="cpu").score(prompts, responses)
    torch.testing.assert_close(exp.raw_scores, in_process, rtol=0, atol=1e-5)
    # and for the responses that ended on EOS, equal to the token-id fast path of the same RM
    fast = load_models(
        ppo_cfg(tmp_path / "f", tiny_lm, f"reward_model={tiny_rm}", "reward_fn="), None, None
    )
    assert type(fast.reward).__name__ == "RMReward"  # same tokenizer: ids passed straight through
    from rlhfkit.rollout.forward import join

    seq = join(exp.prompt_ids, exp.prompt_mask, exp.response, exp.response_mask)
    ids = fast.reward(seq, models.tokenizer)
    # rows whose text round trip is exact: ended on EOS, and no special token inside the response
    # (this random-init actor samples <s>, <unk> or pad now and then; decoding drops them)
    special = torch.tensor(models.tokenizer.all_special_ids)
    inside = torch.isin(exp.response, special) & exp.response_mask
    inside[torch.arange(len(exp)), exp.response_mask.sum(1) - 1] = False  # the final EOS
    exact = exp.stopped & ~inside.any(1)
    assert exact.sum() >= 6
    torch.testing.assert_close(exp.raw_scores[exact], ids[exact], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_server_killed_mid_run_gives_a_clear_error_then_a_rerun_resumes(tmp_path, tiny_lm, tiny_rm):
    port = free_port()
    url = f"http://127.0.0.1:{port}/score"
    server = {"proc": start_server(tiny_rm, port)}
    calls = {"n": 0}

    def monitor_that_kills_the_server(prompts, responses):  # runs after each iteration
        calls["n"] += 1
        if calls["n"] == 2:
            server["proc"].kill()
            server["proc"].wait(10)
        return [0.0] * len(responses)

    extra = [f"reward_url={url}", "reward_fn=", "reward_retries=1", "reward_timeout=5"]
    extra += ["run.iterations=4", "run.save_every=1", "rollout.episodes_per_iteration=16"]
    cfg = ppo_cfg(tmp_path, tiny_lm, *extra)
    with pytest.raises(RewardServerError, match=f"127.0.0.1:{port}/score.*no answer"):
        run_ppo(cfg, monitor=monitor_that_kills_the_server)
    ckpts = sorted((tmp_path / "ppo" / "checkpoints").iterdir())
    assert ckpts[-1].name == "step-000002" and (ckpts[-1] / "trainer_state.pt").exists()
    server["proc"] = start_server(tiny_rm, port)
    try:
        run_ppo(cfg)
    finally:
        server["proc"].terminate()
        server["proc"].wait(10)
    assert [r["step"] for r in read_metrics(tmp_path / "ppo")] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- client faults


class _Handler(BaseHTTPRequestHandler):
    """A protocol-speaking test server whose answer the test chooses (``server.mode``)."""

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n, mode = len(body["responses"]), self.server.mode
        self.server.seen.append(self.headers.get("Authorization"))
        if mode == "sleep":
            time.sleep(3)
        if mode == "flaky" and len(self.server.seen) <= 2:
            return self._send(503, b"busy")
        text = {
            "garbage": b"<html>oops</html>",
            "count": json.dumps({"scores": [1.0] * (n + 1)}).encode(),
            "string": json.dumps({"scores": ["1.0"] * n}).encode(),
            "noscores": json.dumps({"result": [1.0] * n}).encode(),
            "nan": ('{"scores": [' + ", ".join(["NaN"] * n) + "]}").encode(),
        }.get(mode, json.dumps({"scores": [float(len(r)) for r in body["responses"]]}).encode())
        self._send(200, text)

    def _send(self, code, text):
        self.send_response(code)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)


@pytest.fixture()
def fake_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.mode, srv.seen = "ok", []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}/score"
    srv.shutdown()


@pytest.mark.parametrize(
    "mode,match",
    [
        ("garbage", "not JSON"),
        ("count", "3 scores for 2 responses"),
        ("string", "score 0 is not a number"),
        ("noscores", 'no "scores" list'),
    ],
)
def test_bad_answers_are_clear_errors_naming_the_url(fake_server, mode, match):
    srv, url = fake_server
    srv.mode = mode
    with pytest.raises(RewardServerError, match=f"{url}: .*{match}"):
        RewardClient(url).score(["p", "q"], ["a", "bb"])


def test_timeouts_are_retried_then_reported(fake_server):
    srv, url = fake_server
    srv.mode = "sleep"
    t0 = time.time()
    with pytest.raises(RewardServerError, match="no answer after 1 retries"):
        RewardClient(url, timeout=0.5, retries=1, backoff=0.01).score(["p"], ["a"])
    assert len(srv.seen) == 2 and time.time() - t0 < 10  # one try and one retry, then an error


def test_5xx_is_retried_with_backoff_and_batches_keep_their_order(fake_server, monkeypatch):
    srv, url = fake_server
    srv.mode = "flaky"  # the first two requests get 503
    monkeypatch.setenv("RM_TOKEN", "s3cret")
    client = RewardClient(
        url, batch_size=2, retries=3, backoff=0.01, concurrency=1, token_env="RM_TOKEN"
    )
    responses = ["a", "bb", "ccc", "dddd", "e"]
    assert client.score(["p"] * 5, responses) == [1.0, 2.0, 3.0, 4.0, 1.0]
    assert srv.seen[0] == "Bearer s3cret" and len(srv.seen) == 2 + 3
    monkeypatch.delenv("RM_TOKEN")
    with pytest.raises(RewardServerError, match="RM_TOKEN"):
        client.score(["p"], ["a"])


def test_nan_scores_reach_the_non_finite_guard(tmp_path, tiny_lm, fake_server):
    srv, url = fake_server
    srv.mode = "nan"
    cfg = ppo_cfg(
        tmp_path,
        tiny_lm,
        f"reward_url={url}",
        "reward_fn=",
        "run.iterations=2",
        "run.max_bad_steps=3",
    )
    run_ppo(cfg)
    rows = read_metrics(tmp_path / "ppo")
    assert [r["nonfinite/skipped"] for r in rows] == [1, 2]  # every update skipped, and counted


# --------------------------------------------------------------------------- other tokenizers


def test_an_rm_with_another_tokenizer_scores_the_decoded_text(tmp_path, tiny_lm, other_rm):
    actor_tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_lm)))
    rm_tok = load_tokenizer(ModelConfig(name_or_path=str(other_rm)))
    assert not same_tokenizer(actor_tok, rm_tok) and same_tokenizer(actor_tok, actor_tok)
    cfg = ppo_cfg(tmp_path, tiny_lm, f"reward_model={other_rm}", "reward_fn=")
    torch.manual_seed(0)
    models = load_models(cfg, None, None)
    assert type(models.reward).__name__ == "TextRMReward"
    exp = _collect(cfg, models)
    prompts, responses = decode_texts(
        models.tokenizer, exp.prompt_ids, exp.prompt_mask, exp.response, exp.response_mask
    )
    # directly: the RM's own tokenizer on the decoded text, and plain transformers
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(other_rm).eval()
    for i in range(0, len(prompts), 5):
        ids = rm_tok(prompts[i] + " " + responses[i] + " </s>", add_special_tokens=True)[
            "input_ids"
        ]
        with torch.no_grad():
            want = plain(torch.tensor([ids])).logits[0, 0]
        assert exp.raw_scores[i].item() == pytest.approx(want.item(), abs=1e-5)
    with pytest.raises(ConfigError, match="critic_init: 'rm' needs the RM to share"):
        load_models(
            ppo_cfg(tmp_path, tiny_lm, f"reward_model={other_rm}", "reward_fn=", "critic_init=rm"),
            None,
            None,
        )


def test_text_rm_truncates_to_the_rms_length_and_counts(other_rm):
    rm = TextRM(str(other_rm), device="cpu")
    rm.max_length = 8
    long = " ".join(COLORS * 4)
    scores = rm.score(["say red :", "say red :"], [long, "good"])
    assert scores.shape == (2,) and torch.isfinite(scores).all() and rm.truncated == 1


# --------------------------------------------------------------------------- several rewards


def count_bad(prompts, responses):
    return [float(r.split().count("bad")) for r in responses]


def raises(prompts, responses):
    raise KeyError("no such thing")


def test_several_rewards_are_weighted_and_logged_per_source(tmp_path, tiny_lm):
    rewards = [
        {"name": "good", "fn": "test_ppo:count_good", "weight": 2.0},
        {"name": "bad", "fn": "test_rewards:count_bad", "weight": -0.5},
    ]
    cfg = ppo_cfg(
        tmp_path, tiny_lm, "reward_fn=", f"rewards={json.dumps(rewards)}", "run.iterations=1"
    )
    torch.manual_seed(0)
    models = load_models(cfg, None, None)
    exp = _collect(cfg, models)
    texts = decode_texts(
        models.tokenizer, exp.prompt_ids, exp.prompt_mask, exp.response, exp.response_mask
    )
    want = 2.0 * call_reward_fn(count_good, *texts) - 0.5 * call_reward_fn(count_bad, *texts)
    torch.testing.assert_close(exp.raw_scores, want, rtol=0, atol=0)
    assert (call_reward_fn(count_bad, *texts) > 0).any() and (
        call_reward_fn(count_good, *texts) > 0
    ).any()
    run_ppo(cfg)
    row = read_metrics(tmp_path / "ppo")[0]
    assert {"score/good", "score/bad", "score/mean"} <= set(row)


def test_a_reward_function_that_raises_names_itself_and_the_batch():
    with pytest.raises(
        RewardFunctionError,
        match=r"test_rewards:raises raised on a batch of 2 .*'say red :'.*KeyError",
    ):
        call_reward_fn(raises, ["say red :", "x"], ["a", "b"])
    with pytest.raises(RewardFunctionError, match="returned shape \\(3,\\)"):
        call_reward_fn(lambda p, r: [1.0, 2.0, 3.0], ["a", "b"], ["a", "b"])


def test_reward_source_keys_are_exclusive():
    from rlhfkit.config import PPOConfig, load_config

    with pytest.raises(ConfigError, match="set only one reward source"):
        load_config(PPOConfig, None, ["reward_model=x", "reward_url=http://127.0.0.1:1/score"])
    with pytest.raises(ConfigError, match="exactly one of model, fn, url"):
        load_config(PPOConfig, None, ['rewards=[{"name": "a"}]'])


def test_running_score_statistics_never_absorb_a_non_finite_score():
    """A NaN/inf score goes to the non-finite guard; the running mean/std are those of the
    finite scores (before, one NaN made every later normalised score NaN)."""
    from rlhfkit.rollout.rewards import ScoreNormalizer

    norm = ScoreNormalizer("running", None, 0.0)
    out = norm(torch.tensor([1.0, float("nan"), 3.0, float("inf")]))
    finite = torch.tensor([1.0, 3.0], dtype=torch.float64)
    assert norm.running.mean == pytest.approx(finite.mean().item())
    assert norm.running.var == pytest.approx(finite.var(unbiased=False).item())
    assert torch.isfinite(out[[0, 2]]).all() and not torch.isfinite(out[[1, 3]]).any()
    later = norm(torch.tensor([2.0, 2.0]))
    assert torch.isfinite(later).all()
