"""The OpenAI-compatible server: the real server on loopback, driven by the official openai client
(and by raw HTTP for malformed input), checked against ``Engine.generate`` and the engine's state."""

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from se_engine import load_model  # noqa: E402
from se_engine.async_engine import AsyncEngine, EngineDeadError  # noqa: E402
from se_engine.engine import Engine  # noqa: E402
from se_engine.ensemble import EnsembleSpec  # noqa: E402
from se_engine.sampling import SamplingParams  # noqa: E402
from se_engine import server as server_module  # noqa: E402
from se_engine import cli as cli_module  # noqa: E402
from se_engine.cli import main as cli_main  # noqa: E402
from se_engine.server import OpenAIServer  # noqa: E402

NAMES = ["tiny-random-llama", "tiny-random-qwen2"]
MAX_LEN = 512
MODEL = "tiny-se"
LIMITS = dict(max_body_bytes=2**20, max_request_sequences=32, max_queued_sequences=48)  # the test server's
KEY = "sk-test-0123456789"


def tiny_engine() -> Engine:
    models = [load_model(n, dtype=torch.float32, max_batch=4, max_len=MAX_LEN) for n in NAMES]
    return Engine(models, EnsembleSpec.weighted([0.5, 0.5]), "se", [3, 1], max_batch=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and so the tests share a busy CPU politely."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def running(app, srv: uvicorn.Server | None = None) -> Iterator[SimpleNamespace]:
    """uvicorn (or srv, a server of app) in a background thread on a free loopback port; yields its
    url and thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = srv or uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{sock.getsockname()[1]}", thread=thread)
    finally:
        srv.should_exit = True
        thread.join()


@pytest.fixture(scope="module")
def server():
    """The server under test, on its own engine."""
    engine = AsyncEngine(tiny_engine())
    api = OpenAIServer(engine, MODEL, **LIMITS)
    with running(api.app) as up:
        url = up.url
        yield SimpleNamespace(url=url, engine=engine, api=api, http=httpx.Client(base_url=url, timeout=30),
                              client=openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30))
    engine.close()


@pytest.fixture(scope="module")
def keyed(server) -> str:
    """A second server over the same engine, with an API key and the docs on; its URL."""
    with running(OpenAIServer(server.engine, MODEL, api_key=KEY, docs=True).app) as up:
        yield up.url


@pytest.fixture(scope="module")
def reference() -> Engine:
    """The same ensemble with its own caches, for Engine.generate."""
    return tiny_engine()


def greedy(reference: Engine, prompt: str, max_tokens: int, **kw) -> str:
    return reference.generate(prompt, SamplingParams(temperature=0, max_new_tokens=max_tokens, **kw))[0].text


def wait_idle(server) -> None:
    """Every request has left the engine and the server: no live stream, no sequence waiting or holding
    a slot or a place in the server's queue."""
    sched = server.engine.engine.scheduler
    deadline = time.monotonic() + 10
    while server.engine.num_unfinished or sched.running or sched.waiting or server.api.queued_sequences:
        assert time.monotonic() < deadline, "requests still in the engine"
        time.sleep(0.01)
    assert len(sched.idle_slots()) == sched.max_batch


def assert_serving(server) -> None:
    wait_idle(server)
    out = server.client.completions.create(model=MODEL, prompt="ok", max_tokens=2, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert server.http.get("/health").status_code == 200


# ---------------------------------------------------------------- requests that succeed

def test_completions_match_engine_generate(server, reference):
    prompts = ["def fib(n):", "The quick brown fox"]
    out = server.client.completions.create(model=MODEL, prompt=prompts, max_tokens=24, temperature=0)
    assert out.object == "text_completion" and out.model == MODEL
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [greedy(reference, p, 24) for p in prompts]
    prompt_tokens = sum(len(reference.encode(p)) for p in prompts)
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.total_tokens == prompt_tokens + out.usage.completion_tokens
    ids = server.client.completions.create(model=MODEL, prompt=reference.encode(prompts[0]), max_tokens=24,
                                           temperature=0)
    assert ids.choices[0].text == out.choices[0].text


def test_chat_applies_the_template(server, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    prompt = reference.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == greedy(reference, prompt, 20)
    assert out.usage.prompt_tokens == len(reference.encode(prompt))
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, messages[1]]
    same = server.client.chat.completions.create(model=MODEL, messages=parts, max_tokens=20, temperature=0)
    assert same.choices[0].message.content == out.choices[0].message.content


def test_streaming(server):
    kw = dict(model=MODEL, max_tokens=24, temperature=0)
    whole = server.client.completions.create(prompt="stream me", **kw).choices[0]
    chunks = list(server.client.completions.create(prompt="stream me", stream=True,
                                                   stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1

    messages = [{"role": "user", "content": "stream me"}]
    reply = server.client.chat.completions.create(messages=messages, **kw).choices[0].message.content
    chunks = list(server.client.chat.completions.create(messages=messages, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply
    assert chunks[-1].choices[0].finish_reason is not None


def test_stop_strings(server, reference):
    full = greedy(reference, "stop here", 24)
    stop = full[6:8]
    expected = greedy(reference, "stop here", 24, stop=(stop,))
    assert stop not in expected and full.startswith(expected)
    for stream in (False, True):
        out = server.client.completions.create(model=MODEL, prompt="stop here", max_tokens=24, temperature=0,
                                               stop=[stop, "\x00never"], stream=stream)
        choices = [c.choices[0] for c in out] if stream else out.choices
        assert "".join(c.text for c in choices) == expected
        assert choices[-1].finish_reason == "stop"


def test_seeds_reproduce_and_n_choices_use_consecutive_seeds(server, reference):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0.8, top_p=0.9)
    three = server.client.completions.create(n=3, seed=7, **kw)
    texts = [c.text for c in three.choices]
    assert [c.text for c in server.client.completions.create(n=3, seed=7, **kw).choices] == texts
    assert [server.client.completions.create(seed=7 + i, **kw).choices[0].text for i in range(3)] == texts
    assert len(set(texts)) > 1
    assert texts[0] == reference.generate(kw["prompt"], SamplingParams(temperature=0.8, top_p=0.9, seed=7,
                                                                       max_new_tokens=16))[0].text
    top_k = server.client.completions.create(seed=7, extra_body={"top_k": 2}, **kw).choices[0].text
    assert top_k == reference.generate(kw["prompt"], SamplingParams(temperature=0.8, top_p=0.9, top_k=2, seed=7,
                                                                    max_new_tokens=16))[0].text


def test_concurrent_requests_share_the_batch(server, reference):
    """Twice max_batch requests at once: continuous batching returns what each would get alone."""
    prompts = [f"request {i}" for i in range(8)]

    async def run():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
            return await asyncio.gather(*[client.completions.create(model=MODEL, prompt=p, max_tokens=12,
                                                                    temperature=0) for p in prompts])

    outs = asyncio.run(run())
    assert [o.choices[0].text for o in outs] == [greedy(reference, p, 12) for p in prompts]


def test_logprobs(server):
    out = server.client.completions.create(model=MODEL, prompt="log", max_tokens=8, temperature=0, logprobs=0)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == out.usage.completion_tokens
    assert all(x <= 0 for x in lp.token_logprobs)
    chat = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "log"}],
                                                 max_tokens=8, temperature=0.8, seed=1, logprobs=True)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    none = server.http.post("/v1/completions", json={"prompt": "log", "max_tokens": 2, "logprobs": False})
    assert none.json()["choices"][0]["logprobs"] is None  # false (sent by some clients) asks for none


def test_logprobs_tokens_are_the_texts_parts(server):
    """Byte-level tokens that end inside a UTF-8 character: the tokens join to the text, the offsets
    index it, and chat's bytes are each token's own (joined, they decode to the text)."""
    kw = dict(max_tokens=24, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    out = server.client.completions.create(model=MODEL, prompt="utf", logprobs=0, **kw).choices[0]
    lp = out.logprobs
    assert "".join(lp.tokens) == out.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    chat = server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "utf"}],
                                                 logprobs=True, **kw).choices[0]
    content = chat.logprobs.content
    assert "".join(c.token for c in content) == chat.message.content
    raw = b"".join(bytes(c.bytes) for c in content)
    assert raw.decode(errors="replace") == chat.message.content and len(raw) >= len(content)


def test_stop_token_ids(server, reference):
    ids = reference.generate("stop", SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))[0].token_ids
    out = server.http.post("/v1/completions", json={"prompt": "stop", "max_tokens": 8, "temperature": 0,
                                                    "ignore_eos": True, "stop_token_ids": [ids[3]]}).json()
    stop_at = ids.index(ids[3]) + 1
    assert out["usage"]["completion_tokens"] == stop_at and out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["text"] == reference.tokenizer.decode(ids[:stop_at], skip_special_tokens=True)


def test_min_tokens(server, reference):
    """The stop token the greedy output emits first is held back for min_tokens tokens: the reply is the
    engine's with the same settings, and longer than without min_tokens."""
    ids = reference.generate("stop", SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))[0].token_ids
    params = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True, stop_token_ids=(ids[0],), min_tokens=6)
    expected = reference.generate("stop", params)[0]
    out = server.http.post("/v1/completions", json={"prompt": "stop", "max_tokens": 16, "temperature": 0,
                                                    "ignore_eos": True, "stop_token_ids": [ids[0]],
                                                    "min_tokens": 6}).json()
    assert out["choices"][0]["text"] == expected.text
    assert out["usage"]["completion_tokens"] == len(expected.token_ids) >= 6
    assert ids[0] not in expected.token_ids[:6]
    unset = server.http.post("/v1/completions", json={"prompt": "stop", "max_tokens": 2, "min_tokens": None})
    assert unset.status_code == 200, unset.text  # null: as OpenAI-style clients send an unset field


def test_tokenize_and_detokenize(server, reference):
    ids = server.http.post("/tokenize", json={"model": MODEL, "prompt": "héllo 🙂"}).json()
    assert ids == {"tokens": reference.encode("héllo 🙂"), "count": len(ids["tokens"]), "max_model_len": MAX_LEN}
    assert server.http.post("/detokenize", json={"tokens": ids["tokens"]}).json() == {"prompt": "héllo 🙂"}
    messages = [{"role": "user", "content": "hi"}]
    chat = server.http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    text = reference.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == reference.encode(text)
    usage = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).usage
    assert usage.prompt_tokens == len(chat)


def test_no_nan_reaches_json(server, monkeypatch):
    """Logprobs that are not finite (a model's NaN logits) arrive as null: JSON has no NaN or infinity."""
    engine = server.engine.engine
    step = engine.step

    def poisoned() -> list:
        outputs = step()
        for out in outputs:
            if out.result is not None and out.result.logprobs:
                out.result.logprobs[0], out.result.logprobs[-1] = math.nan, -math.inf
        return outputs

    monkeypatch.setattr(engine, "step", poisoned)  # the engine thread looks it up every tick
    kw = dict(max_tokens=3, temperature=0, ignore_eos=True)
    r = server.http.post("/v1/completions", json={"prompt": "nan", "logprobs": 0, **kw})
    assert json.loads(r.text, parse_constant=pytest.fail)["choices"][0]["logprobs"]["token_logprobs"][::2] == [None] * 2
    r = server.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "nan"}],
                                                       "logprobs": True, **kw})
    content = json.loads(r.text, parse_constant=pytest.fail)["choices"][0]["logprobs"]["content"]
    assert [c["logprob"] for c in content][::2] == [None] * 2


def test_models_health_metrics(server):
    models = server.client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert server.http.get("/health").json() == {"status": "ok"}
    metrics = server.http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in metrics.text.splitlines() if not line.startswith("#")}
    assert samples[f'se_engine_generation_tokens_total{{target="{MODEL}"}}'] > 0
    assert samples[f'se_engine_requests_finished_total{{target="{MODEL}",finish_reason="length"}}'] > 0
    assert samples["se_engine_requests_running"] == 0
    for name in NAMES:
        rate = samples[f'se_engine_acceptance_rate{{model="{name}"}}']
        assert 0 <= rate <= 1 or math.isnan(rate)  # NaN: the model has not proposed yet
    stats = server.engine.engine.scheduler.stats  # the server is idle: its counters stand still
    for name, hits, reused in zip(NAMES, stats.prefix_hits, stats.prefix_tokens):
        assert samples[f'se_engine_prefix_cache_hits_total{{model="{name}"}}'] == hits
        assert samples[f'se_engine_prefix_cache_tokens_total{{model="{name}"}}'] == reused


# ---------------------------------------------------------------- bad input

BAD = {
    "malformed JSON": ("/v1/completions", b'{"model": "tiny-se", "prompt": ', 400, None, "malformed JSON"),
    "not an object": ("/v1/completions", [1, 2], 400, None, "valid dictionary"),
    "wrong type": ("/v1/completions", {"prompt": "a", "temperature": "hot"}, 400, "temperature", "number"),
    "missing prompt": ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "required"),
    "empty prompt": ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    "token id out of range": ("/v1/completions", {"prompt": [1, 100000]}, 400, "prompt", "token ids"),
    "max_tokens beyond the context": ("/v1/completions", {"prompt": "a", "max_tokens": 10**6}, 400, "max_tokens",
                                      "at most 507 new tokens"),
    "oversized prompt": ("/v1/completions", {"prompt": "x" * 600}, 400, "prompt", "at most 507"),
    "n = 0": ("/v1/completions", {"prompt": "a", "n": 0}, 400, "n", "greater than or equal to 1"),
    "unknown field": ("/v1/completions", {"prompt": "a", "mystery": 1}, 400, "mystery", "unsupported field"),
    "unsupported value": ("/v1/completions", {"prompt": "a", "frequency_penalty": 0.5}, 400, "frequency_penalty",
                          "only 0 or null"),
    "top logprobs": ("/v1/completions", {"prompt": "a", "logprobs": 2}, 400, "logprobs", "only null or false or 0"),
    "logprobs true": ("/v1/completions", {"prompt": "a", "logprobs": True}, 400, "logprobs", "only null or false"),
    "echo 0 (not a bool)": ("/v1/completions", {"prompt": "a", "echo": 0}, 400, "echo", "only false or null"),
    "max_tokens as a string": ("/v1/completions", {"prompt": "a", "max_tokens": "5"}, 400, "max_tokens",
                               "valid integer"),
    "max_tokens as a bool": ("/v1/completions", {"prompt": "a", "max_tokens": True}, 400, "max_tokens",
                             "valid integer"),
    "n as a float": ("/v1/completions", {"prompt": "a", "n": 2.0}, 400, "n", "valid integer"),
    "token id as a bool": ("/v1/completions", {"prompt": [True]}, 400, "prompt", "valid"),
    "stream as a string": ("/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "stream", "valid boolean"),
    "include_usage as a number": ("/v1/completions", {"prompt": "a", "stream": True,
                                                      "stream_options": {"include_usage": 1}}, 400, "stream_options",
                                  "valid boolean"),
    "chat logprobs as a string": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                                           "logprobs": "true"}, 400, "logprobs", "valid boolean"),
    "temperature NaN": ("/v1/completions", b'{"prompt": "a", "temperature": NaN}', 400, "temperature", "finite"),
    "top_p infinite": ("/v1/completions", b'{"prompt": "a", "top_p": Infinity}', 400, "top_p", "finite"),
    "temperature underflows": ("/v1/completions", {"prompt": "a", "temperature": 1e-39}, 400, "temperature",
                               "underflows in float32"),
    "top_p underflows": ("/v1/completions", {"prompt": "a", "top_p": 1e-45}, 400, "top_p", "underflows in float32"),
    "lone surrogate in a prompt": ("/v1/completions", {"prompt": "a\ud800"}, 400, "prompt", "unicode"),
    "lone surrogate in a prompt list": ("/v1/completions", {"prompt": ["ok", "\udfff"]}, 400, "prompt",
                                        "unicode"),
    "lone surrogate in a stop string": ("/v1/completions", {"prompt": "a", "stop": "\ud800"}, 400, "stop",
                                        "unicode"),
    "lone surrogate in a message": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]},
                                    400, "messages", "unicode"),
    "lone surrogate in a field name": ("/v1/completions", {"prompt": "a", "\ud800": 1}, 400, None, "unicode"),
    "stream with logprobs": ("/v1/completions", {"prompt": "a", "logprobs": 0, "stream": True}, 400, "logprobs",
                             "non-streaming"),
    "empty stop string": ("/v1/completions", {"prompt": "a", "stop": [""]}, 400, "stop", "at least 1 character"),
    "unknown model": ("/v1/completions", {"model": "gpt-9", "prompt": "a"}, 404, "model", "does not exist"),
    "empty messages": ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    "bad role": ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "a"}]}, 400, "messages", "role"),
    "tools": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}],
                                       "tools": [{"type": "function"}]}, 400, "tools", "only null or []"),
    "image part": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages", "text"),
    "chat beyond the context": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 600}]},
                                400, "messages", "context"),
    "unknown route": ("/v1/embeddings", {"input": "a"}, 404, None, "Not Found"),
    "more sequences than a request may ask for": ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 11}, 400,
                                                  "prompt", "33 sequences (3 prompts x n=11); this server takes "
                                                  "at most 32 per request"),
    "body beyond the limit": ("/v1/completions", {"prompt": "x" * 2**20}, 413, None, "limit of 1048576 bytes"),
    "stop token id as a string": ("/v1/completions", {"prompt": "a", "stop_token_ids": ["1"]}, 400, "stop_token_ids",
                                  "valid integer"),
    "negative stop token id": ("/v1/completions", {"prompt": "a", "stop_token_ids": [-1]}, 400, "stop_token_ids",
                               "greater than or equal to 0"),
    "stop token id out of range": ("/v1/completions", {"prompt": "a", "stop_token_ids": [10**6]}, 400, None,
                                   "stop_token_ids must be in [0, "),
    "min_tokens above max_tokens": ("/v1/completions", {"prompt": "a", "min_tokens": 5, "max_tokens": 4}, 400,
                                    "min_tokens", "min_tokens=5 is more than the 4 new tokens"),
    "negative min_tokens": ("/v1/completions", {"prompt": "a", "min_tokens": -1}, 400, "min_tokens",
                            "greater than or equal to 0"),
    "min_tokens as a string": ("/v1/completions", {"prompt": "a", "min_tokens": "4"}, 400, "min_tokens",
                               "valid integer"),
    "tokenize prompt and messages": ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]},
                                     400, "prompt", "one of prompt and messages"),
    "tokenize nothing": ("/tokenize", {}, 400, "prompt", "one of prompt and messages"),
    "tokenize for an unknown model": ("/tokenize", {"model": "gpt-9", "prompt": "a"}, 404, "model", "does not exist"),
    "detokenize out of range": ("/detokenize", {"tokens": [1, 10**6]}, 400, "tokens", "token ids must be in"),
    "detokenize a string": ("/detokenize", {"tokens": "abc"}, 400, "tokens", "valid list"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_requests_get_openai_errors(server, case):
    path, body, status, param, message = BAD[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = server.http.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"], error
    assert_serving(server)


def test_unforeseen_errors_are_json_500s(server, monkeypatch):
    monkeypatch.setattr(server.engine.engine, "models", [None])  # /v1/models reads their names: AttributeError
    r = server.http.get("/v1/models", headers={"X-Request-Id": "broken-1"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert r.headers["x-request-id"] == "broken-1"
    monkeypatch.undo()
    assert_serving(server)


def test_a_chunked_body_beyond_the_limit_is_refused(server):
    """Without a Content-Length the body is counted as it arrives."""
    chunks = iter([b'{"prompt": "', b"x" * LIMITS["max_body_bytes"], b'"}'])
    r = server.http.post("/v1/completions", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit of 1048576 bytes" in r.json()["error"]["message"]
    assert_serving(server)


def test_a_full_queue_answers_429(server):
    """Sequences held by requests in flight count against the queue; past it a request gets a 429
    with Retry-After, and the places come back when the requests end."""
    body = {"prompt": ["hold", "on"], "n": 16, "max_tokens": 500, "ignore_eos": True, "stream": True}  # 32 of 48
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and server.api.queued_sequences == 32
        with pytest.raises(openai.RateLimitError) as e:
            server.client.completions.create(model=MODEL, prompt=["a", "b"], n=9, max_tokens=1)  # 32 + 18 > 48
        assert e.value.response.headers["retry-after"] == "1" and e.value.code == "queue_full"
    wait_idle(server)
    out = server.client.completions.create(model=MODEL, prompt=["a", "b"], n=16, max_tokens=1)  # the places are back
    assert len(out.choices) == 32
    assert_serving(server)


def test_a_request_takes_at_most_half_the_free_places(server):
    """While others are queued a request may take at most half the free places (rounded up), so that
    large requests cannot fill the queue for small ones; an idle server takes up to the whole limit."""
    body = {"prompt": ["hold", "on"], "n": 10, "max_tokens": 500, "ignore_eos": True, "stream": True}  # 20 of 48
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and server.api.queued_sequences == 20  # 28 free
        with pytest.raises(openai.RateLimitError) as e:
            server.client.completions.create(model=MODEL, prompt=["a"], n=15, max_tokens=1)  # 15 of 28: over half
        assert e.value.code == "queue_full"
        # Streamed, so that admission is checked without waiting behind the 20 long sequences.
        small = {"prompt": ["a"], "n": 14, "max_tokens": 1, "stream": True}  # 14 of 28: half
        with server.http.stream("POST", "/v1/completions", json=small) as r2:
            assert r2.status_code == 200 and server.api.queued_sequences == 34
    wait_idle(server)
    assert_serving(server)


def test_health_answers_while_a_huge_prompt_is_tokenized(server, monkeypatch):
    """Tokenizing runs in a worker thread: /health answers while the largest body the server takes
    is being tokenized (a prompt too long for the context: a 400 afterwards). No clock: the
    tokenizer waits until /health has answered, which it never could from the event loop."""
    prompt = "word " * ((LIMITS["max_body_bytes"] - 20) // 5)
    tokenizing, answered, result = threading.Event(), threading.Event(), {}
    encode = server.api.engine.encode

    def encode_after_health(p):
        tokenizing.set()
        result["health_answered_first"] = answered.wait(timeout=30)
        return encode(p)

    monkeypatch.setattr(server.api.engine, "encode", encode_after_health)

    def post() -> None:
        result["response"] = server.http.post("/v1/completions", json={"prompt": prompt}, timeout=60)

    thread = threading.Thread(target=post)
    thread.start()
    assert tokenizing.wait(timeout=30)
    assert server.http.get("/health", timeout=10).status_code == 200
    answered.set()
    thread.join()
    assert result["health_answered_first"]
    assert result["response"].json()["error"]["code"] == "context_length_exceeded", result["response"].text[:300]
    assert_serving(server)


TARGETS = {"pair": ([0, 1], EnsembleSpec.weighted([0.3, 0.7])), "qwen": ([1], None)}


def multi_target_engine() -> Engine:
    models = [load_model(n, dtype=torch.float32, max_batch=4, max_len=MAX_LEN) for n in NAMES]
    return Engine(models, None, "ensemble_sd", [3, 1], max_batch=4, targets=TARGETS)


def test_every_target_behind_one_endpoint():
    """A multi-target engine's targets are the server's models; a request's model picks its target."""
    engine, reference = AsyncEngine(multi_target_engine()), multi_target_engine()
    try:
        with running(OpenAIServer(engine).app) as up:
            client = openai.OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0, timeout=30)
            models = {m.id: m for m in client.models.list().data}
            assert list(models) == list(TARGETS)
            assert models["qwen"].model_extra["ensemble"]["models"] == [NAMES[1]]
            for target in TARGETS:
                out = client.completions.create(model=target, prompt="multi", max_tokens=6, temperature=0)
                want = reference.generate("multi", SamplingParams(temperature=0, max_new_tokens=6), target=target)
                assert out.model == target and out.choices[0].text == want[0].text
            with pytest.raises(openai.BadRequestError, match="model: required"):
                client.completions.create(model=None, prompt="a", max_tokens=1)
            metrics = httpx.get(up.url + "/metrics").text
            for target in TARGETS:
                assert f'se_engine_generation_tokens_total{{target="{target}"}} 6' in metrics
    finally:
        engine.close()


def test_docs_are_off_unless_asked_for(server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert server.http.get(path).status_code == 404, path


def test_api_key(keyed):
    http = httpx.Client(base_url=keyed, timeout=30)
    body = {"prompt": "a", "max_tokens": 2}
    for auth in (None, "Bearer wrong", f"Bearer {KEY}x", KEY, f"Basic {KEY}", "Bearer"):
        r = http.post("/v1/completions", json=body, headers={"Authorization": auth} if auth else {})
        assert r.status_code == 401, auth
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    for path in ("/v1/models", "/metrics", "/openapi.json", "/docs", "/v1/unknown"):
        assert http.get(path).status_code == 401, path
    assert http.get("/health").status_code == 200  # open: for load balancers
    right = {"Authorization": f"Bearer {KEY}"}
    assert http.post("/v1/completions", json=body, headers=right).json()["usage"]["completion_tokens"] <= 2
    assert http.get("/openapi.json", headers=right).status_code == 200  # docs asked for
    assert http.post("/v1/completions", content=b"x" * 2**23, headers=right).status_code == 413  # limits still apply

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=keyed + "/v1", api_key=key, max_retries=0, timeout=30)

    with pytest.raises(openai.AuthenticationError, match="API key"):
        client("wrong").completions.create(model=MODEL, prompt="a", max_tokens=2)
    out = client(KEY).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}], max_tokens=2)
    assert out.usage.completion_tokens <= 2


def test_host_allow_list(server):
    with running(OpenAIServer(server.engine, MODEL, allowed_hosts=["api.example", "::1"]).app) as up:
        http = httpx.Client(base_url=up.url, timeout=30)
        for host in ("api.example", "API.example:8000", "[::1]:8000"):
            assert http.get("/v1/models", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "api.example.evil", "127.0.0.1"):
            r = http.post("/v1/completions", json={"prompt": "a"}, headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
        assert http.get("/health", headers={"Host": "10.0.0.7"}).status_code == 200  # load balancers
    with pytest.raises(ValueError, match="allowed_hosts"):
        OpenAIServer(server.engine, MODEL, allowed_hosts="api.example")


def test_client_library_sees_errors(server):
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client.completions.create(model=MODEL, prompt="a", max_tokens=10**6)
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "a"}])


def test_chat_without_a_template_is_refused(server):
    tokenizer = server.engine.engine.tokenizer
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(openai.BadRequestError, match="no chat template") as e:
            server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}])
        assert e.value.code == "no_chat_template"
    finally:
        tokenizer.chat_template = template
    assert_serving(server)


# ---------------------------------------------------------------- clients that go away

def _aborted(server) -> int:
    return server.engine.stats.aborted


def test_stream_disconnect_aborts_the_request(server):
    before, finished = _aborted(server), dict(server.engine.stats.finished)
    body = {"prompt": "go on", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # leaving the block closes the connection mid-stream
    wait_idle(server)  # the sequence left the engine and its slot is free again
    assert _aborted(server) == before + 1
    assert server.engine.stats.finished == finished  # cancelled, not run to the end
    assert_serving(server)


def test_non_streaming_disconnect_aborts_the_request(server):
    before = _aborted(server)
    with pytest.raises(httpx.ReadTimeout):
        server.http.post("/v1/completions", json={"prompt": "go on", "max_tokens": 500, "ignore_eos": True},
                         timeout=0.15)
    wait_idle(server)
    assert _aborted(server) == before + 1
    assert_serving(server)


# ---------------------------------------------------------------- request ids

def test_request_ids(server, keyed, caplog):
    """Every response has an X-Request-Id: the client's if it sent one that looks like an id, else a
    fresh one; the server's log lines name it."""
    caplog.set_level(logging.INFO, logger="se_engine.server")
    body = {"prompt": "a", "max_tokens": 2}

    def request_id(sent: str | None = None, path: str = "/v1/completions", **kw) -> str:
        headers = {"X-Request-Id": sent} if sent else {}
        return server.http.post(path, json=kw.get("json", body), headers=headers).headers["x-request-id"]

    assert request_id("client-42") == "client-42"
    fresh = [request_id(), request_id(), request_id("x" * 129), request_id("not an id")]
    assert len(set(fresh)) == 4 and all(re.fullmatch("[0-9a-f]{32}", r) for r in fresh)
    assert request_id("bad-1", json={"prompt": ""}) == "bad-1"  # errors too
    assert request_id("lost-1", path="/v1/nothing") == "lost-1"
    with server.http.stream("POST", "/v1/completions", json={**body, "stream": True},
                            headers={"X-Request-Id": "stream-1"}) as r:
        assert r.headers["x-request-id"] == "stream-1"
    assert httpx.get(keyed + "/v1/models", headers={"X-Request-Id": "nokey-1"}).headers["x-request-id"] == "nokey-1"
    lines = [r.getMessage() for r in caplog.records if r.name == "se_engine.server"]
    for start in ("client-42: cmpl-", "stream-1: cmpl-", "bad-1: 400 prompt: must not be empty", "lost-1: 404 ",
                  "nokey-1: 401 "):
        assert any(line.startswith(start) for line in lines), (start, lines)
    assert_serving(server)


# ---------------------------------------------------------------- a failing engine tick

def test_a_failing_tick_fails_only_its_requests(server, monkeypatch):
    """A tick that raises (a fault planted in a model's forward) ends the requests it was decoding with
    an error: a 500, or in a stream an error event and [DONE]. A request waiting for a slot was not
    in that tick: it runs afterwards, and the engine serves on."""
    runner, sched = server.engine.engine.models[0].runner, server.engine.engine.scheduler
    forward = runner.forward

    def fail_once(*args, **kwargs):
        runner.forward = forward
        raise RuntimeError("planted fault")

    failed = server.engine.stats.failed
    monkeypatch.setattr(runner, "forward", fail_once)
    r = server.http.post("/v1/completions", json={"prompt": "a", "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
    assert "planted fault" in r.json()["error"]["message"]

    later = {}
    body = {"prompt": "fill", "n": sched.max_batch, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as stream:
        events = (line[6:] for line in stream.iter_lines() if line.startswith("data: "))
        next(events)  # every slot is decoding the stream's sequences
        waiter = threading.Thread(target=lambda: later.update(
            r=server.http.post("/v1/completions", json={"prompt": "b", "max_tokens": 4, "temperature": 0})))
        waiter.start()
        deadline = time.monotonic() + 10
        while not sched.waiting:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        monkeypatch.setattr(runner, "forward", fail_once)
        rest = list(events)
    assert rest[-1] == "[DONE]" and "planted fault" in json.loads(rest[-2])["error"]["message"]
    waiter.join()
    assert later["r"].status_code == 200 and later["r"].json()["usage"]["completion_tokens"] >= 1
    assert server.engine.stats.failed == failed + 1 + sched.max_batch
    assert server.engine.alive
    assert_serving(server)


# ---------------------------------------------------------------- shutting down

@pytest.fixture
def slow_server(monkeypatch):
    """A GracefulServer on its own engine whose ticks take 50 ms or more (a model's forward sleeps);
    yields (url, server, its thread)."""
    engine = AsyncEngine(tiny_engine())
    runner = engine.engine.models[0].runner
    forward = runner.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.05)
        return forward(*args, **kwargs)

    monkeypatch.setattr(runner, "forward", slow_forward)
    app = OpenAIServer(engine, MODEL).app
    srv = server_module.GracefulServer(uvicorn.Config(app, log_level="warning"), engine, shutdown_timeout=2)
    try:
        with running(app, srv) as up:
            yield up.url, srv, up.thread
    finally:
        engine.close()


def _stream_events(url: str, max_tokens: int) -> Iterator[str]:
    """The data of a completion stream's events, the connection closed when the generator is."""
    body = {"model": MODEL, "prompt": "go on", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        yield from (line[6:] for line in r.iter_lines() if line.startswith("data: "))


def test_shutdown_lets_requests_finish_then_ends_them(slow_server):
    """After a signal, a request that finishes within the shutdown timeout gets its whole answer;
    those still running at the timeout end: a stream with an error event and [DONE], another with a
    503. Then the server exits."""
    url, srv, thread = slow_server
    events = _stream_events(url, 400)  # 400 tokens take over 5 s at 20 ticks per second
    next(events)
    answers = {}

    def post(max_tokens: int) -> None:
        answers[max_tokens] = httpx.post(url + "/v1/completions", json={"prompt": "p", "max_tokens": max_tokens,
                                                                        "ignore_eos": True}, timeout=30)

    waiters = [threading.Thread(target=post, args=(n,)) for n in (3, 400)]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.3)  # both are in the engine
    start = time.monotonic()
    srv.handle_exit(signal.SIGTERM, None)
    rest = list(events)
    assert 2 <= time.monotonic() - start < 5
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["message"] == "the server is shutting down"
    for waiter in waiters:
        waiter.join()
    assert answers[3].status_code == 200 and answers[3].json()["usage"]["completion_tokens"] == 3
    assert answers[400].status_code == 503 and answers[400].json()["error"]["message"] == "the server is shutting down"
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_second_signal_exits_at_once(slow_server):
    url, srv, thread = slow_server
    events = _stream_events(url, 400)
    next(events)
    start = time.monotonic()
    srv.handle_exit(signal.SIGTERM, None)
    time.sleep(0.3)
    assert srv.server_state.connections  # waiting for the stream (for up to 2 s)
    srv.handle_exit(signal.SIGTERM, None)
    with pytest.raises(httpx.HTTPError):  # cut: no [DONE]
        list(events)
    thread.join(timeout=1)
    assert not thread.is_alive() and time.monotonic() - start < 1.9  # before the 2 s shutdown timeout


# ---------------------------------------------------------------- the command line

def test_serve_command():
    """``se-engine serve`` answers once /health does (its key from SE_ENGINE_API_KEY), and exits cleanly
    on Ctrl-C."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "se_engine.cli", "serve", "--models", *NAMES, "--gammas", "3", "1",
           "--dtype", "float32", "--max-batch", "2", "--max-len", "128", "--port", str(port),
           "--served-model-name", "cli", "--shutdown-timeout", "1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "SE_ENGINE_API_KEY": KEY},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        out = client.chat.completions.create(model="cli", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert out.usage.completion_tokens <= 4
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("value, parsed", [
    ("pair=0,1", ("pair", ([0, 1], None))),
    ("w=1,0:weights:0.25,0.75", ("w", ([1, 0], EnsembleSpec.weighted([0.25, 0.75])))),
    ("c=1,0:contrastive:0.1", ("c", ([1, 0], EnsembleSpec.contrastive(0.1)))),
    ("=0,1", None), ("pair", None), ("pair=0,x", None), ("pair=0,1:weights", None), ("pair=0:mean", None)])
def test_serve_target_argument(value, parsed, capsys):
    if parsed is not None:
        assert cli_module._target(value) == parsed
        return
    with pytest.raises(SystemExit):
        cli_main(["serve", "--models", *NAMES, "--target", value])
    assert "a target is NAME=I,J" in capsys.readouterr().err


def test_serve_help_states_the_servers_defaults(capsys):
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("MAX_BODY_BYTES", "MAX_REQUEST_SEQUENCES", "MAX_QUEUED_SEQUENCES", "SHUTDOWN_TIMEOUT_S"):
        assert f"(default: {getattr(server_module, name)}" in text, name


# ---------------------------------------------------------------- the in-process API

def test_async_engine_in_process(reference):
    engine = AsyncEngine(reference)

    async def run():
        text = ""
        async for out in engine.generate("in process", SamplingParams(temperature=0, max_new_tokens=12)):
            text += out.text
        assert text == out.result.text
        too_long = SamplingParams(max_new_tokens=MAX_LEN)
        with pytest.raises(ValueError, match="exceeds max_len"):  # all or none: the first one never runs
            async for _ in engine.generate_batch([("fine", SamplingParams(max_new_tokens=4)), ("x", too_long)]):
                pass
        assert engine.num_unfinished == 0 and not reference.has_unfinished()
        return text

    try:
        text = asyncio.run(run())
    finally:
        engine.close()
    assert text == greedy(reference, "in process", 12)  # the engine is free again once closed

    async def after_close():
        async for _ in engine.generate("late"):
            pass

    with pytest.raises(EngineDeadError):
        asyncio.run(after_close())


def test_a_large_request_does_not_hold_back_a_small_one():
    """Free slots go to the waiting requests in turn: after a request of 32 sequences on 4 slots, a
    request of one takes one of the first free slots (first come, first served: the 29th)."""
    engine = AsyncEngine(tiny_engine())
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    finished = []

    async def run(name: str, count: int) -> None:
        async for _, out in engine.generate_batch([(f"{name} {i}", params) for i in range(count)]):
            if out.finish_reason is not None:
                finished.append(name)

    async def both() -> None:
        await asyncio.gather(run("large", 32), run("small", 1))  # the large one is submitted first

    try:
        asyncio.run(both())
    finally:
        engine.close()
    assert len(finished) == 33 and finished.index("small") < 8, finished


def test_async_engine_outlives_a_closed_event_loop(reference):
    """A caller whose event loop closes with a request still open must not take the engine down."""
    engine = AsyncEngine(reference)
    loop = asyncio.new_event_loop()
    outputs = engine.generate("abandoned", SamplingParams(max_new_tokens=200, ignore_eos=True))
    loop.run_until_complete(outputs.__anext__())
    loop.close()  # without closing the generator: its request is still in the engine
    try:
        deadline = time.monotonic() + 10
        while engine.num_unfinished:  # the next output finds the loop closed and aborts the request
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert engine.alive and engine.stats.aborted == 1

        async def fresh() -> list:
            return [out async for out in engine.generate("again", SamplingParams(temperature=0, max_new_tokens=4))]

        assert asyncio.run(fresh())[-1].result.metrics.tokens == 4
    finally:
        engine.close()
