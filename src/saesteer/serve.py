"""An OpenAI-compatible chat server with per-request steering (`saesteer serve`).

Endpoints: `GET /v1/models`, `GET /v1/steering` (presets and the default) and `POST /v1/chat/completions`
(streamed or not). A request picks its steering with the extra body field `steering`: a preset name, a
spec object or a spec as a JSON string (`extra_body={"steering": ...}` in the openai client).

Honoured: messages (text content), max_tokens / max_completion_tokens, temperature (omitted, 0 or
below MIN_TEMPERATURE: greedy, unlike OpenAI's default of 1), top_p, seed, stop, stream, stream_options.include_usage. n > 1
and logprobs are refused; other OpenAI fields and `model` are ignored.

One engine thread owns the model and batches continuously: a request joins the running batch at the
next decoding step, rows with different steerings share it (each row steered by its own edits, exact),
and a row whose client has gone away leaves it at the next step, streamed or not. Each sampled row has
its own random generator, so a seed reproduces its reply whatever else is running.

Requests may name files (an SAE folder, a direction, a detector) only inside the shipped artefacts and
the directories the operator allows (`allow_dirs`); presets are trusted. A request's steering is bounded
before it runs (`max_edits`, `max_files`). With `api_key` set, every request needs
`Authorization: Bearer <key>`, the API docs included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import h11
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from saesteer.artefacts import resolve, shipped_dir
from saesteer.config import ServeConfig
from saesteer.detectors import GATE_TURNS, turns
from saesteer.engine import Engine, Reply
from saesteer.errors import SaesteerError, short
from saesteer.models import LoadedModel
from saesteer.steering import PRESETS, Conditional, Steering, parse_steering, render, steering_from_dict

log = logging.getLogger("saesteer.serve")
MIN_TEMPERATURE = (
    1e-3  # below it a request decodes greedily: float32 logits / 1e-300 overflow to NaN probabilities
)


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
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in value
            ):
                raise ValueError("only text content parts are supported")
            value = "".join(p["text"] for p in value)
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("content is not valid Unicode text (a lone surrogate?)") from None
        return value


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch's generators accept
    stop: str | list[str] | None = None
    n: int = 1
    logprobs: bool | None = None
    stream: bool = False
    stream_options: dict | None = None
    steering: Any = None  # a preset name, a spec object or a spec as a JSON string


@dataclass(eq=False)
class _Job:
    """One request on its way through the engine; the engine reports to `events` on the request's loop."""

    request: Reply  # the prompt's ids, decoding settings and, once admitted, the steering's edits
    steering: Steering  # as it runs: files at the real paths the server checked
    spec: dict  # the steering as the request named it (echoed in the response)
    stream: bool
    loop: asyncio.AbstractEventLoop
    tokenizer: Any
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    text: str = ""
    sent: int = 0
    finish: str | None = None

    @property
    def cancelled(self) -> bool:
        return self.request.cancelled

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        self.request.cancelled = value

    def usage(self) -> dict:
        prompt, completion = len(self.request.ids), self.request.generated
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the request's loop is gone (server shutting down)
            pass

    def fail(self, error: ApiError) -> None:
        if self.finish is None:
            self.finish = "error"
            self.emit("error", error)

    def update(self, request: Reply) -> None:
        """The engine took a token or ended the row: cut at a stop string, stream the stable text."""
        if request.finish == "nonfinite":
            message = "the steering drove the model's output to NaN or inf: use smaller values"
            return self.fail(ApiError(400, message, param="steering"))
        if request.finish == "cancelled" or self.finish is not None:
            self.finish = self.finish or "cancelled"
            return
        stop = request.stop
        if self.stream or stop or request.finish:  # other replies are decoded once, at the end
            self.text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
            hits = [i for i in (self.text.find(s) for s in stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
        if self.stream:
            # Hold back what may still change: a possible stop-string prefix, trailing whitespace
            # (decoding may clean it up) and half-decoded characters.
            end = len(self.text)
            if request.finish is None:
                end = len(self.text.rstrip().rstrip("\ufffd")) - max((len(s) - 1 for s in stop), default=0)
            if end > self.sent:
                self.emit("delta", self.text[self.sent : end])
                self.sent = end
        if request.finish:
            self.finish = request.finish
            self.emit("done")


class _EngineThread:
    """The one thread that runs the model: requests join `saesteer.engine`'s continuous batch at the next
    step. Before a job is admitted its steering decides its edits (a conditional method's gate scores its
    prompt here, once); a bad spec fails that job with a 400, and a failed step fails the batch with a 500,
    never the loop."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int):
        self.loaded, self.max_batch_size = loaded, max_batch_size
        self.inbox: queue.Queue[_Job | None] = queue.Queue()
        self.engine = Engine(loaded, max_batch_size, max_batch_size)
        self.jobs: dict[Reply, _Job] = {}
        self.thread = threading.Thread(target=self._loop, name="saesteer-model", daemon=True)

    def _loop(self) -> None:
        while True:
            arrived = [] if self.jobs else [self.inbox.get()]
            while not self.inbox.empty():
                arrived.append(self.inbox.get_nowait())
            if None in arrived:  # shutdown
                for job in [*self.jobs.values(), *arrived]:
                    if job is not None:
                        job.fail(ApiError(503, "the server is shutting down"))
                return
            for job in self._guarded(arrived, self._prepare, arrived) or []:
                self.jobs[job.request] = job
                self.engine.waiting.append(job.request)
            if self.jobs and self._guarded(list(self.jobs.values()), self.engine.step) is None:
                self.engine = Engine(self.loaded, self.max_batch_size, self.max_batch_size)
                self.jobs.clear()
            for request in [r for r in self.jobs if r.finish is not None]:
                del self.jobs[request]

    def _prepare(self, jobs: list[_Job]) -> list[_Job]:
        """Decide the edits of newly arrived jobs, one `row_edits` call per distinct steering (a conditional
        gate scores their prompts in one pass, and rows of one steering share its edits, so the engine edits
        them in one call); returns the jobs ready to run. A job whose steering fails fails alone: a 400, or a
        500 for an unexpected error."""
        groups: dict[str, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(json.dumps(job.steering.to_dict(), sort_keys=True), []).append(job)
        ready = []
        for group in groups.values():
            try:
                edits = group[0].steering.row_edits(self.loaded, [job.request.ids for job in group])
            except Exception as err:
                if len(group) > 1:  # find the failing job: each alone
                    ready += [job for one in group for job in self._prepare([one])]
                elif isinstance(err, SaesteerError):
                    group[0].fail(ApiError(400, str(err), param="steering"))
                else:
                    log.exception("deciding a request's steering failed")
                    group[0].fail(ApiError(500, "generation failed; the server's log has the details"))
                continue
            for job, row in zip(group, edits):
                job.request.edits = row
            ready += group
        return ready

    def _guarded(self, jobs: list[_Job], fn, *args):
        """`fn(*args)`, or None after a failure, which ends `jobs` with a 500 in OpenAI's format."""
        try:
            with torch.inference_mode():
                return fn(*args)
        except Exception:
            log.exception("generation failed")
            for job in jobs:
                job.fail(ApiError(500, "generation failed; the server's log has the details"))
            return None


def _request_steering(
    value: Any, default: Steering, allowed: list[Path], config: ServeConfig, loaded: LoadedModel
) -> tuple[Steering, dict]:
    """The steering a request asks for, checked against `loaded` once, and its spec as the request gave it (echoed
    in the response): a preset (trusted), or a spec within `config`'s bounds on edits and files, whose files must
    lie in `allowed` and are then read at the real paths that were checked."""
    if value is None:
        default.check(loaded)
        return default, default.to_dict()
    if isinstance(value, str):
        if value.strip() in PRESETS:
            preset = steering_from_dict(PRESETS[value.strip()])
            preset.check(loaded)
            return preset, preset.to_dict()
        if not value.strip().startswith("{"):
            raise SaesteerError(
                f"unknown steering preset {short(value)!r}: use one of {', '.join(PRESETS)} or a spec object"
            )
        try:
            value = json.loads(value)
        except (
            ValueError,
            RecursionError,
        ) as err:  # ValueError: bad JSON, or an integer of over 4,300 digits
            raise SaesteerError(f"steering is not valid JSON: {short(str(err), 200)}") from None
    if not isinstance(value, dict):
        raise SaesteerError("steering must be a preset name or a spec object")
    steering = steering_from_dict(value)
    edits = sum(len(getattr(leaf, "features", None) or [None]) for leaf in steering.leaves())
    if edits > config.max_edits:
        raise SaesteerError(
            f"the steering makes {edits} edits, above this server's limit of {config.max_edits}"
        )
    files = set(steering.files())
    if len(files) > config.max_files:
        raise SaesteerError(
            f"the steering names {len(files)} files, above this server's limit of {config.max_files}"
        )
    real = [_checked(path, allowed) for path in files]
    by_path = dict(zip(files, real))
    # the steering reads what was checked, whatever a symlink points to later
    pinned = steering.with_files(by_path.__getitem__)
    own = pinned.gate_detector().sae if isinstance(pinned, Conditional) else None
    if own:  # the detector's own SAE: checked before it is read
        real.append(_checked(own, allowed))
    pinned.check(loaded)  # loads every file, once: later passes use what was loaded here
    if any(_checked(path, allowed) != path for path in real):  # a folder on the way became a symlink
        raise SaesteerError("a steering file moved while the server read it: send the request again")
    return pinned, steering.to_dict()


def _checked(path: str, allowed: list[Path]) -> str:
    """The real path of `path` (after `builtin:` and symlinks) when it is a regular file, or a folder of regular
    files, inside `allowed`; otherwise a SaesteerError that reads the same whether or not the file exists."""

    def inside(p: Path) -> bool:
        return any(p.is_relative_to(root) for root in allowed)

    try:
        real = Path(resolve(path)).resolve(strict=True)
        if (real.is_file() and inside(real)) or (
            real.is_dir()
            and inside(real)
            and all(inside(entry.resolve()) and entry.resolve().is_file() for entry in real.iterdir())
        ):
            return str(real)
    except (OSError, ValueError, RuntimeError, SaesteerError):  # missing, too long, a loop, leaves builtin:
        pass
    raise SaesteerError(
        f"steering file {short(path)!r} is not available on this server: use a preset, or a "
        f"file under a directory the server allows (--allow-dir)"
    )


async def _read_body(request: Request, limit: int, seconds: float) -> bytes:
    """The request body, or 413 once it passes `limit` (the rest is drained, not kept), 408 when it takes over
    `seconds` to arrive (a Content-Length the body never reaches), 400 when the client leaves mid-upload (one
    INFO line, no traceback)."""
    body, size = bytearray(), 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                body.extend(chunk)

    try:
        await asyncio.wait_for(read(), seconds)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {seconds:g} s", code="timeout") from None
    except ClientDisconnect:
        log.info("client left while sending its request body")
        raise ApiError(400, "the client left while sending its request body") from None
    if size > limit:
        raise ApiError(
            413,
            f"request body is {size} bytes, above this server's limit of {limit}",
            code="request_too_large",
        )
    return bytes(body)


def _parse(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, an integer of over 4,300 digits
        raise ApiError(
            400, f"request body is not valid JSON: {short(str(err), 200)}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = short(".".join(str(part) for part in first["loc"]))
        raise ApiError(400, f"{param}: {first['msg'].removeprefix('Value error, ')}", param=param) from None


def _request_schema() -> dict:
    """The OpenAPI request body of chat completions (the handler reads the raw body to bound its size)."""
    schema = ChatRequest.model_json_schema()
    schema["properties"]["messages"]["items"] = schema.pop("$defs")["Message"]
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def _first_event(job: _Job, request: Request) -> tuple | None:
    """The job's first event, or None once the client has gone away (the job is then cancelled)."""
    getter = asyncio.ensure_future(job.events.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=0.2)
            if done:
                return getter.result()
            if await request.is_disconnected():
                job.cancelled = True
                return None
    finally:
        getter.cancel()


@dataclass
class _Service:
    """What the endpoints answer with: the model, its engine, the default steering and the server's limits."""

    loaded: LoadedModel
    config: ServeConfig
    default: Steering
    allowed: list[Path]  # resolved folders whose files request specs may name
    engine: _EngineThread

    @property
    def name(self) -> str:
        return self.config.model_name or self.loaded.spec

    async def models(self) -> dict:
        model = {
            "id": self.name,
            "object": "model",
            "created": 0,
            "owned_by": "saesteer",
            "steering_presets": list(PRESETS),
            "default_steering": self.default.to_dict(),
        }
        return {"object": "list", "data": [model]}

    async def steering_presets(self) -> dict:
        presets = [{"name": preset, "spec": spec} for preset, spec in PRESETS.items()]
        return {"object": "list", "default": self.default.to_dict(), "data": presets}

    async def chat(self, request: Request):
        req = _parse(await _read_body(request, self.config.max_body_bytes, self.config.body_seconds))
        # checks, file loads and tokenisation run off the event loop: other streams keep flowing
        job = await asyncio.to_thread(self.job, req, asyncio.get_running_loop())
        self.engine.inbox.put(job)
        try:
            first = await _first_event(job, request)
        except asyncio.CancelledError:  # the server is stopping the request
            job.cancelled = True
            raise
        if first is None:  # nobody is left to read an answer
            return Response(status_code=499)
        if first[0] == "error":
            raise first[1]
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.name}
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(job, first, base, include_usage), media_type="text/event-stream")
        message = {"role": "assistant", "content": job.text}
        choice = {"index": 0, "message": message, "finish_reason": job.finish, "logprobs": None}
        return {
            **base,
            "object": "chat.completion",
            "steering": job.spec,
            "usage": job.usage(),
            "choices": [choice],
        }

    def job(self, req: ChatRequest, loop: asyncio.AbstractEventLoop) -> _Job:
        """A request checked against the server's limits, its steering resolved, its files loaded and checked
        against the model (a bad file fails this request alone, before it joins a batch) and its prompt
        tokenised; the engine reports to `loop`."""
        config = self.config
        if req.n != 1:
            raise ApiError(400, f"n={req.n} is not supported: this server returns one choice", param="n")
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        max_tokens = (
            req.max_completion_tokens or req.max_tokens or min(config.default_max_tokens, config.max_tokens)
        )
        if max_tokens > config.max_tokens:
            message = f"max_tokens {max_tokens} is above this server's limit of {config.max_tokens}"
            raise ApiError(400, message, param="max_tokens")
        stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
        if len(stop) > 4 or not all(stop):
            raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
        ids, steering, spec = self.prompt_ids(req)
        if len(ids) > config.max_prompt_tokens:
            message = (
                f"the prompt is {len(ids)} tokens, above this server's limit of {config.max_prompt_tokens}"
            )
            raise ApiError(400, message, param="messages", code="context_length_exceeded")
        request = Reply(ids, max_new_tokens=max_tokens, stop=tuple(stop))
        if req.temperature and req.temperature >= MIN_TEMPERATURE:
            request.temperature, request.top_p = req.temperature, req.top_p or 1.0
            request.generator = torch.Generator(self.loaded.device)
            request.generator.manual_seed(req.seed) if req.seed is not None else request.generator.seed()
        job = _Job(request, steering, spec, req.stream, loop, self.loaded.tokenizer)
        request.on_update = job.update
        return job

    def prompt_ids(self, req: ChatRequest) -> tuple[list[int], Steering, dict]:
        """The request's conversation rendered (after the steering's `prepare`) as token ids, its steering, and
        the steering's spec as the request gave it."""
        try:
            steering, spec = _request_steering(
                req.steering, self.default, self.allowed, self.config, self.loaded
            )
            roles = {"developer": "system"}
            conversation = [{"role": roles.get(m.role, m.role), "content": m.content} for m in req.messages]
            prompt = render(self.loaded, [conversation], steering)[0]
        except SaesteerError as err:
            raise ApiError(400, str(err), param="steering") from None
        except TemplateError as err:  # the model's chat template rejected the conversation
            message = f"cannot render the conversation with the chat template: {short(str(err), 200)}"
            raise ApiError(400, message, param="messages") from None
        count = len(turns(self.loaded, prompt)) if isinstance(steering, Conditional) else 0
        if count > GATE_TURNS:  # refused here, before the engine thread sees it
            message = f"the conversation has {count} turns; the harm gate scores at most {GATE_TURNS}"
            raise ApiError(400, message, param="messages")
        return self.loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"], steering, spec


def uvicorn_options(config: ServeConfig) -> dict:
    """uvicorn's settings for this server: h11 with a deadline on request headers (`header_seconds`), 5 s
    keep-alive and 64 KiB of header text at most."""

    class HeaderDeadline(H11Protocol):
        """uvicorn's h11 protocol, closing a connection whose request headers have not all arrived within
        `header_seconds` of its opening or of its last response (a slow-loris client)."""

        served = 0

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            self.served += 1
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            self.loop.call_later(config.header_seconds, self._expire, self.served)

        def _expire(self, served: int) -> None:
            if (
                served == self.served
                and self.conn.their_state is h11.IDLE
                and not self.transport.is_closing()
            ):
                log.info(
                    "closed a connection that sent no complete request headers in %gs", config.header_seconds
                )
                self.transport.close()

    return {"http": HeaderDeadline, "timeout_keep_alive": 5, "h11_max_incomplete_event_size": 64 * 1024}


def create_app(loaded: LoadedModel, config: ServeConfig) -> FastAPI:
    """The FastAPI app serving `loaded`; its model engine starts and stops with the app."""
    default = parse_steering(config.steering)
    with default.applied(loaded):  # a bad default (e.g. feature out of range) fails here, not per request
        pass
    allowed = [Path(d).resolve() for d in [shipped_dir(), *config.allow_dirs]]
    service = _Service(loaded, config, default, allowed, _EngineThread(loaded, config.max_batch_size))

    async def lifespan(_app: FastAPI):
        service.engine.thread.start()
        yield
        service.engine.inbox.put(None)
        await asyncio.to_thread(service.engine.thread.join)

    app = FastAPI(title="saesteer", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    if config.api_key:
        app.middleware("http")(_bearer_check(config.api_key))
    app.get("/v1/models")(service.models)
    app.get("/v1/steering")(service.steering_presets)
    app.post("/v1/chat/completions", openapi_extra=_request_schema())(service.chat)
    return app


def _bearer_check(api_key: str):
    """Middleware answering 401 to every request (the API docs included) without `Authorization: Bearer
    <api_key>`."""
    expected = f"Bearer {api_key}".encode()

    async def authenticate(request: Request, call_next):
        given = request.headers.get("authorization", "").encode("utf-8", "replace")
        if not secrets.compare_digest(given, expected):
            message = "missing or wrong API key: send `Authorization: Bearer <key>`"
            return JSONResponse(ApiError(401, message, code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    return authenticate


async def _sse(job: _Job, event: tuple, base: dict, include_usage: bool):
    """Server-sent events in OpenAI's chat.completion.chunk format, ending with `data: [DONE]`."""

    def chunk(delta: dict, finish: str | None = None) -> str:
        body = {
            **base,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
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
