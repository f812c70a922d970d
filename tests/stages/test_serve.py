"""`distill serve`: a real server on loopback, a tiny model made here, real HTTP requests.

The server's answers are checked against transformers' own greedy ``generate`` on the same
checkpoint, so "OpenAI-compatible" means the same text a user would get from the model directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from distillation_runtime.demo import ModelSize, make_model, make_tokenizer, save_pretrained
from distillation_runtime.serve import ServeError, ServeOptions, serve_until
from support.net import free_port

DISTILL = Path(sys.executable).parent / "distill"
#: A chat template in the tiny tokenizer's alphabet: "u:12+34;a:" for one user message.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }};{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)
PROMPT = "12+34="
STARTUP_SECONDS = 60


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One random tiny model saved twice: without a chat template and with one."""
    root = tmp_path_factory.mktemp("serve")
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, ModelSize(), seed=3)
    plain = save_pretrained(model, tokenizer, root / "plain")
    tokenizer.chat_template = CHAT_TEMPLATE
    chat = save_pretrained(model, tokenizer, root / "chat")
    return {"plain": plain, "chat": chat}


def greedy(folder: Path, prompt: str, max_new_tokens: int) -> tuple[str, list[int]]:
    """What transformers' greedy generate answers, without the project's code: the text (up
    to EOS) and the new token ids (EOS included)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
    ids = out[0, encoded["input_ids"].shape[1] :].tolist()
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
    return tokenizer.decode(ids, skip_special_tokens=True), ids


class Server:
    """``serve_until`` on its own thread and event loop, as ``distill serve`` runs it."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.url = ""
        self.failure: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve_until(self.options, self._stop, self._on_ready, lambda _: None)

        try:
            asyncio.run(main())
        except BaseException as err:
            self.failure = err
            self._ready.set()

    def _on_ready(self, url: str) -> None:
        self.url = url
        self._ready.set()

    def __enter__(self) -> Server:
        self._thread.start()
        assert self._ready.wait(STARTUP_SECONDS), "the server did not get ready"
        if self.failure is not None:
            raise self.failure
        return self

    def __exit__(self, *_: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def chat_server(checkpoints: dict[str, Path]) -> Iterator[Server]:
    options = ServeOptions(str(checkpoints["chat"]), port=free_port(), served_model_name="student")
    with Server(options) as server:
        yield server


@pytest.fixture(scope="module")
def plain_server(checkpoints: dict[str, Path]) -> Iterator[Server]:
    with Server(ServeOptions(str(checkpoints["plain"]), port=free_port())) as server:
        yield server


def request(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a GET, or of a POST when there is a body; errors included."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def complete(server: Server, **fields: Any) -> dict[str, Any]:
    status, body = request(f"{server.url}/v1/completions", {"model": "student", **fields})
    assert status == 200, body
    return body


def test_health_and_models_answer_once_loaded(chat_server: Server) -> None:
    assert request(f"{chat_server.url}/health") == (200, {"status": "ok"})
    status, body = request(f"{chat_server.url}/v1/models")
    assert status == 200
    assert body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [("student", "model")]


def test_a_greedy_completion_is_what_transformers_generates(
    chat_server: Server, checkpoints: dict[str, Path]
) -> None:
    other = "7+8="
    text, ids = greedy(checkpoints["chat"], PROMPT, 10)
    other_text, other_ids = greedy(checkpoints["chat"], other, 10)
    body = complete(chat_server, prompt=PROMPT, max_tokens=10, temperature=0)
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["model"] == "student"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["text"] == text
    assert choice["finish_reason"] == ("stop" if len(ids) < 10 else "length")
    assert body["usage"] == {
        "prompt_tokens": len(PROMPT),  # one token per character
        "completion_tokens": len(ids),
        "total_tokens": len(PROMPT) + len(ids),
    }
    # a list of prompts: one choice each, in order, batched as the generate stage batches
    both = complete(chat_server, prompt=[PROMPT, other], max_tokens=10, temperature=0)
    assert [(c["index"], c["text"]) for c in both["choices"]] == [(0, text), (1, other_text)]
    assert both["usage"]["completion_tokens"] == len(ids) + len(other_ids)


def test_max_tokens_and_stop_end_the_answer_with_their_finish_reason(
    chat_server: Server, checkpoints: dict[str, Path]
) -> None:
    text, ids = greedy(checkpoints["chat"], PROMPT, 4)
    assert len(ids) == 4, "precondition: the model does not end this prompt within 4 tokens"
    [choice] = complete(chat_server, prompt=PROMPT, max_tokens=4, temperature=0)["choices"]
    assert (choice["text"], choice["finish_reason"]) == (text, "length")

    stop = text[2]
    expected = text[: text.index(stop)]
    for given in (stop, [stop, "never-generated"]):
        [choice] = complete(chat_server, prompt=PROMPT, max_tokens=4, temperature=0, stop=given)[
            "choices"
        ]
        assert (choice["text"], choice["finish_reason"]) == (expected, "stop")


def test_chat_is_rendered_with_the_models_chat_template(
    chat_server: Server, checkpoints: dict[str, Path]
) -> None:
    text, ids = greedy(checkpoints["chat"], "u:12+34;a:", 6)
    messages = [{"role": "user", "content": "12+34"}]
    status, body = request(
        f"{chat_server.url}/v1/chat/completions",
        {"model": "student", "messages": messages, "max_tokens": 6, "temperature": 0},
    )
    assert status == 200, body
    assert body["object"] == "chat.completion"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": text}
    assert choice["finish_reason"] == ("stop" if len(ids) < 6 else "length")
    assert body["usage"]["prompt_tokens"] == len("u:12+34;a:")


def test_chat_without_a_chat_template_is_refused_naming_messages(plain_server: Server) -> None:
    status, body = request(
        f"{plain_server.url}/v1/chat/completions",
        {"messages": [{"role": "user", "content": "12+34"}]},
    )
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "messages"
    assert "no chat template" in body["error"]["message"]


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"n": 2}, "n", "n: 2 is not allowed"),
        ({"max_tokens": -1}, "max_tokens", "max_tokens: -1 is not allowed; give an integer from 1"),
        ({"max_tokens": 100}, "max_tokens", "give at most"),  # beyond the model's 64 positions
        ({"temperature": "hot"}, "temperature", 'temperature: "hot" is not allowed'),
        ({"prompt": 7}, "prompt", "prompt: 7 is not allowed"),
        ({"stream": True}, "stream", "stream: true is not supported"),
    ],
)
def test_bad_fields_are_refused_with_the_field_the_value_and_what_is_allowed(
    plain_server: Server, fields: dict[str, Any], param: str, says: str
) -> None:
    status, body = request(f"{plain_server.url}/v1/completions", {"prompt": PROMPT, **fields})
    assert status == 400, body
    assert body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error"
    assert says in body["error"]["message"]
    assert "Traceback" not in json.dumps(body)


def test_health_answers_while_a_request_is_generating(
    chat_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distillation_runtime import generation

    started, release = threading.Event(), threading.Event()
    real = generation.generate

    def held(*args: Any, **kwargs: Any) -> Any:
        started.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", held)
    answers: list[tuple[int, dict[str, Any]]] = []
    url = f"{chat_server.url}/v1/completions"
    pending = threading.Thread(target=lambda: answers.append(request(url, {"prompt": PROMPT})))
    pending.start()
    try:
        assert started.wait(30)
        assert request(f"{chat_server.url}/health") == (200, {"status": "ok"})
        assert request(f"{chat_server.url}/v1/models")[0] == 200
    finally:
        release.set()
        pending.join(30)
    assert answers[0][0] == 200


def test_one_seed_samples_one_answer(chat_server: Server) -> None:
    def sample(seed: int) -> str:
        body = complete(chat_server, prompt=PROMPT, max_tokens=8, temperature=1.5, seed=seed)
        return str(body["choices"][0]["text"])

    assert sample(11) == sample(11)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_a_model_that_cannot_be_loaded_stops_the_server_with_the_reason(tmp_path: Path) -> None:
    server = Server(ServeOptions(str(tmp_path / "missing"), port=free_port()))
    with pytest.raises(ServeError, match=r"cannot load model .*missing") as raised, server:
        pass
    assert raised.value.code == 2


def test_distill_serve_fetches_an_s3_model_prints_its_url_and_answers(
    checkpoints: dict[str, Path], bucket: str, tmp_path: Path
) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for path in checkpoints["plain"].iterdir():
        fs.put_file(str(path), f"{bucket}/out/train-abc/model/{path.name}")
    port = free_port()
    process = subprocess.Popen(
        [str(DISTILL), "serve", f"s3://{bucket}/out/train-abc/model", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DISTILL_WORK_DIR": str(tmp_path / "work")},
    )
    stdout = process.stdout
    assert stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
    try:
        try:
            url = lines.get(timeout=STARTUP_SECONDS).strip()
        except queue.Empty:
            url = ""
        if url != f"http://127.0.0.1:{port}":
            process.terminate()
            pytest.fail(f"distill serve printed {url!r}, then: {process.communicate(timeout=30)}")
        assert request(f"{url}/health")[0] == 200
        status, models = request(f"{url}/v1/models")
        assert [m["id"] for m in models["data"]] == ["model"]  # the folder's name
        status, body = request(f"{url}/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
        assert status == 200, body
        assert body["model"] == "model"
        assert 1 <= body["usage"]["completion_tokens"] <= 3
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=30)
    assert process.returncode == 0, errors
