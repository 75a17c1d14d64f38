"""The HTTP side of `lqmf serve`: an OpenAI-compatible API over a ModelHost, plus admin routes.

Routes: GET /health, GET /v1/models[/{id}], POST /v1/completions, POST /v1/chat/completions
(`stream: true` sends server-sent events in OpenAI's chunk format, ending with `data: [DONE]`),
POST /v1/classify, GET /admin/adapters, POST /admin/adapters/{load,switch,unload}; with a
Recorder (`lqmf serve --record`, engine/recording.py) every answer is kept under its response id
and POST /v1/feedback takes ratings and corrections of it.

Requests run at once: each generation blocks one thread of a pool on `ModelHost.complete`, which
the host batches (continuous batching, engine/serve/scheduler.py); at most `capacity` requests are in
flight, and beyond that a request gets 429 with Retry-After. A request runs entirely with the
adapter it was given; swaps are serialized with the decode loop.
Errors come back in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx
status for anything the client can fix; the server keeps running whatever a request sends.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lqmf.core.errors import ConflictError, InputError, LqmfError, NotFoundError
from lqmf.engine.inference import Generation
from lqmf.engine.serve.host import ModelHost, PromptTooLong
from lqmf.engine.serve.recording import Recorder, feedback_router
from lqmf.engine.serve.scheduler import Busy

log = logging.getLogger("lqmf.serve")
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_STOP_STRINGS = 4
MAX_PROMPTS = 32  # prompts in one /v1/completions request
MAX_SEED = 2**63 - 1  # a torch.Generator seed is a signed 64-bit integer
MAX_COUNT = 2**31 - 1  # token counts
GREEDY_BELOW = 1e-5  # a temperature below this is greedy (as vLLM does): logits / 1e-300 overflow float32
UNSUPPORTED_FIELDS = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions",
                      "tool_choice", "response_format")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {**self.headers, **({"WWW-Authenticate": "Bearer"} if self.status == 401 else {})}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def api_error(err: BaseException) -> ApiError:
    """The HTTP answer for an exception raised while serving a request."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, Busy):
        return ApiError(429, err.message, kind="rate_limit_error", code="server_busy",
                        headers={"Retry-After": str(err.retry_after)})
    if isinstance(err, PromptTooLong):
        return ApiError(400, err.message, code="context_length_exceeded")
    if isinstance(err, NotFoundError):
        return ApiError(404, err.message, code="not_found", param="model")
    if isinstance(err, ConflictError):
        return ApiError(409, err.message, code="conflict")
    if isinstance(err, InputError):
        return ApiError(400, err.message)
    if isinstance(err, LqmfError):
        return ApiError(500, err.message, kind="server_error")
    log.error("request failed", exc_info=err)
    return ApiError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error")


# -- requests ---------------------------------------------------------------------------------


class _GenerationRequest(BaseModel):
    # Numbers are checked here, at the edge: finite (json reads NaN and Infinity), in range, and in the
    # type the kernel takes, so nothing the decode loop does for one request can fail on them.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_COUNT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int = Field(0, ge=0, le=MAX_COUNT)  # vLLM's extension: no end-of-text before this many tokens

    @model_validator(mode="after")
    def _supported(self):
        if self.n not in (None, 1) or self.best_of not in (None, 1):
            raise ValueError("only one choice per request is supported (n = 1)")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported")
        for name in UNSUPPORTED_FIELDS:
            if (self.model_extra or {}).get(name):
                raise ValueError(f"'{name}' is not supported by this server")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings")
        return self

    def options(self) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        temperature = self.temperature if self.temperature and self.temperature >= GREEDY_BELOW else 0.0
        return {"max_new_tokens": self.max_tokens, "temperature": temperature,
                "top_p": self.top_p or 1.0, "seed": self.seed, "stop": stop, "min_new_tokens": self.min_tokens}

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str]

    @model_validator(mode="after")
    def _prompts(self):
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty list")
        if isinstance(self.prompt, list) and len(self.prompt) > MAX_PROMPTS:
            raise ValueError(f"prompt takes at most {MAX_PROMPTS} strings")
        if self.stream and isinstance(self.prompt, list) and len(self.prompt) > 1:
            raise ValueError("streaming takes one prompt per request")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_COUNT)

    def options(self) -> dict[str, Any]:
        options = super().options()
        options["max_new_tokens"] = self.max_completion_tokens or self.max_tokens
        return options


class ClassifyRequest(BaseModel):
    model: str | None = None
    input: str | list[str] = Field(min_length=1)


class AdapterAction(BaseModel):
    adapter: str | None = None
    activate: bool = True  # load only: False keeps the active adapter


Body = TypeVar("Body", bound=BaseModel)


async def parse_body(request: Request, model: type[Body]) -> Body:
    """The JSON body as model (whatever the Content-Type says), or a 400 that says what is wrong."""
    try:
        raw = await request.body()
    except ClientDisconnect:  # nobody to answer: one line in the log, no traceback
        log.info("%s %s: the client hung up before sending its whole body", request.method, request.url.path)
        raise ApiError(400, "the client hung up before sending its whole body", code="client_disconnected") from None
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"malformed JSON in the request body: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err.errors()) from None


# -- running model calls ----------------------------------------------------------------------


class ModelWorker:
    """Runs blocking model calls on a pool of threads: generations at once (the host batches them),
    up to `capacity` in flight; beyond that a request is refused with Busy (429) instead of waiting."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._executor = ThreadPoolExecutor(max_workers=capacity + 4, thread_name_prefix="lqmf-request")
        self._slots = threading.BoundedSemaphore(capacity)
        self.stopping = threading.Event()  # set at shutdown: generations in progress end early

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) on the pool (swaps, classification); cancelling the caller drops it if not started."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args, **kwargs))

    async def timed(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
        """fn(*args) on the pool, and the milliseconds it waited for its turn."""
        submitted = time.perf_counter()
        started: list[float] = []

        def run():
            started.append(time.perf_counter())
            return fn(*args)

        result = await self.call(run)
        return result, (started[0] - submitted) * 1000

    def _claim(self) -> None:
        if not self._slots.acquire(blocking=False):
            raise Busy(f"the server is busy: {self.capacity} requests in flight", retry_after=1)

    async def generate(self, job: Callable[[Callable[[], bool]], Any]) -> Any:
        """job(cancelled) (a generation) on the pool, counted against the capacity; cancelled() turns true
        when the caller is cancelled (its client left) or the server stops."""
        self._claim()
        cancel = threading.Event()

        def run() -> Any:
            try:
                return job(lambda: cancel.is_set() or self.stopping.is_set())
            finally:
                self._slots.release()

        future = self._submit(run)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancel.set()
            raise

    def _submit(self, run: Callable[[], Any]):
        try:
            future = self._executor.submit(run)
        except RuntimeError:  # shutting down
            self._slots.release()
            raise
        future.add_done_callback(lambda f: f.cancelled() and self._slots.release())
        return future

    async def stream(self, job: Callable[..., Any]) -> tuple[Any, AsyncIterator[tuple[str, Any]]]:
        """Start job(on_start, on_text, cancelled) on the pool and wait until it calls on_start.

        Returns on_start's argument and the events that follow: ("text", piece)... then
        ("done", result) or ("error", exception). An exception before on_start is raised here.
        Leaving the iterator early (a client that hangs up) makes cancelled() true.
        """
        self._claim()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def put(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone: nobody is listening
                cancel.set()

        def run() -> None:
            try:
                if cancel.is_set():
                    return
                result = job(lambda value: put("start", value), lambda text: put("text", text),
                             lambda: cancel.is_set() or self.stopping.is_set())
            except Exception as err:  # noqa: BLE001 - handed to the request that asked
                put("error", err)
            else:
                put("done", result)
            finally:
                self._slots.release()

        future = self._submit(run)
        try:
            kind, value = await events.get()
        except asyncio.CancelledError:
            cancel.set()
            future.cancel()
            raise
        if kind == "error":
            raise value

        async def rest() -> AsyncIterator[tuple[str, Any]]:
            try:
                while True:
                    event = await events.get()
                    yield event
                    if event[0] in ("done", "error"):
                        return
            finally:
                cancel.set()

        return value, rest()

    def shutdown(self) -> None:
        self.stopping.set()
        self._executor.shutdown(wait=False, cancel_futures=True)


# -- responses --------------------------------------------------------------------------------


def _usage(generations: list[Generation]) -> dict[str, int]:
    prompt = sum(g.prompt_tokens for g in generations)
    completion = sum(g.new_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(generation: Generation) -> str:
    return "length" if generation.finish_reason == "length" else "stop"


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def stream_response(events: AsyncIterator[tuple[str, Any]], chunk: Callable[[str | None, str | None], dict],
                    include_usage: bool, opening: dict[str, Any] | None = None,
                    on_done: Callable[[Generation], Any] | None = None) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk format from a generation's events (ModelWorker.stream).

    chunk(text, finish_reason) builds one chunk (text None: no text); opening, when given, goes first;
    on_done (a coroutine function) sees the finished generation before its last chunk goes out.
    """

    async def sse():
        if opening is not None:
            yield _sse(opening)
        async for kind, value in events:
            if kind == "text":
                yield _sse(chunk(value, None))
            elif kind == "error":
                yield _sse(api_error(value).body())
            else:
                if on_done is not None:
                    await on_done(value)
                yield _sse(chunk(None, _finish(value)))
                if include_usage:
                    yield _sse({**chunk(None, None), "choices": [], "usage": _usage([value])})
        yield _sse("[DONE]")

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# -- the app ----------------------------------------------------------------------------------


def default_capacity(host: ModelHost) -> int:
    """Requests in flight at most: the scheduler's batch and queue, or a queue of 64 for one-at-a-time serving."""
    scheduler = host.serving.scheduler
    return 64 if scheduler is None else scheduler.max_batch + scheduler.max_queue


def create_app(host: ModelHost, *, api_key: str | None = None, on_ready: Callable[[], None] | None = None,
               on_stop: Callable[[], None] | None = None, recorder: Recorder | None = None) -> FastAPI:
    """The server: /health, the OpenAI router and the admin router over host (recorder: answers kept,
    and /v1/feedback)."""
    worker = ModelWorker(default_capacity(host))
    started_at = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            worker.shutdown()
            if on_stop is not None:
                on_stop()

    app = FastAPI(title="lqmf serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())

    def require_key(request: Request) -> None:
        if not authorized(request):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           kind="authentication_error", code="invalid_api_key")

    _add_error_handlers(app)

    @app.get("/health")
    async def health(request: Request):
        body: dict[str, Any] = {"status": "ok"}
        if authorized(request):
            body.update(host.describe(), uptime_s=round(time.time() - started_at, 1))
        return body

    app.include_router(openai_router(host, worker, started_at, recorder), dependencies=[Depends(require_key)])
    if recorder is not None:
        app.include_router(feedback_router(recorder), dependencies=[Depends(require_key)])
    app.include_router(admin_router(host, worker), dependencies=[Depends(require_key)])
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(LqmfError)
    async def on_lqmf_error(request: Request, err: LqmfError):
        return api_error(err).response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, err: RequestValidationError):
        return _validation_error(err.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException):
        message = f"{err.detail}: {request.method} {request.url.path}" if err.status_code in (404, 405) else err.detail
        error = ApiError(err.status_code, str(message), code="not_found" if err.status_code == 404 else None)
        response = error.response()
        response.headers.update(getattr(err, "headers", None) or {})
        return response

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, err: Exception):
        return api_error(err).response()


def openai_router(host: ModelHost, worker: ModelWorker, started_at: float,
                  recorder: Recorder | None = None) -> APIRouter:
    """/v1/models, /v1/completions, /v1/chat/completions and /v1/classify (each answer kept by recorder)."""
    routes = OpenAIRoutes(host, worker, started_at, recorder)
    api = APIRouter()
    api.get("/v1/models")(routes.list_models)
    api.get("/v1/models/{model_id:path}")(routes.get_model)
    api.post("/v1/completions")(routes.completions)
    api.post("/v1/chat/completions")(routes.chat_completions)
    api.post("/v1/classify")(routes.classify)
    return api


class OpenAIRoutes:
    """The handlers of `openai_router` over one host, worker and recorder."""

    def __init__(self, host: ModelHost, worker: ModelWorker, started_at: float, recorder: Recorder | None):
        self.host, self.worker, self.started_at, self.recorder = host, worker, started_at, recorder

    async def keep(self, ident: str, adapter: str | None, kind: str, prompt: Any, answer: str,
                   labels: list[str] | None = None) -> None:
        if self.recorder is not None:
            await self.recorder.keep(ident, self.served_name(adapter), kind, prompt, answer, labels)

    def model_card(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"id": row["id"], "object": "model", "created": row.get("created", int(self.started_at)),
                "owned_by": "lqmf", "lqmf": {k: row[k] for k in ("kind", "adapter", "task")}}

    def served_name(self, adapter: str | None) -> str:
        return adapter if adapter is not None else self.host.base_id

    async def list_models(self):
        return {"object": "list", "data": [self.model_card(row) for row in self.host.model_ids()]}

    async def get_model(self, model_id: str):
        for row in self.host.model_ids():
            if row["id"] == model_id:
                return self.model_card(row)
        self.host.resolve(model_id)  # raises NotFoundError naming what is served
        raise ApiError(404, f"model '{model_id}' is not served here", code="not_found")

    async def completions(self, request: Request):
        host, body = self.host, await parse_body(request, CompletionRequest)
        options, prompts = body.options(), body.prompts()
        ident, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        if not body.stream:
            results = await asyncio.gather(*(self.worker.generate(
                lambda cancelled, prompt=prompt: host.complete(body.model, prompt, raw=True, cancelled=cancelled,
                                                               **options)) for prompt in prompts))
            generations = [generation for _, generation in results]
            for i, (prompt, (adapter, generation)) in enumerate(zip(prompts, results, strict=True)):
                await self.keep(ident if len(prompts) == 1 else f"{ident}-{i}", adapter, "completion", prompt,
                                generation.text)
            return {"id": ident, "object": "text_completion", "created": created,
                    "model": self.served_name(results[0][0]),
                    "choices": [{"index": i, "text": g.text, "finish_reason": _finish(g), "logprobs": None}
                                for i, g in enumerate(generations)],
                    "usage": _usage(generations)}

        def stream_job(on_start, on_text, cancelled):
            return host.complete(body.model, prompts[0], raw=True, on_start=on_start, on_text=on_text,
                                 cancelled=cancelled, **options)[1]

        adapter, events = await self.worker.stream(stream_job)
        name = self.served_name(adapter)

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            return {"id": ident, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]}

        return stream_response(events, chunk, body.include_usage(), on_done=lambda generation: self.keep(
            ident, adapter, "completion", prompts[0], generation.text))

    async def chat_completions(self, request: Request):
        host, body = self.host, await parse_body(request, ChatRequest)
        options, messages = body.options(), [m.plain() for m in body.messages]
        ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if not body.stream:
            adapter, generation = await self.worker.generate(
                lambda cancelled: host.complete(body.model, messages, cancelled=cancelled, **options))
            await self.keep(ident, adapter, "chat", messages, generation.text)
            return {"id": ident, "object": "chat.completion", "created": created, "model": self.served_name(adapter),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": generation.text},
                                 "finish_reason": _finish(generation), "logprobs": None}],
                    "usage": _usage([generation])}

        def stream_job(on_start, on_text, cancelled):
            return host.complete(body.model, messages, on_start=on_start, on_text=on_text, cancelled=cancelled,
                                 **options)[1]

        adapter, events = await self.worker.stream(stream_job)
        name = self.served_name(adapter)

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": 0, "delta": {} if text is None else {"content": text},
                                 "finish_reason": finish, "logprobs": None}]}

        opening = chunk(None, None)
        opening["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return stream_response(events, chunk, body.include_usage(), opening, on_done=lambda generation: self.keep(
            ident, adapter, "chat", messages, generation.text))

    async def classify(self, request: Request):
        body = await parse_body(request, ClassifyRequest)
        texts = [body.input] if isinstance(body.input, str) else body.input
        adapter, scores, tokens = await self.worker.generate(lambda cancelled: self.host.classify(body.model, texts))
        ident, data = f"clf-{secrets.token_hex(12)}", []
        for index, probabilities in enumerate(scores):
            label = max(probabilities, key=probabilities.get)
            row_id = ident if len(texts) == 1 else f"{ident}-{index}"
            await self.keep(row_id, adapter, "classify", texts[index], label, list(probabilities))
            data.append({"object": "classification", "index": index, "id": row_id, "label": label,
                         "score": probabilities[label], "probabilities": probabilities})
        return {"id": ident, "object": "list", "model": self.served_name(adapter), "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def admin_router(host: ModelHost, worker: ModelWorker) -> APIRouter:
    """/admin/adapters and its load, switch and unload actions."""
    api = APIRouter()

    @api.get("/admin/adapters")
    async def adapters_state():
        return host.describe()

    async def swap(action: str, request: Request) -> dict[str, Any]:
        body = await parse_body(request, AdapterAction)
        if action != "unload" and not body.adapter:
            raise ApiError(400, f"'{action}' needs an adapter name", param="adapter")
        if action == "load":
            result, wait_ms = await worker.timed(host.load, body.adapter, body.activate)
        else:
            result, wait_ms = await worker.timed(host.switch if action == "switch" else host.unload, body.adapter)
        log.info("%s %s: %s in %.1f ms (waited %.1f ms)", action, body.adapter, result.method, result.swap_ms, wait_ms)
        return {**result.to_dict(), "wait_ms": round(wait_ms, 3)}

    @api.post("/admin/adapters/load")
    async def load_adapter(request: Request):
        return await swap("load", request)

    @api.post("/admin/adapters/switch")
    async def switch_adapter(request: Request):
        return await swap("switch", request)

    @api.post("/admin/adapters/unload")
    async def unload_adapter(request: Request):
        return await swap("unload", request)

    return api


def _validation_error(errors: list[Any]) -> ApiError:
    first = errors[0] if errors else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return ApiError(400, f"{where}: {message}" if where else message, param=where or None)


class BodyLimit:
    """Refuse request bodies over max_bytes (413) before reading them whole."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            error = ApiError(413, f"the request body is larger than {self.max_bytes} bytes", code="body_too_large")
            return await error.response()(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"the request body is larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port (port 0: any free one), bound before the model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise InputError(f"--host {host}: {err.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConflictError(f"cannot listen on {host}:{port}: {err.strerror} (choose another --port, "
                            "or --port 0 for any free one)") from None
    sock.listen(2048)  # connections wait in the backlog until the server accepts them
    return sock


class _Stopped(Exception):
    pass


def _stop_requested(signum, frame) -> None:
    raise _Stopped(signum)


def run_server(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve app on sock until SIGINT/SIGTERM; requests in flight get a few seconds to finish.

    A stop asked for by a signal is a normal end: uvicorn re-raises the signal once it has shut
    down, and it lands in the handler installed here instead of killing the process.
    """
    import signal

    import uvicorn

    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
    log.setLevel(log_level.upper())
    from lqmf.engine import compat

    unparsable = compat.json_400_http_protocol(
        lambda message: json.dumps(ApiError(400, f"malformed HTTP request: {message}", code="invalid_http").body())
        .encode())
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=10, http=unparsable,
                            access_log=log_level in ("debug", "info"))
    stop_signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, _stop_requested) for signum in stop_signals}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except _Stopped:
        pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
