"""The HTTP routes (FastAPI): /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

A request is parsed and checked (protocol.py, requests.py), its prompts submitted to the engine
through the driver, and answered whole or streamed as server-sent events ending in
`data: [DONE]`. A client that goes away (a closed stream, or a dropped connection while a whole
answer is awaited) cancels its prompts: their rows free at their next visit.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from pipeinfer.serve import responses as R
from pipeinfer.serve.driver import Driver
from pipeinfer.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse
from pipeinfer.serve.requests import Job, build

log = logging.getLogger(__name__)
POLL_S = 1.0  # how often a whole-answer request checks that its client is still there


def create_app(driver: Driver, engine, names: list[str], api_key: str | None) -> FastAPI:
    app = FastAPI(title="pipeinfer", docs_url=None, redoc_url=None, openapi_url=None)
    tok = engine.inputs.tokenizer
    model = names[0]

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def _bug(_, e: Exception):  # a bug, not the request's fault: still OpenAI's error shape, one line
        log.exception("request failed")
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}"[:300]).body(), status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                             code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        if driver.healthy and not driver.draining:
            return {"status": "ok"}
        why = driver.failure or ("shutting down" if driver.draining else "the engine is not running")
        return JSONResponse({"status": "failed", "reason": why}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(driver.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "pipeinfer",
                                            "max_model_len": getattr(engine.inputs.model_config,
                                                                     "max_position_embeddings", None)}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(request, parse(await request.body(), CompletionRequest))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _serve(request, parse(await request.body(), ChatRequest))

    async def _serve(request: Request, req):
        job = build(req, engine, names)
        queue: asyncio.Queue = asyncio.Queue()
        opens = driver.submit(job.prompts, queue)
        rid, created = R.new_id(job.chat)
        if job.stream:
            return StreamingResponse(_stream(job, opens, queue, rid, created), media_type="text/event-stream")
        dones = [None] * len(opens)
        try:
            while any(d is None for d in dones):
                try:
                    kind, choice, *rest = await asyncio.wait_for(queue.get(), POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        driver.cancel(opens)
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "error":
                    raise ApiError(500, f"the pipeline failed: {rest[0]}")
                if kind == "done":
                    dones[choice] = rest[0]
        except BaseException:
            driver.cancel(opens)
            raise
        return _whole(job, dones, rid, created)

    def _whole(job: Job, dones: list, rid: str, created: int) -> dict:
        choices = []
        for c, (p, d) in enumerate(zip(job.prompts, dones)):
            text = R.answer_text(tok, d.ids, d.finish)
            ch = {"index": c, "finish_reason": R.FINISH[d.finish[0]]}
            if job.chat:
                ch["message"] = {"role": "assistant", "content": text}
                ch["logprobs"] = R.chat_logprobs(tok, d.ids, d.logprobs, job.logprobs) if job.logprobs is not None \
                    else None
            else:
                prefix = p.text if job.echo else ""
                ch["text"] = prefix + text
                ch["logprobs"] = R.completion_logprobs(
                    tok, d.ids, d.logprobs, job.logprobs, len(prefix),
                    p.ids if job.echo else None, d.prompt_logprobs, d.prompt_argmax) \
                    if job.logprobs is not None else None
            choices.append(ch)
        body = R.envelope(job.chat, model, False, rid, created)
        body.update(choices=choices, usage=R.usage(sum(len(p.ids) for p in job.prompts),
                                                   sum(len(d.ids) for d in dones)))
        return body

    async def _stream(job: Job, opens: list, queue: asyncio.Queue, rid: str, created: int):
        texts = [R.StreamText(tok, job.stops) for _ in opens]
        counted = [0] * len(opens)  # tokens whose log-probabilities were sent
        left, finished = len(opens), False

        def chunk(c: int, delta: str, rows: list, reason=None) -> str:
            body = R.envelope(job.chat, model, True, rid, created)
            ids = texts[c].ids[counted[c]:counted[c] + len(rows)]
            counted[c] += len(rows)
            if job.chat:
                ch = {"index": c, "delta": {"content": delta} if delta or reason is None else {},
                      "logprobs": R.chat_logprobs(tok, ids, rows, job.logprobs) if job.logprobs is not None and rows
                      else None, "finish_reason": reason}
            else:
                ch = {"index": c, "text": delta, "finish_reason": reason,
                      "logprobs": R.completion_logprobs(tok, ids, rows, job.logprobs) if job.logprobs is not None
                      and rows else None}
            body["choices"] = [ch]
            if job.include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        try:
            for c, p in enumerate(job.prompts):
                if job.chat:
                    body = R.envelope(True, model, True, rid, created)
                    body["choices"] = [{"index": c, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]
                    yield f"data: {json.dumps(body)}\n\n"
                elif job.echo:
                    yield chunk(c, p.text, [])
            while left:
                kind, c, *rest = await queue.get()
                if kind == "token":
                    token, row = rest
                    delta = texts[c].add(token)
                    rows = [row] if job.logprobs is not None and row is not None else []
                    if delta or rows:
                        yield chunk(c, delta, rows)
                elif kind == "done":
                    d: R.Done = rest[0]
                    texts[c].ids = list(d.ids)  # the answer's own ids (a micro_batches schedule streamed none)
                    rows = (d.logprobs or [])[counted[c]:] if job.logprobs is not None else []
                    yield chunk(c, texts[c].finish(R.answer_text(tok, d.ids, d.finish)), rows,
                                R.FINISH[d.finish[0]])
                    left -= 1
                else:
                    yield "data: " + json.dumps(ApiError(500, f"the pipeline failed: {rest[0]}").body()) + "\n\n"
                    finished = True
                    return
            if job.include_usage:
                body = R.envelope(job.chat, model, True, rid, created)
                body.update(choices=[], usage=R.usage(sum(len(p.ids) for p in job.prompts),
                                                      sum(len(t.ids) for t in texts)))
                yield f"data: {json.dumps(body)}\n\n"
            finished = True
            yield "data: [DONE]\n\n"
        finally:
            if not finished:
                driver.cancel(opens)

    return app
