"""rollout.engine: the config's checks, and the vLLM server client's errors, without vLLM (the
engine itself is tested where vLLM is installed: tests/test_vllm.py)."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from rlhfkit.config import ConfigError, PPOConfig, load_config
from rlhfkit.rollout.engines import ENGINES, HFEngine
from rlhfkit.rollout.sampling import generate
from rlhfkit.rollout.vllm_engine import ServerEngine, VLLMError, to_generation


def _cfg(*overrides):
    return load_config(PPOConfig, None, ["model.name_or_path=x", "reward_fn=m:f", *overrides])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["rollout.engine=vllm", "rollout.vllm_mode=server"], "rollout.vllm_url"),
        (["rollout.engine=vllm", "rollout.vllm_url=http://h:1"], "rollout.vllm_url"),
        (["rollout.vllm_mode=server"], "rollout.vllm_mode"),
        (["rollout.vllm_url=http://h:1"], "rollout.vllm_url"),
        (["rollout.engine=vllm", "rollout.compile=true"], "rollout.compile"),
        (["rollout.engine=sglang"], "rollout.engine"),
    ],
)
def test_engine_settings_it_cannot_serve_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(*overrides)


def test_the_hf_engine_is_rlhfkits_own_sampler_bit_for_bit(tiny_lm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    ids, mask = torch.tensor([[0, 1, 5], [1, 6, 7]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    kw = dict(max_new_tokens=6, eos_id=2, pad_id=0)
    a = ENGINES["hf"](None, None, None)(
        model, ids, mask, generator=torch.Generator().manual_seed(3), **kw
    )
    b = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    assert isinstance(ENGINES["hf"](None, None, None), HFEngine) and HFEngine.exact_logprobs
    for f in ("tokens", "lengths", "stopped", "logprobs", "entropy"):
        assert torch.equal(getattr(a, f), getattr(b, f))


def test_engine_rows_become_a_generation_cut_at_the_first_stop_sequence():
    rows = [
        ([5, 6, 7, 8, 9], [-0.5, -1.0, -1.5, -2.0, -2.5], False),
        ([4, 2], [-0.25, -0.75], True),
    ]
    gen = to_generation(rows, [[7, 8]], pad_id=0, device="cpu")
    assert gen.tokens.tolist() == [[5, 6, 7, 8], [4, 2, 0, 0]]
    assert gen.lengths.tolist() == [4, 2] and gen.stopped.tolist() == [True, True]
    assert gen.logprobs.tolist() == [[-0.5, -1.0, -1.5, -2.0], [-0.25, -0.75, 0.0, 0.0]]
    assert gen.mask.tolist() == [[True] * 4, [True, True, False, False]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_vllm_server_is_named_before_any_work():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(VLLMError, match=url.replace(".", r"\.")):
        ServerEngine(url, tokenizer=None)


class _Wrong(BaseHTTPRequestHandler):
    """A server that is up but answers /generate with rows for the wrong number of prompts."""

    def _reply(self, body: dict):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._reply({"ok": True})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self._reply({"rows": [[[1], [-0.1], True]]})

    def log_message(self, *args):
        pass


def test_a_bad_answer_from_a_vllm_server_names_the_url_and_what_was_wrong(tiny_lm):
    from transformers import AutoTokenizer

    server = HTTPServer(("127.0.0.1", 0), _Wrong)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        engine = ServerEngine(url, AutoTokenizer.from_pretrained(tiny_lm))
        ids, mask = torch.tensor([[1, 5], [1, 6]]), torch.ones(2, 2, dtype=torch.long)
        with pytest.raises(VLLMError, match=rf"{url}/generate: expected 'rows' for 2 prompts"):
            engine(None, ids, mask, max_new_tokens=4, eos_id=2, pad_id=0)
    finally:
        server.shutdown()


def test_prompts_go_to_vllm_in_parts_no_larger_than_one_prefill_step():
    from rlhfkit.rollout.vllm_engine import prefill_parts

    lengths = [5, 7, 3, 9, 20, 1]
    parts = prefill_parts(lengths, 12)
    assert parts == [[0, 1], [2, 3], [4], [5]]  # in order; a prompt over the budget alone
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 12 for p in parts if len(p) > 1)
    assert prefill_parts([4] * 8, 64) == [list(range(8))]
