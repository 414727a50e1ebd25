"""An OpenAI-compatible chat server with per-request steering (`saesteer serve`).

Endpoints: `GET /v1/models`, `GET /v1/steering` (presets and the default) and `POST /v1/chat/completions`
(streamed or not). A request picks its steering with the extra body field `steering`: a preset name, a
spec object or a spec as a JSON string (`extra_body={"steering": ...}` in the openai client).

Honoured: messages (text content), max_tokens / max_completion_tokens, temperature (omitted or 0:
greedy, unlike OpenAI's default of 1), top_p, seed, stop, stream, stream_options.include_usage. n > 1
and logprobs are refused; other OpenAI fields and `model` are ignored.

One worker thread owns the model and runs every generation. Queued requests with the same steering
and sampling settings share one batched `generate` call; the steering hooks are installed only for
that call, so steering never leaks between requests. A seeded request runs alone, so its seed
reproduces its reply.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from starlette.exceptions import HTTPException
from transformers import StoppingCriteria, StoppingCriteriaList

from saesteer.errors import SaesteerError
from saesteer.models import LoadedModel, chat_prompts
from saesteer.steering import PRESETS, Conditional, Steering, parse_steering, steering_from_dict

log = logging.getLogger("saesteer.serve")


@dataclass
class ServeConfig:
    """Server settings; `steering` is the default for requests that name none (preset, JSON or file)."""

    model_name: str | None = None  # reported in the API; default: the model spec
    steering: str | None = None
    max_tokens: int = 512  # the most a request may ask for
    default_max_tokens: int = 128  # for requests that set none (capped at max_tokens)
    max_prompt_tokens: int = 2048
    max_batch_size: int = 16
    max_body_bytes: int = 1 << 20

    def __post_init__(self):
        for name in ("max_tokens", "default_max_tokens", "max_prompt_tokens", "max_batch_size", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise SaesteerError(f"{name} must be at least 1, not {getattr(self, name)}")


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
                raise ValueError("only text content parts are supported")
            return "".join(p["text"] for p in value)
        return value


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    logprobs: bool | None = None
    stream: bool = False
    stream_options: dict | None = None
    steering: Any = None  # a preset name, a spec object or a spec as a JSON string


@dataclass(eq=False)
class _Job:
    """One request on its way through the worker; the worker reports to `events` on the request's loop."""

    ids: list[int]
    steering: Steering
    key: tuple  # requests with equal keys may share a batch
    max_tokens: int
    stop: list[str]
    stream: bool
    sampling: dict
    seed: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)
    generated: int = 0
    text: str = ""
    sent: int = 0
    finish: str | None = None
    cancelled: bool = False

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.ids), "completion_tokens": self.generated,
                "total_tokens": len(self.ids) + self.generated}

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the request's loop is gone (server shutting down)
            pass

    def add(self, token: int, tokenizer, eos: set[int]) -> None:
        """Take the row's next token: apply stop strings and the token limit, stream the stable text."""
        if self.cancelled:
            self.finish = "cancelled"
            return
        self.generated += 1
        if token in eos:
            self.finish = "stop"
        else:
            self.tokens.append(token)
            if len(self.tokens) >= self.max_tokens:
                self.finish = "length"
        if self.stream or self.stop or self.finish:  # other replies are decoded once, at the end
            self.text = tokenizer.decode(self.tokens, skip_special_tokens=True)
            hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.finish = self.text[: min(hits)], "stop"
        if self.stream:
            # Hold back what may still change: a possible stop-string prefix, trailing whitespace
            # (decoding may clean it up) and half-decoded characters.
            end = len(self.text)
            if self.finish is None:
                end = len(self.text.rstrip().rstrip("\ufffd")) - max((len(s) - 1 for s in self.stop), default=0)
            if end > self.sent:
                self.emit("delta", self.text[self.sent : end])
                self.sent = end
        if self.finish:
            self.emit("done")


class _Rows(StoppingCriteria):
    """Called by `generate` after every step: feeds each row's token to its job and reports finished rows."""

    def __init__(self, jobs: list[_Job], tokenizer, eos: set[int]):
        self.jobs, self.tokenizer, self.eos = jobs, tokenizer, eos

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for job, token in zip(self.jobs, input_ids[:, -1].tolist()):
            if job.finish is None:
                job.add(token, self.tokenizer, self.eos)
        return torch.tensor([job.finish is not None for job in self.jobs], device=input_ids.device)


class _Worker:
    """The one thread that runs the model: takes queued jobs, batches compatible ones, generates."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int):
        self.loaded, self.max_batch_size = loaded, max_batch_size
        self.inbox: queue.Queue[_Job | None] = queue.Queue()
        eos = loaded.model.generation_config.eos_token_id
        self.eos = {*(eos if isinstance(eos, list) else [eos] if eos is not None else []), loaded.tokenizer.eos_token_id}
        self.thread = threading.Thread(target=self._loop, name="saesteer-model", daemon=True)

    def _loop(self) -> None:
        pending: list[_Job] = []
        while True:
            if not pending:
                pending.append(self.inbox.get())
            while not self.inbox.empty():
                pending.append(self.inbox.get_nowait())
            if None in pending:  # shutdown
                for job in pending:
                    if job is not None:
                        job.emit("error", ApiError(503, "the server is shutting down"))
                return
            pending = [job for job in pending if not job.cancelled]
            if not pending:
                continue
            head = pending[0]
            batch = [head] if head.seed is not None else [
                job for job in pending if job.seed is None and job.key == head.key][: self.max_batch_size]
            pending = [job for job in pending if job not in batch]
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        loaded, head = self.loaded, batch[0]
        width = max(len(job.ids) for job in batch)
        ids = torch.full((len(batch), width), loaded.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, job in enumerate(batch):  # left padding, as `models.generate` does
            ids[row, width - len(job.ids) :] = torch.tensor(job.ids)
            mask[row, width - len(job.ids) :] = 1
        try:
            with torch.inference_mode(), head.steering.applied(loaded):
                if head.seed is not None:
                    torch.manual_seed(head.seed)
                loaded.model.generate(
                    input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                    max_new_tokens=max(job.max_tokens for job in batch), pad_token_id=loaded.tokenizer.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([_Rows(batch, loaded.tokenizer, self.eos)]), **head.sampling)
        except SaesteerError as err:
            error = ApiError(400, str(err), param="steering")
        except Exception as err:
            log.exception("generation failed")
            error = ApiError(500, f"generation failed: {type(err).__name__}: {err}")
        else:
            for job in batch:
                if job.finish is None:  # generate stopped on its own (model length limit)
                    job.finish = "length"
                    job.emit("done")
            return
        for job in batch:
            if job.finish is None:
                job.finish = "error"
                job.emit("error", error)


def build_steering(spec: dict) -> Steering:
    """A steering method from a client's spec, with every field type-checked (one-line SaesteerError)."""
    try:
        steering = steering_from_dict(spec)  # unknown method or field names
    except (TypeError, ValueError) as err:
        raise SaesteerError(f"bad steering spec: {err}") from None
    if isinstance(steering, Conditional):
        build_steering(steering.steering)
    try:
        return _adapter(type(steering)).validate_python({k: v for k, v in spec.items() if k != "method"})
    except ValidationError as err:
        first = err.errors()[0]
        raise SaesteerError(f"bad {steering.method} steering field {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


@functools.cache
def _adapter(cls: type[Steering]) -> TypeAdapter:
    return TypeAdapter(cls)


def _request_steering(value: Any, default: Steering) -> Steering:
    if value is None:
        return default
    if isinstance(value, str):
        if value.strip() in PRESETS:
            return build_steering(PRESETS[value.strip()])
        if not value.strip().startswith("{"):
            raise SaesteerError(f"unknown steering preset {value!r}: use one of {', '.join(PRESETS)} or a spec object")
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise SaesteerError(f"steering is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise SaesteerError("steering must be a preset name or a spec object")
    return build_steering(value)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 once it passes `limit` (the rest is drained, not kept)."""
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
    if size > limit:
        raise ApiError(413, f"request body is {size} bytes, above this server's limit of {limit}", code="request_too_large")
    return bytes(body)


def _parse(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"])
        raise ApiError(400, f"{param}: {first['msg'].removeprefix('Value error, ')}", param=param) from None


def create_app(loaded: LoadedModel, config: ServeConfig) -> FastAPI:
    """The FastAPI app serving `loaded`; its model worker starts and stops with the app."""
    default = parse_steering(config.steering)
    with default.applied(loaded):  # a bad default (e.g. feature out of range) fails here, not per request
        pass
    name = config.model_name or loaded.spec
    worker = _Worker(loaded, config.max_batch_size)

    async def lifespan(_app: FastAPI):
        worker.thread.start()
        yield
        worker.inbox.put(None)
        await asyncio.to_thread(worker.thread.join)

    app = FastAPI(title="saesteer", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "saesteer",
                                            "steering_presets": list(PRESETS), "default_steering": default.to_dict()}]}

    @app.get("/v1/steering")
    async def steering_presets() -> dict:
        return {"object": "list", "default": default.to_dict(),
                "data": [{"name": preset, "spec": spec} for preset, spec in PRESETS.items()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = _parse(await _read_body(request, config.max_body_bytes))
        job = _job(req)
        worker.inbox.put(job)
        try:
            first = await job.events.get()
        except asyncio.CancelledError:  # the client went away
            job.cancelled = True
            raise
        if first[0] == "error":
            raise first[1]
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if not req.stream:
            return {**base, "object": "chat.completion", "steering": job.steering.to_dict(), "usage": job.usage(),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                                 "finish_reason": job.finish, "logprobs": None}]}
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(job, first, base, include_usage), media_type="text/event-stream")

    def _job(req: ChatRequest) -> _Job:
        if req.n != 1:
            raise ApiError(400, f"n={req.n} is not supported: this server returns one choice", param="n")
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens or min(config.default_max_tokens, config.max_tokens)
        if max_tokens > config.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit of {config.max_tokens}", param="max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        if len(stop) > 4 or not all(stop):
            raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
        try:
            steering = _request_steering(req.steering, default)
            conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in req.messages]
            prompt = chat_prompts(loaded, [steering.prepare(conversation)])[0]
        except SaesteerError as err:
            raise ApiError(400, str(err), param="steering") from None
        except TemplateError as err:  # the model's chat template rejected the conversation
            raise ApiError(400, f"cannot render the conversation with the chat template: {err}", param="messages") from None
        ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > config.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(ids)} tokens, above this server's limit of {config.max_prompt_tokens}",
                           param="messages", code="context_length_exceeded")
        if req.temperature:
            sampling = {"do_sample": True, "temperature": req.temperature, "top_p": req.top_p or 1.0, "top_k": 0}
        else:
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        key = (json.dumps(steering.to_dict(), sort_keys=True, default=str), json.dumps(sampling))
        return _Job(ids=ids, steering=steering, key=key, max_tokens=max_tokens, stop=stop, stream=req.stream,
                    sampling=sampling, seed=req.seed if req.temperature else None, loop=asyncio.get_running_loop())

    return app


async def _sse(job: _Job, event: tuple, base: dict, include_usage: bool):
    """Server-sent events in OpenAI's chat.completion.chunk format, ending with `data: [DONE]`."""

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while event[0] == "delta":
            yield chunk({"content": event[1]})
            event = await job.events.get()
        if event[0] == "error":
            yield f"data: {json.dumps(event[1].body())}\n\n"
            return
        yield chunk({}, job.finish)
        if include_usage:
            yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [], 'usage': job.usage()})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = job.finish is None
