"""``rlhfkit vllm-serve``: a policy in vLLM behind HTTP, for ``rollout.vllm_mode: server``.

The protocol (docs/vllm.md), one request at a time (the trainer's):
- ``GET /health`` -> ``{"ok": true}``;
- ``POST /load_weights``, the body a safetensors file of the policy's weights under its HF
  checkpoint's names -> ``{"loaded": n}``;
- ``POST /generate`` ``{"prompts": [[ids]], "request": {max_new_tokens, eos_id, temperature,
  top_k, top_p, stop_strings}, "seeds": [one per prompt]}`` -> ``{"rows": [[ids, logprobs,
  stopped]]}``.

Weights travel in the request body, so the server may run on another machine; on one machine a
SmolLM2-sized policy (540 MB in fp32) takes ~1 s over the loopback. Not imported by the trainer
(``rollout/vllm_engine.ServerEngine`` is the client): FastAPI resolves its endpoints'
annotations from this module's globals.
"""

import contextlib
import threading

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from safetensors.torch import load

from rlhfkit.rollout.vllm_engine import Request as Sampling
from rlhfkit.rollout.vllm_engine import VLLMModel


def make_app(model: VLLMModel):
    """The FastAPI app of ``rlhfkit vllm-serve``: one request at a time (the trainer's)."""
    app, lock = FastAPI(), threading.Lock()

    @app.get("/health")
    def health():
        return {"ok": True}

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
) -> None:
    """``rlhfkit vllm-serve``: load ``model_dir`` into vLLM and serve it until stopped."""
    model = VLLMModel(model_dir, temperature, kv_cache_gb, dtype=dtype)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(make_app(model), host=host, port=port, log_level="warning")
