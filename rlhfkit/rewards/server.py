"""`rlhfkit serve-rm RM_DIR --host 127.0.0.1 --port N`: a trained RM behind the reward protocol
(``rewards.http``), so it can run on another machine or GPU, or serve another framework.

    POST /score   {"prompts": [...], "responses": [...], "columns"?: {...}} -> {"scores": [...]}
    GET  /health  {"status": "ok", "model": RM_DIR}

A malformed request (not JSON, wrong types, lengths that differ, more than ``max_items``) gets a
400 whose "detail" says what is wrong, and the server stays up. FastAPI + uvicorn (the ``serve``
extra); requests are scored one at a time (one model, one lock), each in batches.
"""

import json
import threading
from typing import Any

from rlhfkit.rewards.text_rm import TextRM


def check_request(body: Any, max_items: int) -> tuple[list[str], list[str]]:
    """The prompts and responses of a request body, or a ValueError saying what is wrong."""
    if not isinstance(body, dict):
        raise ValueError('the body must be a JSON object {"prompts": [...], "responses": [...]}')
    missing = [k for k in ("prompts", "responses") if k not in body]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    prompts, responses = body["prompts"], body["responses"]
    for name, v in (("prompts", prompts), ("responses", responses)):
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError(f'"{name}" must be a list of strings')
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    columns = body.get("columns", {})  # optional; an RM scores the text and reads none
    if not isinstance(columns, dict) or not all(
        isinstance(v, list) and len(v) == len(responses) for v in columns.values()
    ):
        raise ValueError('"columns" must be an object of lists, one value per response')
    if len(responses) > max_items:
        raise ValueError(f"{len(responses)} items; this server takes at most {max_items} a request")
    return prompts, responses


def make_app(rm: TextRM, name: str, max_items: int = 1024):
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    app = FastAPI(title="rlhfkit reward server")
    lock = threading.Lock()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "model": name}

    @app.post("/score")
    async def score(request: Request):
        # the raw body, parsed here, so a malformed one gets our 400 (not FastAPI's 422)
        raw = await request.body()
        try:
            prompts, responses = check_request(json.loads(raw or b"null"), max_items)
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            return JSONResponse({"detail": str(e)}, status_code=400)

        def work() -> list[float]:
            with lock:
                return rm.score(prompts, responses).tolist()

        return {"scores": await run_in_threadpool(work)}

    return app


def serve_rm(
    rm_dir: str, host: str, port: int, batch_size: int, max_items: int, device: str
) -> None:
    import uvicorn

    rm = TextRM(rm_dir, device=device, batch_size=batch_size)
    uvicorn.run(make_app(rm, str(rm_dir), max_items), host=host, port=port, log_level="warning")
