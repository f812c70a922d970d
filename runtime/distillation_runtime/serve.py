"""``distill serve MODEL``: an OpenAI-compatible HTTP server on transformers, to try a student.

vLLM behind KServe stays the production server; this one is for a CPU, a laptop, a test, or a
quick look at a student wherever the runtime is installed. It answers:

- ``GET /health``: 200 once the model is loaded (503 while it loads), so a probe can wait on it;
- ``GET /v1/models``: the one served model;
- ``POST /v1/completions`` and ``POST /v1/chat/completions``: OpenAI's request and response
  shapes, for the fields ``model``, ``prompt`` (a string or a list of them) or ``messages``,
  ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``n`` (1 only) and ``seed``; chat
  messages are rendered with the tokenizer's own chat template.

Generation is the generate stage's (``generation.generate``: batched, left-padded, stop strings
cut the text and set ``finish_reason``), so what the server answers is what the pipeline would
have produced with the same sampling settings. It runs on one worker thread, off the event loop:
requests take turns on the model (one CPU is busy anyway) while ``/health`` keeps answering.

Bad requests are answered 400 with OpenAI's error shape, naming the field, the value and what is
allowed; an unexpected failure is a 500 with a one-line reason, its traceback only in the log.

MODEL is a folder or any URI the storage layer reads (``s3://``, ``gs://``, ``pvc://``,
``hf://``), fetched once into the pipeline's work folder, as KServe's storage initializer
would before vLLM starts.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler

    from distillation_runtime.records import Record

#: Fields this server does not implement, with the value that means "not used": a request that
#: sets one to anything else is refused rather than answered as if it had not asked. Fields
#: neither supported nor listed here are ignored, as OpenAI's clients send many optional ones.
UNSUPPORTED: dict[str, object] = {
    "stream": False,
    "echo": False,
    "logprobs": None,
    "top_logprobs": None,
    "best_of": 1,
    "suffix": None,
    "logit_bias": None,
    "tools": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
}
#: OpenAI's default for ``max_tokens`` in completions; chat defaults to as many as fit.
COMPLETION_DEFAULT_MAX_TOKENS = 16
DEFAULT_MAX_NEW_TOKENS_LIMIT = 512
#: OpenAI's range for temperature.
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class ServeOptions:
    """What ``distill serve`` was asked for."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT

    @property
    def name(self) -> str:
        """The model's name in requests and responses: the given one, else the folder's name
        (``s3://bucket/out/train-abc/model`` -> ``model``), as vLLM names a served folder."""
        if self.served_model_name:
            return self.served_model_name
        return self.model.rstrip("/").rsplit("/", 1)[-1] or self.model


class ServeError(Exception):
    """``distill serve`` cannot start: the message says why, ``code`` is the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class RequestError(Exception):
    """A request this server will not answer, with OpenAI's error fields."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        *,
        status: int = 400,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.kind = kind


# --------------------------------------------------------------------------------------------
# Requests: JSON in, a validated GenerationRequest out (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request: either prompts (completions) or messages (chat)."""

    prompts: tuple[str, ...] = ()
    messages: tuple[dict[str, str], ...] = ()
    max_tokens: int | None = None  # None: the endpoint's default, within the context
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def input_field(self) -> str:
        """The field the model's input came from, for errors about its length."""
        return "messages" if self.messages else "prompt"


def shown(value: object) -> str:
    """A request value as an error message quotes it: JSON, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _integer(body: dict[str, Any], name: str, low: int, high: int, allowed: str) -> int | None:
    """The field's value, or None when it is missing or null (clients send null for
    "default"); booleans are not integers here, although Python says they are."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{name}: {shown(value)} is not allowed; give {allowed}", name)
    return value


def _number(
    body: dict[str, Any], name: str, default: float, valid: Callable[[float], bool], allowed: str
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not valid(value):
        raise RequestError(f"{name}: {shown(value)} is not allowed; give {allowed}", name)
    return float(value)


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(
            f"stop: {shown(value)} is not allowed; give a non-empty string or a list of them",
            "stop",
        )
    return tuple(stops)


def _prompts(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("prompt")
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError(
            f"prompt: {shown(value)} is not allowed; give a string or a non-empty list of "
            "strings (token-id prompts are not supported)",
            "prompt",
        )
    if not all(prompts):
        raise RequestError(
            "prompt: an empty string gives the model nothing to continue; give some text",
            "prompt",
        )
    return tuple(prompts)


def _content(value: object, index: int) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return "".join(p["text"] for p in value)
    raise RequestError(
        f"messages[{index}].content: {shown(value)} is not allowed; give a string or a list of "
        '{"type": "text", "text": ...} parts (this server takes text only)',
        "messages",
    )


def _messages(body: dict[str, Any]) -> tuple[dict[str, str], ...]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise RequestError(
            f"messages: {shown(value)} is not allowed; give a non-empty list of "
            '{"role": ..., "content": ...} objects',
            "messages",
        )
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(
                f"messages[{index}]: {shown(message)} is not allowed; give an object with a "
                'string "role" and a "content"',
                "messages",
            )
        messages.append(
            {"role": message["role"], "content": _content(message.get("content"), index)}
        )
    return tuple(messages)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name, unused in UNSUPPORTED.items():
        value = body.get(name)
        if value and value != unused:  # null, false, 0, [] and {} all mean "not used"
            raise RequestError(
                f"{name}: {shown(value)} is not supported by distill serve (leave it out"
                f"{'' if unused is None else f' or set it to {shown(unused)}'}); vLLM serves "
                "the full API",
                name,
            )


def parse_request(
    body: object, *, chat: bool, served_name: str, max_new_tokens_limit: int
) -> GenerationRequest:
    """The request's fields, checked; raises ``RequestError`` naming the first bad one."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body {shown(body)} is not a JSON object")
    _refuse_unsupported(body)
    model = body.get("model")
    if model is not None and model != served_name:
        raise RequestError(
            f"model: {shown(model)} is not served here; this server serves {shown(served_name)}",
            "model",
            status=404,
        )
    _integer(body, "n", 1, 1, "1 (this server returns one choice per prompt)")
    return GenerationRequest(
        prompts=() if chat else _prompts(body),
        messages=_messages(body) if chat else (),
        max_tokens=_integer(
            body,
            "max_tokens",
            1,
            max_new_tokens_limit,
            f"an integer from 1 to {max_new_tokens_limit} (the server's --max-new-tokens-limit)",
        ),
        temperature=_number(
            body,
            "temperature",
            1.0,
            lambda t: 0 <= t <= MAX_TEMPERATURE,
            f"a number from 0 to {MAX_TEMPERATURE:g} (0 is greedy)",
        ),
        top_p=_number(body, "top_p", 1.0, lambda p: 0 < p <= 1, "a number above 0, at most 1"),
        stop=_stop(body),
        seed=_integer(body, "seed", 0, 2**63 - 1, "a non-negative integer"),
    )


# --------------------------------------------------------------------------------------------
# The model: loaded once, used by one worker thread
# --------------------------------------------------------------------------------------------


@dataclass
class Engine:
    """The model and tokenizer. Only the worker thread calls it: ``generate`` sets the
    tokenizer's padding side and the global torch seed, so calls must not overlap."""

    model: Any
    tokenizer: Any
    max_new_tokens_limit: int
    context: int | None = field(default=None)

    @classmethod
    def load(cls, options: ServeOptions, log: Callable[[str], None]) -> Engine:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from distillation_runtime.pipeline import work_dir
        from distillation_runtime.storage import local_model

        try:
            folder = local_model(options.model, work_dir() / "models")
            log(f"distill serve: loading {options.model} from {folder}")
            model = AutoModelForCausalLM.from_pretrained(folder)  # generate() sets eval mode
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, ImportError) as err:  # not there, not a model, no gcsfs
            raise ServeError(f"cannot load model {options.model}: {err}", code=2) from err
        context = getattr(model.config, "max_position_embeddings", None)
        return cls(model, tokenizer, options.max_new_tokens_limit, context)

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The messages as the model was trained to read them: its chat template, ending where
        the assistant's answer starts."""
        import jinja2

        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(
                "messages: this model's tokenizer has no chat template, so messages cannot be "
                "rendered; send a prompt to /v1/completions instead, or give the model a chat "
                "template (chat_template in tokenizer_config.json, or chat_template.jinja)",
                "messages",
            )
        try:
            text = self.tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
        except jinja2.TemplateError as err:
            raise RequestError(
                f"messages: the model's chat template refused them: {err}", "messages"
            ) from err
        return str(text)

    def max_new_tokens(self, request: GenerationRequest, prompt_tokens: int) -> int:
        """The request's max_tokens, or its endpoint's default, within the model's context."""
        room = self.max_new_tokens_limit
        if self.context is not None:
            room = min(room, self.context - prompt_tokens)
            if room < 1:
                raise RequestError(
                    f"{request.input_field}: the prompt is {prompt_tokens} tokens, which leaves "
                    f"no room in the model's context of {self.context} tokens; shorten it",
                    request.input_field,
                )
        if request.max_tokens is None:
            return room if request.messages else min(room, COMPLETION_DEFAULT_MAX_TOKENS)
        if request.max_tokens > room:
            raise RequestError(
                f"max_tokens: {request.max_tokens} is too many for this prompt ({prompt_tokens} "
                f"tokens in a context of {self.context}); give at most {room}",
                "max_tokens",
            )
        return request.max_tokens

    def answer(self, request: GenerationRequest) -> list[Record]:
        """One record per prompt (or one for the chat), from the generate stage's code."""
        from distillation_runtime.generation import SamplingConfig, generate

        prompts = (self.render_chat(request.messages),) if request.messages else request.prompts
        lengths = [len(self.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        if min(lengths) == 0:
            raise RequestError(
                f"{request.input_field}: it has no tokens for this model", request.input_field
            )
        config = SamplingConfig(
            max_new_tokens=self.max_new_tokens(request, max(lengths)),
            temperature=request.temperature,
            top_p=request.top_p,
            stop=request.stop,
            # no seed: a fresh one, so that two sampled answers differ as they do elsewhere
            seed=secrets.randbits(63) if request.seed is None else request.seed,
        )
        return generate(self.model, self.tokenizer, list(prompts), config)


# --------------------------------------------------------------------------------------------
# Responses (pure)
# --------------------------------------------------------------------------------------------


def usage(records: Sequence[Record]) -> dict[str, int]:
    prompt = sum(len(r.prompt_ids) for r in records)
    completion = sum(len(r.response_ids) for r in records)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion_response(records: Sequence[Record], model: str) -> dict[str, Any]:
    return {
        "id": f"cmpl-{secrets.token_hex(12)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": r.response, "logprobs": None, "finish_reason": r.finish_reason}
            for i, r in enumerate(records)
        ],
        "usage": usage(records),
    }


def chat_response(records: Sequence[Record], model: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.response},
                "logprobs": None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(records)
        ],
        "usage": usage(records),
    }


def error_body(message: str, param: str | None, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# --------------------------------------------------------------------------------------------
# The HTTP application
# --------------------------------------------------------------------------------------------

ROUTES = "GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions"


@dataclass
class ServerState:
    """What the handlers share: the options, the engine once loaded, the one worker."""

    options: ServeOptions
    worker: ThreadPoolExecutor
    engine: Engine | None = None
    created: int = field(default_factory=lambda: int(time.time()))


STATE = web.AppKey("state", ServerState)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as OpenAI's JSON error, never an HTML page or a traceback."""
    try:
        return await handler(request)
    except RequestError as err:
        return web.json_response(error_body(err.message, err.param, err.kind), status=err.status)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        message = f"{request.method} {request.path}: {err.reason}"
        if err.status in (404, 405):
            message += f"; this server answers {ROUTES}"
        return web.json_response(
            error_body(message, None, "invalid_request_error"), status=err.status
        )
    except Exception as err:  # a bug or a model failure: say so in one line, log the rest
        traceback.print_exc(file=sys.stderr)
        message = f"the server failed on this request ({type(err).__name__}: {err})"[:500]
        return web.json_response(error_body(message, None, "internal_server_error"), status=500)


def _ready_engine(state: ServerState) -> Engine:
    if state.engine is None:
        raise RequestError(
            "the model is still loading; retry when GET /health answers 200",
            status=503,
            kind="service_unavailable",
        )
    return state.engine


async def _body(request: web.Request) -> object:
    try:
        return await request.json()
    except ValueError as err:
        raise RequestError(f"the request body is not valid JSON ({err})") from err


async def health(request: web.Request) -> web.Response:
    ready = request.app[STATE].engine is not None
    return web.json_response({"status": "ok" if ready else "loading"}, status=200 if ready else 503)


async def models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    entry = {
        "id": state.options.name,
        "object": "model",
        "created": state.created,
        "owned_by": "distillation-operator",
        "root": state.options.model,
    }
    if state.engine is not None and state.engine.context is not None:
        entry["max_model_len"] = state.engine.context
    return web.json_response({"object": "list", "data": [entry]})


async def _generate(request: web.Request, *, chat: bool) -> web.Response:
    state = request.app[STATE]
    engine = _ready_engine(state)
    parsed = parse_request(
        await _body(request),
        chat=chat,
        served_name=state.options.name,
        max_new_tokens_limit=state.options.max_new_tokens_limit,
    )
    loop = asyncio.get_running_loop()
    records = await loop.run_in_executor(state.worker, engine.answer, parsed)
    shape = chat_response if chat else completion_response
    return web.json_response(shape(records, state.options.name))


async def completions(request: web.Request) -> web.Response:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.Response:
    return await _generate(request, chat=True)


def build_app(state: ServerState) -> web.Application:
    app = web.Application(middlewares=[json_errors])
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    return app


def _url(runner: web.AppRunner, host: str) -> str:
    """The address actually bound (``--port 0`` picks one)."""
    port = int(runner.addresses[0][1])
    shown_host = f"[{host}]" if ":" in host else host
    return f"http://{shown_host}:{port}"


async def serve_until(
    options: ServeOptions,
    stop: asyncio.Event,
    ready: Callable[[str], None],
    log: Callable[[str], None],
) -> None:
    """Listen first (``/health`` answers 503 while a remote model downloads), load the model on
    the worker, call ``ready(url)``, and serve until ``stop`` is set. A model that fails to
    load raises here, and the server closes."""
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distill-serve")
    state = ServerState(options, worker)
    runner = web.AppRunner(build_app(state), access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, options.host, options.port).start()
        except OSError as err:  # the port is taken, or the host is not this machine's
            raise ServeError(f"cannot listen on {options.host}:{options.port}: {err}", 1) from err
        loop = asyncio.get_running_loop()
        state.engine = await loop.run_in_executor(worker, Engine.load, options, log)
        if not stop.is_set():  # not told to stop while it loaded
            ready(_url(runner, options.host))
            await stop.wait()
    finally:
        await runner.cleanup()
        worker.shutdown(wait=False, cancel_futures=True)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def serve(options: ServeOptions) -> int:
    """``distill serve``: print the URL when ready, serve until SIGINT or SIGTERM."""

    def ready(url: str) -> None:
        print(url, flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await serve_until(options, stop, ready, _stderr)

    try:
        asyncio.run(main())
    except ServeError as err:
        _stderr(f"distill serve: {err}")
        return err.code
    return 0
