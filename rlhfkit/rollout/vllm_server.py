"""``rlhfkit vllm-serve``: a policy in vLLM behind HTTP, for ``rollout.vllm_mode: server``.

The protocol (docs/vllm.md), one request at a time (the trainer's):
- ``GET /health`` -> ``{"ok": true, "max_lora_rank": r}`` (0: started without LoRA);
- ``POST /load_weights``, the body a safetensors file of the policy's weights under its HF
  checkpoint's names -> ``{"loaded": n}`` (it ends the adapter, if any);
- ``POST /load_lora``, the body a safetensors file of a LoRA adapter under PEFT's saved names,
  its ``adapter_config.json`` as the file's ``adapter_config`` metadata -> ``{"loaded": n}``:
  the adapter the next rollouts sample with (unmerged);
- ``POST /generate`` ``{"prompts": [[ids]], "request": {max_new_tokens, eos_id, temperature,
  top_k, top_p, stop_strings}, "seeds": [one per prompt]}`` -> ``{"rows": [[ids, logprobs,
  stopped]]}``.

Weights travel in the request body, so the server may run on another machine; on one machine a
SmolLM2-sized policy (540 MB in fp32) takes ~1 s over the loopback. Not imported by the trainer
(``rollout/vllm_engine.ServerEngine`` is the client): FastAPI resolves its endpoints'
annotations from this module's globals.
"""

import contextlib
import json
import threading

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from safetensors.torch import load

from rlhfkit.rollout.vllm_engine import Adapter, VLLMError, VLLMModel
from rlhfkit.rollout.vllm_engine import Request as Sampling


def _metadata(body: bytes) -> dict:
    """A safetensors file's ``__metadata__`` (its header is 8 bytes of length, then JSON)."""
    n = int.from_bytes(body[:8], "little")
    return json.loads(body[8 : 8 + n]).get("__metadata__") or {}


def make_app(model: VLLMModel):
    """The FastAPI app of ``rlhfkit vllm-serve``: one request at a time (the trainer's)."""
    app, lock = FastAPI(), threading.Lock()

    @app.get("/health")
    def health():
        return {"ok": True, "max_lora_rank": model.max_lora_rank}

    @app.post("/load_weights")
    async def load_weights(req: Request):
        body = await req.body()
        try:
            weights = load(body)
        except Exception as e:
            raise HTTPException(400, f"the body is not a safetensors file: {e}") from e
        with lock:
            model.load(weights.items())
        return {"loaded": len(weights)}

    @app.post("/load_lora")
    async def load_lora(req: Request):
        body = await req.body()
        try:
            adapter = Adapter(load(body), json.loads(_metadata(body)["adapter_config"]))
        except Exception as e:
            raise HTTPException(
                400, f"the body is not a safetensors adapter with 'adapter_config' metadata: {e}"
            ) from e
        with lock:
            try:
                model.load_lora(adapter)
            except VLLMError as e:
                raise HTTPException(400, str(e)) from e
        return {"loaded": len(adapter.tensors)}

    @app.post("/generate")
    def generate(payload: dict):
        try:
            fields = dict(payload["request"])
            request = Sampling(**{**fields, "stop_strings": tuple(fields["stop_strings"])})
            prompts, seeds = payload["prompts"], payload["seeds"]
        except (KeyError, TypeError) as e:
            raise HTTPException(400, f"bad /generate body: {e}") from e
        with lock:
            return {"rows": model.sample(prompts, request, seeds)}

    return app


def serve(
    model_dir: str,
    host: str,
    port: int,
    temperature: float,
    kv_cache_gb: float,
    dtype: str = "float32",
    max_lora_rank: int = 0,
) -> None:
    """``rlhfkit vllm-serve``: load ``model_dir`` into vLLM and serve it until stopped."""
    model = VLLMModel(model_dir, temperature, kv_cache_gb, dtype=dtype, max_lora_rank=max_lora_rank)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(make_app(model), host=host, port=port, log_level="warning")
