"""An OpenAI-compatible HTTP server over ``AsyncEngine``.

    se-engine serve --models A B --method se --gammas 4 1 --max-batch 8 --port 8000

Endpoints: POST /v1/completions, POST /v1/chat/completions (streaming by server-sent events),
GET /v1/models (one model id per engine target; a request's ``model`` picks its target), POST
/tokenize, POST /detokenize, GET /health, GET /metrics (Prometheus text format). Every request joins the engine's
queue and is decoded in the running batch (continuous batching). Bad requests get OpenAI's error
body ``{"error": {"message", "type", "param", "code"}}`` with status 400 (404 for an unknown model,
401 without the API key where one is set, 413 for a body beyond the limit, 429 with Retry-After
while the queue is full); fields this server does not implement are refused unless they carry their
no-op value, so a request never silently means something else. Types are strict: no string, bool or
float is coerced to another type. Every response carries an ``X-Request-Id`` (the client's, if it
sent a sane one), which the server's log lines name. A client that disconnects has its requests
aborted. Tokenizing and detokenizing run in worker threads, so a long prompt holds up no other request.
"""

from __future__ import annotations

import asyncio
import copy
import ctypes
import ctypes.util
import hmac
import itertools
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import cache, partial
from typing import Annotated, Any, Literal, TypeVar

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .async_engine import AsyncEngine, EngineDeadError, EngineStepError
from .engine import Engine, GenerationResult
from .sampling import SamplingParams
from .token_text import token_bytes, token_shares

MAX_N = 16  # choices per prompt
# Defaults of the limits (OpenAIServer's arguments, serve's options).
MAX_BODY_BYTES = 4 * 2**20  # e.g. 256 prompts of 2048 token ids
MAX_REQUEST_SEQUENCES = 256  # prompts x n of one request
MAX_QUEUED_SEQUENCES = 1024  # over all requests, running or waiting
RETRY_AFTER_S = 1  # a full queue's hint: decoding frees places quickly
SHUTDOWN_TIMEOUT_S = 20.0  # under the 30 s that e.g. Kubernetes waits before a SIGKILL
SHUTDOWN_GRACE_S = 5.0  # after it, for the ended requests' last events; then uvicorn cuts the connections
TRIM_AFTER_BYTES = 2**20  # a request body this large leaves enough freed heap behind to hand back
# Sampling divides logits by the temperature and cuts at top_p in float32: a positive value below its
# smallest normal number underflows (every token then scores the same, and token 0 wins).
FLOAT32_TINY = torch.finfo(torch.float32).tiny
# A client's X-Request-Id is echoed if it looks like an id: it goes into log lines and headers verbatim.
REQUEST_ID = re.compile(r"[\w.:/+=-]{1,128}", re.ASCII)
T = TypeVar("T")
logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- request schemas

def _only(*allowed: Any) -> Any:
    """An OpenAI field this server does not implement: accepted at its no-op values (clients send
    them), refused otherwise. A bool matches only a bool (Python has False == 0)."""
    def check(value: Any) -> Any:
        if not any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed):
            raise PydanticCustomError("unsupported", "only {allowed} is supported by this server",
                                      {"allowed": " or ".join(json.dumps(a) for a in allowed)})
        return value
    return Annotated[Any, AfterValidator(check)]


def _unicode(text: str) -> str:
    """JSON's \\ud800 escape parses to a lone surrogate, which neither a tokenizer nor UTF-8 takes."""
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise PydanticCustomError("unicode", "not valid unicode: a lone surrogate at character {at}",
                                  {"at": e.start}) from None
    return text


def _not_tiny(value: float) -> float:
    if 0 < value < FLOAT32_TINY:
        raise PydanticCustomError("too_small", "{value} underflows in float32: use 0 or at least {tiny}",
                                  {"value": value, "tiny": FLOAT32_TINY})
    return value


def _false_is_none(value: Any) -> Any:
    return None if value is False else value


_Text = Annotated[str, AfterValidator(_unicode)]
_Stop = Annotated[str, Field(min_length=1)]  # a constrained str: pydantic itself refuses lone surrogates
_Scale = Annotated[float, AfterValidator(_not_tiny)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    """Fields common to both endpoints. top_k, ignore_eos and stop_token_ids are extensions (as in vLLM)."""
    model: _Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: _Scale | None = Field(None, ge=0)
    top_p: _Scale | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0: off")
    n: int = Field(1, ge=1, le=MAX_N)
    stop: _Stop | list[_Stop] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63, description="choice i uses seed + i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None  # also end on these (kept in the output)
    min_tokens: int | None = Field(None, ge=0, description="new tokens before a stop token or string may end it")
    user: _Text | None = None  # accepted for compatibility, unused
    frequency_penalty: _only(0, None) = None
    presence_penalty: _only(0, None) = None
    logit_bias: _only(None, {}) = None


class CompletionRequest(_SamplingRequest):
    prompt: _Text | list[_Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    # 0: the sampled tokens' logprobs, no alternatives; false (which clients send): none
    logprobs: Annotated[_only(None, False, 0), AfterValidator(_false_is_none)] = None
    echo: _only(False, None) = None
    suffix: _only(None, "") = None
    best_of: _only(None, 1) = None


class TextPart(_Strict):
    type: Literal["text"]
    text: _Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: _Text | list[TextPart]
    name: _Text | None = None


class ChatRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: _only(None, 0) = None
    tools: _only(None, []) = None
    tool_choice: _only(None, "none") = None
    response_format: _only(None, {"type": "text"}) = None


class TokenizeRequest(_Strict):
    """/tokenize: a prompt's token ids as a completion sees them, or the messages' as a chat does."""
    model: _Text | None = None
    prompt: _Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)


class DetokenizeRequest(_Strict):
    model: _Text | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# ---------------------------------------------------------------- errors

class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.type, self.headers = status, param, code, type, headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _api_error(exc: Exception) -> APIError:
    """Every error the handlers see, as OpenAI spells it. A ValueError is the engine refusing a request;
    anything unforeseen is a 500 (uvicorn logs its traceback)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, HTTPException):  # unknown route, wrong method
        return APIError(str(exc.detail), status=exc.status_code)
    if isinstance(exc, EngineDeadError):
        return APIError(str(exc), status=503, type="server_error")
    if isinstance(exc, EngineStepError):
        return APIError(str(exc), status=500, type="server_error", code="engine_step_failed")
    if isinstance(exc, ValueError):
        return APIError(str(exc))
    return APIError("internal server error", status=500, type="server_error")


async def _error_response(request: Request, exc: Exception) -> JSONResponse:
    error = _api_error(exc)
    _log_error(request.state.request_id, error)
    return error.response()


def _log_error(request_id: str, error: APIError) -> None:
    """A 4xx at info (the client's doing), a 5xx at error."""
    logger.log(logging.ERROR if error.status >= 500 else logging.INFO, "%s: %d %s", request_id, error.status, error)


def _validation_error(exc: RequestValidationError) -> APIError:
    """One problem of a request that failed to parse, named by its field path: the deepest, which for
    a value that matches no member of a union is the member it came closest to."""
    err = max(exc.errors(), key=lambda e: len(e["loc"]))
    if err["type"] == "json_invalid":
        return APIError(f"malformed JSON body: {err.get('ctx', {}).get('error', err['msg'])}")
    loc = [str(part) for part in err["loc"][1:]]  # drop "body"
    # Drop the union members a value was tried as ("list[int]", "function-after[...]"): they name no
    # field. A field the client made up (the last part) is kept as sent.
    made_up = len(loc) - (err["type"] == "extra_forbidden")
    loc = [part for i, part in enumerate(loc) if i >= made_up or "[" not in part]
    path = ".".join(loc) or "body"
    message = f"unsupported field {path!r}" if err["type"] == "extra_forbidden" else f"{path}: {err['msg']}"
    return APIError(message, param=loc[0] if loc else None)


# ---------------------------------------------------------------- response formats

@dataclass(frozen=True)
class _Format:
    """How one endpoint spells its responses."""
    object: str
    chunk_object: str
    id_prefix: str
    choice: Callable[[int, GenerationResult, Any], dict]  # (index, result, tokenizer) -> a choice
    delta: Callable[[int, str, str | None], dict]          # (index, new text, finish_reason) -> a chunk choice


def _completion_choice(index: int, result: GenerationResult, tokenizer: Any) -> dict:
    logprobs = None
    if result.logprobs is not None:
        tokens = token_shares(tokenizer, result.token_ids)
        # a stop string cuts the text: the tokens past it start at its end
        offsets = [min(offset, len(result.text)) for offset in itertools.accumulate((len(t) for t in tokens[:-1]),
                                                                                    initial=0)]
        logprobs = {"tokens": tokens, "token_logprobs": _finite(result.logprobs), "top_logprobs": None,
                    "text_offset": offsets}
    return {"index": index, "text": result.text, "logprobs": logprobs, "finish_reason": result.finish_reason}


def _chat_choice(index: int, result: GenerationResult, tokenizer: Any) -> dict:
    logprobs = None
    if result.logprobs is not None:
        tokens = token_shares(tokenizer, result.token_ids)
        logprobs = {"content": [{"token": t, "logprob": lp, "bytes": b, "top_logprobs": []} for t, lp, b in
                                zip(tokens, _finite(result.logprobs), token_bytes(tokenizer, result.token_ids, tokens))]}
    return {"index": index, "message": {"role": "assistant", "content": result.text}, "logprobs": logprobs,
            "finish_reason": result.finish_reason}


COMPLETION = _Format("text_completion", "text_completion", "cmpl", _completion_choice,
                     lambda i, text, finish: {"index": i, "text": text, "logprobs": None, "finish_reason": finish})
CHAT = _Format("chat.completion", "chat.completion.chunk", "chatcmpl", _chat_choice,
               lambda i, text, finish: {"index": i, "delta": {"content": text} if text else {}, "logprobs": None,
                                        "finish_reason": finish})


def _finite(logprobs: list[float]) -> list[float | None]:
    """JSON has no NaN or infinity: a logprob that is not finite (a model's NaN logits) is null."""
    return [lp if math.isfinite(lp) else None for lp in logprobs]


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, allow_nan=False)}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that call ``on_close`` however the response ends: sent, failed or abandoned
    (the event generator itself may never start, for a client gone before the status line)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


# ---------------------------------------------------------------- the app

class _Gate:
    """ASGI middleware around the app, which every HTTP request passes first: its request id (the
    handlers' ``request.state.request_id``, and every response's X-Request-Id header), the Host header
    where an allow-list is set (a 400), the API key where one is set (a 401 before the body is read;
    /health passes both, for load balancers), then the
    body size limit (413, refused on its Content-Length before a byte is read, or once the bytes read
    pass it). After a large body, the memory its handling freed goes back to the system."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, api_key: str | None, allowed_hosts: frozenset[str] | None):
        self.app, self.max_body_bytes, self.allowed_hosts = app, max_body_bytes, allowed_hosts
        self.api_key = None if api_key is None else api_key.encode()

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken tells nothing about how much of the key matched
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode("latin-1"), self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id", "")
        if not REQUEST_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            await send(message)

        host = _hostname(headers.get("host", ""))
        if self.allowed_hosts is not None and scope["path"] != "/health" and host not in self.allowed_hosts:
            error = APIError(f"host {host!r} is not one this server answers for", code="invalid_host")
            _log_error(request_id, error)
            return await error.response()(scope, receive, send_with_id)
        if self.api_key is not None and scope["path"] != "/health" and not self._authorized(headers):
            error = APIError("a valid API key is needed: send the header 'Authorization: Bearer <key>'", status=401,
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            _log_error(request_id, error)
            return await error.response()(scope, receive, send_with_id)
        length = headers.get("content-length", "")
        declared, size = int(length) if length.isdigit() else 0, 0

        async def receive_limited() -> Message:
            nonlocal size
            if declared <= self.max_body_bytes:
                message = await receive()
                size += len(message.get("body", b""))
            if max(declared, size) > self.max_body_bytes:  # raised in the handler's body read: its handler answers
                raise HTTPException(413, f"the request body exceeds this server's limit of {self.max_body_bytes} bytes")
            return message

        try:
            await self.app(scope, receive_limited, send_with_id)
        finally:
            if size >= TRIM_AFTER_BYTES:
                await asyncio.to_thread(_return_freed_memory)


def _hostname(host: str) -> str:
    """A Host header's name, without its port ("[::1]:8000" -> "::1"), lowercased."""
    if host.startswith("["):
        return host[1:host.find("]")].lower()
    return host.rpartition(":")[0].lower() if host.count(":") == 1 else host.lower()


def _return_freed_memory() -> None:
    """glibc keeps freed heap pages: a 4 MiB prompt's body, token lists and tokenizer buffers would stay
    in the RSS (some 700 MB of it). malloc_trim hands them back; a no-op without glibc."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


class OpenAIServer:
    """The request handlers over one AsyncEngine; ``app`` is the ASGI application (FastAPI's, behind
    the gate of request ids, API key and body limit).

    model_name: the model id of an engine with one target (default: its model names joined by +); a
    multi-target engine's model ids are its target names.

    max_body_bytes: larger request bodies get a 413. max_request_sequences: a request asking for
    more sequences (prompts x n) gets a 400. max_queued_sequences: the sequences of all accepted
    requests, running or waiting; a request that would pass it, or that asks for more than half the
    free places (rounded up) while others are queued, gets a 429 with Retry-After.
    api_key: every request but /health must send ``Authorization: Bearer <api_key>`` (else a 401).
    allowed_hosts: host names every request but /health must name in its Host header (else a 400);
    None: any.
    docs: serve FastAPI's /docs, /redoc and /openapi.json (behind the key too).
    """

    def __init__(self, engine: AsyncEngine, model_name: str | None = None, *, max_body_bytes: int = MAX_BODY_BYTES,
                 max_request_sequences: int = MAX_REQUEST_SEQUENCES, max_queued_sequences: int = MAX_QUEUED_SEQUENCES,
                 api_key: str | None = None, allowed_hosts: Sequence[str] | None = None, docs: bool = False):
        limits = {"max_body_bytes": max_body_bytes, "max_request_sequences": max_request_sequences,
                  "max_queued_sequences": max_queued_sequences}
        for name, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if allowed_hosts is not None and (isinstance(allowed_hosts, str) or not allowed_hosts or not all(
                isinstance(h, str) and h for h in allowed_hosts)):
            raise ValueError(f"allowed_hosts must be a non-empty list of host names (None: any), got {allowed_hosts!r}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise ValueError("api_key must be a non-empty string (None: no key)")
        self.async_engine = engine
        self.engine = engine.engine  # read here only for what never changes: tokenizer, context, vocabulary
        targets = list(self.engine.targets)
        if len(targets) > 1 and model_name is not None:
            raise ValueError(f"model_name: a multi-target engine's model ids are its target names {targets}")
        # model id -> the engine's target it serves
        self.served = ({model_name or "+".join(m.name for m in self.engine.models): targets[0]}
                       if len(targets) == 1 else {t: t for t in targets})
        self.created = int(time.time())
        self.max_request_sequences, self.max_queued_sequences = max_request_sequences, max_queued_sequences
        self.queued_sequences = 0  # of the requests accepted and not yet answered; the event loop's alone
        app = FastAPI(title="se_engine", description="OpenAI-compatible speculative ensemble server",
                      docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                      openapi_url="/openapi.json" if docs else None)
        # Outside FastAPI's own middleware, so that its 500s carry the request id too.
        self.app = _Gate(app, max_body_bytes, api_key,
                         None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts))
        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.get("/v1/models")(self.models)
        app.post("/tokenize")(self.tokenize)
        app.post("/detokenize")(self.detokenize)
        app.get("/health")(self.health)
        app.get("/metrics")(self.metrics)
        for exc in (APIError, RequestValidationError, HTTPException, ValueError, EngineDeadError, EngineStepError,
                    Exception):
            app.exception_handler(exc)(_error_response)

    # ------------------------------------------------------------ endpoints

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        prompts = [body.prompt] if isinstance(body.prompt, str) or _is_ids(body.prompt) else body.prompt
        if not prompts:
            raise APIError("prompt: must not be empty", param="prompt")
        return await self._serve(request, body, len(prompts), lambda: [self.engine.encode(p) for p in prompts],
                                 body.max_tokens, body.logprobs is not None, COMPLETION)

    async def chat_completions(self, body: ChatRequest, request: Request) -> Response:
        messages = self._chat_messages(body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens  # None: up to the context's end
        return await self._serve(request, body, 1, lambda: [self._chat_ids(messages)], max_tokens, body.logprobs, CHAT)

    def _chat_messages(self, messages: list[ChatMessage]) -> list[dict]:
        """The messages as chat templates take them (refused if the models have no template)."""
        if self.engine.tokenizer.chat_template is None:
            raise APIError("this server's models have no chat template: use /v1/completions", param="messages",
                           code="no_chat_template")
        return [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                 "\n".join(part.text for part in m.content), **({"name": m.name} if m.name else {})}
                for m in messages]

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        try:
            text = self.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:  # e.g. a template that insists on alternating roles
            raise APIError(f"messages: the chat template refused them: {e}", param="messages") from e
        return self.engine.encode(text)

    async def models(self) -> dict:
        e = self.engine
        names = e.runner_names
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "created": self.created, "owned_by": "se_engine",
            "max_model_len": e.max_len,
            "ensemble": {"models": [names[i] for i in e.targets[target].members], "method": e.method,
                         "gammas": e.gammas}} for model_id, target in self.served.items()]}

    async def tokenize(self, body: TokenizeRequest) -> dict:
        self._target(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError("send one of prompt and messages", param="prompt")
        if body.prompt is not None:
            ids = await asyncio.to_thread(self.engine.encode, body.prompt)
        else:
            ids = await asyncio.to_thread(self._chat_ids, self._chat_messages(body.messages))
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_len}

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        self._target(body.model)
        vocab = self.engine.models[0].runner.vocab_size
        if any(t >= vocab for t in body.tokens):
            raise APIError(f"tokens: token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": await asyncio.to_thread(self.engine.tokenizer.decode, body.tokens)}

    def _target(self, model: str | None) -> tuple[str, str]:
        """(model id, engine target) of a request's ``model`` (which may be left out if there is one)."""
        if model is None:
            if len(self.served) > 1:
                raise APIError(f"model: required; this server serves {list(self.served)}", param="model")
            (model,) = self.served
        if model not in self.served:
            raise APIError(f"model {model!r} does not exist; this server serves {list(self.served)}",
                           status=404, param="model", code="model_not_found")
        return model, self.served[model]

    async def health(self) -> Response:
        if not self.async_engine.alive:
            raise EngineDeadError("the engine is not running")
        return JSONResponse({"status": "ok"})

    async def metrics(self) -> Response:
        return Response(_prometheus(self.async_engine, self.served), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------ serving one request

    async def _serve(self, request: Request, body: _SamplingRequest, num_prompts: int,
                     encode: Callable[[], list[list[int]]], max_tokens: int | None, logprobs: bool,
                     fmt: _Format) -> Response:
        """Checks a request, holds queue places for its sequences (num_prompts x n), and answers it.
        encode: the prompts' token ids (it runs in a worker thread)."""
        model, target = self._target(body.model)
        if body.stream_options is not None and not body.stream:
            raise APIError("stream_options: only allowed with stream=true", param="stream_options")
        if logprobs and body.stream:
            raise APIError("logprobs are only returned by non-streaming requests", param="logprobs")
        count = num_prompts * body.n
        if count > self.max_request_sequences:
            raise APIError(f"this request asks for {count} sequences ({num_prompts} prompts x n={body.n}); this "
                           f"server takes at most {self.max_request_sequences} per request",
                           param="n" if num_prompts == 1 else "prompt")
        free = self.max_queued_sequences - self.queued_sequences
        # At most half the free places while others are queued: large requests cannot crowd out small ones.
        if count > free or (self.queued_sequences and 2 * count - 1 > free):
            raise APIError(f"the server is busy: {self.queued_sequences} sequences are queued and it holds at most "
                           f"{self.max_queued_sequences}, of which a request may take at most half the free places "
                           f"while others are queued; retry later", status=429, type="server_busy",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.queued_sequences += count  # held until the response ends, however it ends
        streaming = False
        try:
            prompts = await asyncio.to_thread(encode)
            requests = []
            for ids in prompts:
                params = self._params(body, ids, max_tokens, logprobs, fmt)
                requests += [(ids, p) for p in params]
            outputs = self.async_engine.generate_batch(requests, target)
            prompt_tokens = sum(len(ids) for ids in prompts)
            response_id = f"{fmt.id_prefix}-{uuid.uuid4().hex}"
            request_id = request.state.request_id
            logger.info("%s: %s, %d sequences of %d prompt tokens%s", request_id, response_id, count, prompt_tokens,
                        ", streamed" if body.stream else "")
            if body.stream:
                include_usage = body.stream_options is not None and body.stream_options.include_usage
                streaming = True  # the stream lets go of the places when it ends
                return _EventStream(self._stream(outputs, count, request_id, response_id, model, fmt,
                                                 prompt_tokens if include_usage else None),
                                    on_close=partial(self._release, count))
            results = await _unless_disconnected(request, _collect(outputs, count))
            if results is None:
                return Response(status_code=499)  # nginx's "client closed request": nobody reads it
            tokenizer = self.engine.tokenizer
            choices = await asyncio.to_thread(lambda: [fmt.choice(i, r, tokenizer) for i, r in enumerate(results)])
            return JSONResponse({
                "id": response_id, "object": fmt.object, "created": int(time.time()), "model": model,
                "choices": choices, "usage": _usage(prompt_tokens, sum(len(r.token_ids) for r in results))})
        finally:
            if not streaming:
                self._release(count)

    def _release(self, count: int) -> None:
        self.queued_sequences -= count

    def _params(self, body: _SamplingRequest, ids: list[int], max_tokens: int | None, logprobs: bool,
                fmt: _Format) -> list[SamplingParams]:
        """One SamplingParams per choice; the prompt's length checked against the context first."""
        engine = self.engine
        prompt_param = "messages" if fmt is CHAT else "prompt"
        if not ids:
            raise APIError(f"{prompt_param}: must not be empty", param=prompt_param)
        room = engine.max_new_tokens(len(ids))
        if room < 1:
            raise APIError(f"the prompt has {len(ids)} tokens; this model's context of {engine.max_len} tokens takes "
                           f"prompts of at most {len(ids) + room - 1}", param=prompt_param,
                           code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(f"max_tokens={max_tokens} is too large: this model's context is {engine.max_len} tokens and "
                           f"the prompt has {len(ids)}, so at most {room} new tokens fit", param="max_tokens",
                           code="context_length_exceeded")
        min_tokens = body.min_tokens or 0
        if min_tokens > (max_tokens or room):
            raise APIError(f"min_tokens={body.min_tokens} is more than the {max_tokens or room} new tokens this "
                           "request may generate (max_tokens, or what the context leaves)", param="min_tokens")
        vocab = engine.vocab_size
        if not all(0 <= t < vocab for t in ids):  # after the length check: it bounds this scan
            raise APIError(f"prompt: token ids must be in [0, {vocab})", param="prompt")
        try:
            return [SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                seed=None if body.seed is None else body.seed + i, max_new_tokens=max_tokens or room,
                stop=body.stop or (), stop_token_ids=tuple(body.stop_token_ids or ()), min_tokens=min_tokens,
                ignore_eos=body.ignore_eos, logprobs=logprobs) for i in range(body.n)]
        except ValueError as e:
            raise APIError(str(e)) from e

    async def _stream(self, outputs: AsyncIterator, count: int, request_id: str, response_id: str, model: str,
                      fmt: _Format, prompt_tokens: int | None) -> AsyncIterator[str]:
        """Server-sent events: one chunk per choice and tick that produced text, a chunk with each
        choice's finish_reason, the usage chunk if asked for, then [DONE]."""
        head = {"id": response_id, "object": fmt.chunk_object, "created": int(time.time()), "model": model}
        if fmt is CHAT:  # OpenAI opens every choice with the role
            for i in range(count):
                yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
        completion_tokens = 0
        try:
            async for index, out in outputs:
                if out.text or out.finish_reason:
                    yield _sse({**head, "choices": [fmt.delta(index, out.text, out.finish_reason)]})
                if out.result is not None:
                    completion_tokens += len(out.result.token_ids)
        except (ValueError, EngineDeadError, EngineStepError) as e:  # the status line has gone: say so here
            error = _api_error(e)
            _log_error(request_id, error)
            yield _sse(error.body())
        else:
            if prompt_tokens is not None:
                yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
        yield _sse("[DONE]")


def _is_ids(prompt: list) -> bool:
    return bool(prompt) and isinstance(prompt[0], int)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _collect(outputs: AsyncIterator, count: int) -> list[GenerationResult]:
    results: list[GenerationResult | None] = [None] * count
    async for index, out in outputs:
        if out.result is not None:
            results[index] = out.result
    return results


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Awaits a non-streaming request's work, or cancels it (aborting its engine requests) and returns
    None if the client disconnects first. (Streaming responses get this from Starlette.)"""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        task.cancel()  # no-op once done
    return None if task.cancelled() else task.result()


# ---------------------------------------------------------------- metrics

def _prometheus(engine: AsyncEngine, served: dict[str, str]) -> str:
    """The serving counters in the Prometheus text format (version 0.0.4); served: model id -> target
    (request and token counts are labelled by model id)."""
    s, sched = engine.stats, engine.engine.scheduler
    names = engine.engine.runner_names
    rates = [a / t if t else math.nan for a, t in zip(s.drafts_accepted, s.drafts_tested)]
    generated = sum(s.generated_tokens.values())
    families = [
        ("requests_running", "gauge", "Requests holding a cache slot", [({}, len(sched.running))]),
        ("requests_waiting", "gauge", "Requests queued for a cache slot", [({}, len(sched.waiting))]),
        ("requests_finished_total", "counter", "Requests that finished, by finish_reason",
         [({"target": m, "finish_reason": r}, s.finished[t, r]) for m, t in served.items() for r in ("stop", "length")]),
        ("requests_aborted_total", "counter", "Requests cancelled before finishing (client gone)",
         [({}, s.aborted)]),
        ("requests_failed_total", "counter", "Requests ended by an engine tick that raised", [({}, s.failed)]),
        ("request_latency_seconds", "summary", "Submission to last token, finished requests",
         [x for m, t in served.items() for x in (({"target": m}, s.latency_s[t], "_sum"),
                                                  ({"target": m}, s.finished[t, "stop"] + s.finished[t, "length"],
                                                   "_count"))]),
        ("prompt_tokens_total", "counter", "Prompt tokens submitted",
         [({"target": m}, s.prompt_tokens[t]) for m, t in served.items()]),
        ("generation_tokens_total", "counter", "Tokens generated",
         [({"target": m}, s.generated_tokens[t]) for m, t in served.items()]),
        ("busy_seconds_total", "counter", "Wall time spent in engine ticks", [({}, s.busy_s)]),
        ("tokens_per_second", "gauge", "Generated tokens per second of busy time",
         [({}, generated / s.busy_s if s.busy_s else 0.0)]),
        ("ticks_total", "counter", "Scheduler ticks", [({}, sched.stats.ticks)]),
        ("forwards_total", "counter", "Batched forwards per model",
         [({"model": n}, f) for n, f in zip(names, sched.stats.forwards)]),
        ("prefix_cache_hits_total", "counter", "Requests whose prefill started from a cached prefix, per model",
         [({"model": n}, h) for n, h in zip(names, sched.stats.prefix_hits)]),
        ("prefix_cache_tokens_total", "counter", "Prompt tokens whose cache entries were reused, per model",
         [({"model": n}, t) for n, t in zip(names, sched.stats.prefix_tokens)]),
        ("drafts_tested_total", "counter", "Drafts verified per proposing model, finished requests",
         [({"model": n}, t) for n, t in zip(names, s.drafts_tested)]),
        ("drafts_accepted_total", "counter", "Drafts accepted per proposing model, finished requests",
         [({"model": n}, a) for n, a in zip(names, s.drafts_accepted)]),
        ("acceptance_rate", "gauge", "Accepted / tested drafts per proposing model, finished requests",
         [({"model": n}, r) for n, r in zip(names, rates)]),
    ]
    lines = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP se_engine_{name} {help_text}.", f"# TYPE se_engine_{name} {kind}"]
        for labels, value, *suffix in samples:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            value = "NaN" if value != value else value  # the spelling Prometheus expects
            lines.append(f"se_engine_{name}{''.join(suffix)}{'{' + label_text + '}' if labels else ''} {value}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ---------------------------------------------------------------- entry point

class GracefulServer(uvicorn.Server):
    """uvicorn's server with a bounded shutdown. On SIGINT or SIGTERM it stops accepting connections
    and lets the requests in flight finish for up to ``shutdown_timeout`` seconds; then it closes the
    engine, which ends those left (a stream with an error event and [DONE], others with a 503), and
    after SHUTDOWN_GRACE_S more uvicorn cuts what is still open (a client that stopped reading). A
    second signal exits at once (uvicorn alone forces only on a second SIGINT)."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout: float = SHUTDOWN_TIMEOUT_S):
        if isinstance(shutdown_timeout, bool) or not isinstance(shutdown_timeout, (int, float)) \
                or not 0 <= shutdown_timeout < math.inf:
            raise ValueError(f"shutdown_timeout must be a number of seconds >= 0, got {shutdown_timeout!r}")
        config.timeout_graceful_shutdown = shutdown_timeout + SHUTDOWN_GRACE_S
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout

    def handle_exit(self, sig: int, frame: Any) -> None:
        again = self.should_exit
        super().handle_exit(sig, frame)
        self.force_exit = self.force_exit or again

    async def shutdown(self, sockets: list | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.shutdown_timeout, self._end_requests)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def _end_requests(self) -> None:
        logger.warning("shutting down: %g s have passed, the requests in flight are ended", self.shutdown_timeout)
        # close() waits for the engine's current tick: in a thread, so that the loop sends on meanwhile
        asyncio.get_running_loop().run_in_executor(None, self.engine.close, "the server is shutting down")


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          log_level: str = "info", shutdown_timeout: float = SHUTDOWN_TIMEOUT_S, **options: Any) -> None:
    """Serves ``engine`` until interrupted (``se-engine serve``); see GracefulServer for shutdown_timeout.
    options: OpenAIServer's."""
    async_engine = AsyncEngine(engine)
    config = uvicorn.Config(OpenAIServer(async_engine, model_name, **options).app, host=host, port=port,
                            log_level=log_level, log_config=_log_config(log_level))
    try:
        GracefulServer(config, async_engine, shutdown_timeout).run()
    except KeyboardInterrupt:  # uvicorn raises a SIGINT again once it has shut down (a SIGTERM: the process ends)
        pass
    finally:
        async_engine.close()


def _log_config(level: str) -> dict:
    """uvicorn's logging, with se_engine's loggers (request ids, failed ticks) on its stderr handler."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["se_engine"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config
