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
from rlhfkit.rollout.vllm_engine import ServerEngine, VLLMError, to_generation, vllm_lora_rank


def _cfg(*overrides):
    return load_config(PPOConfig, None, ["model.name_or_path=x", "reward_fn=m:f", *overrides])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["rollout.engine=vllm", "rollout.vllm_mode=server"], "rollout.vllm_url"),
        (["rollout.engine=vllm", "rollout.vllm_url=http://h:1"], "rollout.vllm_url"),
        (["rollout.vllm_mode=server"], "rollout.vllm_mode"),
        (["rollout.vllm_url=http://h:1"], "rollout.vllm_url"),
        (["rollout.vllm_lora_sync=adapter"], "rollout.vllm_lora_sync"),
        (["rollout.engine=vllm", "rollout.vllm_lora_sync=delta"], "rollout.vllm_lora_sync"),
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


def test_a_server_without_lora_is_named_for_a_lora_actor_before_any_work(tiny_lm):
    """/health says the server's LoRA rank (none here): an adapter sync could not land, so the
    client stops at once, naming the URL and the flag; the merged sync needs no LoRA."""
    server = HTTPServer(("127.0.0.1", 0), _Wrong)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(
            VLLMError, match=rf"{url}: serves LoRA ranks up to 0.*--max-lora-rank 8"
        ):
            ServerEngine(url, None, lora_rank=8, lora_sync="adapter")
        assert ServerEngine(url, None, lora_rank=8).lora_sync == "merged"  # the default
    finally:
        server.shutdown()


@pytest.mark.parametrize("r, rank", [(1, 1), (2, 8), (8, 8), (9, 16), (300, 320), (512, 512)])
def test_an_adapter_gets_the_smallest_lora_rank_vllm_is_built_for(r, rank):
    assert vllm_lora_rank(r) == rank


def test_a_rank_above_vllms_largest_is_named():
    with pytest.raises(VLLMError, match="ranks up to 512; the adapter has 513"):
        vllm_lora_rank(513)


def test_the_adapter_sent_to_vllm_is_the_actors_own_as_peft_reloads_it(tiny_lm, tmp_path):
    """What an adapter sync sends: the LoRA tensors alone (no base weight), unmerged, as a PEFT
    adapter directory; PEFT loads it back onto the base into the same policy, to the bit."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhfkit.rollout.vllm_engine import lora_adapter

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_lm),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():  # a trained adapter: B is zero at init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = lora_adapter(model)
    assert adapter.rank == 4 and adapter.config["lora_alpha"] == 8
    assert adapter.tensors and all(".lora_A." in k or ".lora_B." in k for k in adapter.tensors)
    assert sorted(adapter.config["target_modules"]) == ["q_proj", "v_proj"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not merged
    assert lora_adapter(AutoModelForCausalLM.from_pretrained(tiny_lm)) is None
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_lm), str(adapter.write(tmp_path / "a"))
    )
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert torch.equal(want, got) and not torch.allclose(want, base, atol=1e-3)


def test_prompts_go_to_vllm_in_parts_no_larger_than_one_prefill_step():
    from rlhfkit.rollout.vllm_engine import prefill_parts

    lengths = [5, 7, 3, 9, 20, 1]
    parts = prefill_parts(lengths, 12)
    assert parts == [[0, 1], [2, 3], [4], [5]]  # in order; a prompt over the budget alone
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 12 for p in parts if len(p) > 1)
    assert prefill_parts([4] * 8, 64) == [list(range(8))]
