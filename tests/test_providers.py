"""Every provider through the queue: llama.cpp on a tiny GGUF, the OpenAI-compatible proxies
against a real server (llama_cpp.server), and Azure/DeepSeek/Tongyi/Ollama wire formats and
retries against a FAKE upstream (tests/fake_upstream.py) whose received requests we assert.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import openai
import pytest

from smmf_queue import Client, JobFailed
from smmf_queue.config import ModelConfig
from smmf_queue.embedded_redis import EmbeddedRedis
from smmf_queue.jobs import ChatRequest
from smmf_queue.offline_models import smollm2_gguf
from smmf_queue.providers.llamacpp import LlamaCppProvider

from .conftest import (
    StartWorker,
    cosine,
    free_port,
    llama_cpp_server,
    start_service,
    wait_until,
)
from .fake_upstream import FakeUpstream, chat_chunk

HELLO = [{"role": "user", "content": "hello there"}]
UPSTREAM_KEY = "sk-upstream-key-5150"
WRONG_KEY = "sk-wrong-key-4242"
AZURE_KEY = "azure-secret-777"
PROXIES = ["gguf-proxy", "gguf-proxy-wrong-key", "azure-chat", "deepseek-r1", "ollama-chat",
           "flaky-chat", "slow-chat", "gguf-proxy-embed", "tongyi-embed", "ollama-embed",
           "proxied-chat", "proxied-ollama"]


@pytest.fixture(scope="module")
def llama_server(gguf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real OpenAI-compatible server we did not write: llama-cpp-python's, on the tiny GGUF."""
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with llama_cpp_server(gguf_model, log, UPSTREAM_KEY, "--embedding", "true") as base:
        yield base


@pytest.fixture(scope="module")
def providers_config(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis, gguf_model: Path,
                     llama_server: str, upstream: FakeUpstream) -> Path:
    os.environ["SMMF_TEST_UPSTREAM_KEY"] = UPSTREAM_KEY  # read by the worker, never sent in a job
    fake = upstream.url
    path = tmp_path_factory.mktemp("providers") / "providers.toml"
    path.write_text(f"""
[[models.llms]]
name = "gguf-chat"
provider = "llama.cpp"
path = "{gguf_model}"
n_threads = 1

[[models.llms]]
name = "gguf-proxy"
provider = "proxy/openai"
backend = "tiny-gguf"
api_base = "{llama_server}"
api_key = "${{env:SMMF_TEST_UPSTREAM_KEY}}"
concurrency = 4

[[models.llms]]
name = "gguf-proxy-wrong-key"
provider = "proxy/openai"
backend = "tiny-gguf"
api_base = "{llama_server}"
api_key = "{WRONG_KEY}"
concurrency = 2
max_retries = 0

[[models.llms]]
name = "azure-chat"
provider = "proxy/openai"
api_type = "azure"
api_base = "{fake}"
api_version = "2024-10-21"
api_azure_deployment = "gpt-4o-prod"
api_key = "{AZURE_KEY}"
concurrency = 2

[[models.llms]]
name = "deepseek-r1"
provider = "proxy/deepseek"
backend = "deepseek-reasoner"
api_base = "{fake}/v1"
api_key = "sk-deepseek"
thinking_enabled = true
concurrency = 2

[[models.llms]]
name = "ollama-chat"
provider = "proxy/ollama"
backend = "qwen2.5:0.5b"
api_base = "{fake}"
context_length = 4096
concurrency = 2

[[models.llms]]
name = "flaky-chat"
provider = "proxy/siliconflow"
backend = "Qwen/Qwen2.5-7B-Instruct"
api_base = "{fake}/v1"
api_key = "sk-siliconflow"
max_retries = 3
retry_backoff_s = 0.01
concurrency = 2

[[models.llms]]
name = "slow-chat"
provider = "proxy/openai"
api_base = "{fake}/v1"
api_key = "sk-slow"
timeout_s = 0.5
max_retries = 1
retry_backoff_s = 0.01
concurrency = 2

[[models.llms]]
name = "proxied-chat"
provider = "proxy/openai"
api_base = "http://upstream.invalid/v1"
api_key = "sk-proxied"
http_proxy = "{fake}"
timeout_s = 0.5
max_retries = 0

[[models.llms]]
name = "proxied-ollama"
provider = "proxy/ollama"
backend = "qwen2.5:0.5b"
api_base = "http://upstream.invalid"
http_proxy = "{fake}"

[[models.embeddings]]
name = "gguf-embed"
provider = "llama.cpp"
path = "{gguf_model}"
n_threads = 1

[[models.embeddings]]
name = "gguf-proxy-embed"
provider = "proxy/openai"
backend = "tiny-gguf"
api_url = "{llama_server}/embeddings"
api_key = "${{env:SMMF_TEST_UPSTREAM_KEY}}"
concurrency = 2

[[models.embeddings]]
name = "tongyi-embed"
provider = "proxy/tongyi"
backend = "text-embedding-v3"
api_base = "{fake}/v1"
api_key = "sk-dashscope"
retry_backoff_s = 0.01
concurrency = 2

[[models.embeddings]]
name = "ollama-embed"
provider = "proxy/ollama"
backend = "nomic-embed-text"
api_url = "{fake}"
batch_size = 2
concurrency = 2

[queue]
broker_url = "{redis_server.url}"
job_timeout_s = 60
""")
    return path


@pytest.fixture(scope="module")
def providers(providers_config: Path, start_worker: StartWorker) -> Iterator[Client]:
    """One worker for both llama.cpp models, one for every API proxy (they are light)."""
    start_worker("gguf-chat", "gguf-embed", config=providers_config)
    proxies = start_worker(*PROXIES, config=providers_config)
    with Client(providers_config) as client:
        client.proxy_worker_log = proxies.log  # type: ignore[attr-defined]
        yield client


# llama.cpp


def test_llamacpp_streams_a_chat_through_the_queue(providers: Client) -> None:
    deltas = list(providers.stream_chat("gguf-chat", HELLO, max_tokens=12, temperature=0))
    result = providers.chat("gguf-chat", HELLO, max_tokens=12, temperature=0)
    assert "".join(d.text for d in deltas) == result.text != ""
    assert deltas[-1].finish_reason == "length"
    assert result.usage.completion_tokens == 12 and result.usage.prompt_tokens > 0


def test_llamacpp_honours_temperature_stop_and_max_tokens(providers: Client) -> None:
    full = providers.chat("gguf-chat", HELLO, max_tokens=30, temperature=0)
    assert full.finish_reason == "length" and full.usage.completion_tokens == 30
    assert providers.chat("gguf-chat", HELLO, max_tokens=30, temperature=0).text == full.text
    sampled = {providers.chat("gguf-chat", HELLO, max_tokens=30, temperature=1.5, seed=s).text
               for s in (1, 2)}
    assert len(sampled) == 2
    stop = full.text[12:15]
    stopped = providers.chat("gguf-chat", HELLO, max_tokens=30, temperature=0, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:full.text.index(stop)]


def test_llamacpp_embeddings_match_in_process_in_order(providers: Client, gguf_model: Path) -> None:
    texts = ["the cat sat", "a different sentence entirely", "x"]
    result = providers.embed("gguf-embed", texts)
    local = llama_cpp.Llama(model_path=str(gguf_model), embedding=True, verbose=False, n_ctx=4096,
                            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    expected = local.embed(texts, normalize=True)
    assert len(result.vectors) == 3
    for got, want in zip(result.vectors, expected):
        assert cosine(got, want) > 0.999


# proxy/openai against a real OpenAI-compatible server


def test_openai_proxy_streams_what_the_server_generates(providers: Client, llama_server: str) -> None:
    direct = openai.OpenAI(base_url=llama_server, api_key=UPSTREAM_KEY).chat.completions.create(
        model="tiny-gguf", messages=HELLO, temperature=0, max_tokens=16)  # type: ignore[arg-type]
    deltas = list(providers.stream_chat("gguf-proxy", HELLO, temperature=0, max_tokens=16))
    assert "".join(d.text for d in deltas) == direct.choices[0].message.content
    assert deltas[-1].finish_reason == "length"
    result = providers.chat("gguf-proxy", HELLO, temperature=0, max_tokens=16)
    assert result.text == direct.choices[0].message.content


def test_openai_proxy_stop_and_max_tokens(providers: Client) -> None:
    full = providers.chat("gguf-proxy", HELLO, temperature=0, max_tokens=24)
    assert full.finish_reason == "length"
    stop = full.text[10:13]
    stopped = providers.chat("gguf-proxy", HELLO, temperature=0, max_tokens=24, stop=[stop])
    assert stopped.text == full.text[:full.text.index(stop)]
    assert stopped.finish_reason == "stop"


def test_openai_proxy_embeddings_through_api_url(providers: Client, llama_server: str) -> None:
    texts = ["one", "two words", "three little words"]
    direct = openai.OpenAI(base_url=llama_server, api_key=UPSTREAM_KEY).embeddings.create(
        model="tiny-gguf", input=texts, encoding_format="float")
    result = providers.embed("gguf-proxy-embed", texts, normalize=False)
    assert [cosine(a, b.embedding) for a, b in zip(result.vectors, direct.data)] == pytest.approx([1, 1, 1])


def test_wrong_api_key_fails_the_job_without_leaking_the_key(providers: Client) -> None:
    with pytest.raises(JobFailed) as failure:
        providers.chat("gguf-proxy-wrong-key", HELLO, max_tokens=4)
    assert failure.value.error_type == "AuthenticationError"
    assert "401" in failure.value.message
    assert WRONG_KEY not in str(failure.value)
    log = providers.proxy_worker_log.read_text()  # type: ignore[attr-defined]
    assert WRONG_KEY not in log and UPSTREAM_KEY not in log


def test_a_proxy_worker_logs_no_line_per_upstream_request(providers: Client) -> None:
    # Given the proxy worker, logging at INFO as `smmf-queue worker` does by default
    # When it serves a few jobs
    for _ in range(3):
        providers.chat("gguf-proxy", HELLO, temperature=0, max_tokens=2)
    # Then its log holds no line per upstream request (the HTTP clients log each one at INFO)
    log = providers.proxy_worker_log.read_text()  # type: ignore[attr-defined]
    assert "HTTP Request:" not in log


# wire formats, against the fake


def test_azure_url_shape_and_api_key_header(providers: Client, upstream: FakeUpstream) -> None:
    upstream.reset()
    upstream.sse([chat_chunk("Hello"), chat_chunk(" Azure"), chat_chunk(finish="stop"),
                  chat_chunk(usage={"prompt_tokens": 9, "completion_tokens": 2})])
    result = providers.chat("azure-chat", HELLO, temperature=0, max_tokens=5, seed=7)
    assert result.text == "Hello Azure"
    assert result.usage.total_tokens == 11
    [request] = upstream.requests
    assert request.path == "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21"
    assert request.headers["api-key"] == AZURE_KEY
    assert "authorization" not in request.headers
    assert request.body["temperature"] == 0 and request.body["max_tokens"] == 5
    assert request.body["seed"] == 7 and request.body["stream"] is True
    assert request.body["messages"] == HELLO


def test_deepseek_reasoning_arrives_as_reasoning(providers: Client, upstream: FakeUpstream) -> None:
    upstream.reset()
    upstream.sse([chat_chunk(reasoning="Let me think."), chat_chunk(reasoning=" 2+2=4."),
                  chat_chunk("The answer is 4."), chat_chunk(finish="stop")])
    deltas = list(providers.stream_chat("deepseek-r1", HELLO, temperature=0))
    assert "".join(d.reasoning for d in deltas) == "Let me think. 2+2=4."
    assert "".join(d.text for d in deltas) == "The answer is 4."
    [request] = upstream.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-deepseek"
    assert request.body["model"] == "deepseek-reasoner"
    assert request.body["thinking"] == {"type": "enabled"}
    assert request.body["temperature"] == 0


def test_ollama_native_chat_sends_every_option(providers: Client, upstream: FakeUpstream) -> None:
    upstream.reset()
    base = {"model": "qwen2.5:0.5b", "created_at": "2026-11-25T00:00:00Z"}
    upstream.ndjson([
        {**base, "message": {"role": "assistant", "content": "Hi"}, "done": False},
        {**base, "message": {"role": "assistant", "content": " there"}, "done": False},
        {**base, "message": {"role": "assistant", "content": ""}, "done": True,
         "done_reason": "length", "prompt_eval_count": 12, "eval_count": 2},
    ])
    result = providers.chat("ollama-chat", HELLO, temperature=0, top_p=0.9, max_tokens=2, seed=3,
                            stop=["###"])
    assert result.text == "Hi there" and result.finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (12, 2)
    [request] = upstream.requests
    assert request.path == "/api/chat"
    assert request.body["model"] == "qwen2.5:0.5b" and request.body["stream"] is True
    assert request.body["options"] == {"temperature": 0, "top_p": 0.9, "num_predict": 2, "seed": 3,
                                       "stop": ["###"], "num_ctx": 4096}


def test_http_proxy_carries_the_requests(providers: Client, upstream: FakeUpstream) -> None:
    # Given models whose api_base cannot be reached directly, with the fake as their http_proxy:
    # an HTTP proxy receives each request with the full upstream URL as its target
    upstream.reset()
    upstream.sse([chat_chunk("via"), chat_chunk(" proxy"), chat_chunk(finish="stop")])
    base = {"model": "qwen2.5:0.5b", "created_at": "2026-11-25T00:00:00Z"}
    upstream.ndjson([{**base, "message": {"role": "assistant", "content": "ollama"}, "done": False},
                     {**base, "message": {"role": "assistant", "content": ""}, "done": True,
                      "done_reason": "stop", "prompt_eval_count": 3, "eval_count": 1}])
    streamed = "".join(d.text for d in providers.stream_chat("proxied-chat", HELLO))
    ollama_reply = providers.chat("proxied-ollama", HELLO)
    assert (streamed, ollama_reply.text) == ("via proxy", "ollama")
    assert [r.path for r in upstream.requests] == ["http://upstream.invalid/v1/chat/completions",
                                                   "http://upstream.invalid/api/chat"]
    # and errors through the proxy keep the SDK's types (its HTTP client is the proxy's)
    upstream.reply(json_body={}, delay_s=1.5)
    with pytest.raises(JobFailed) as failure:
        providers.chat("proxied-chat", HELLO)
    assert failure.value.error_type == "APITimeoutError", failure.value.message


def test_ollama_embeddings_split_into_batches_in_order(providers: Client, upstream: FakeUpstream) -> None:
    upstream.reset()
    texts = [f"text {i}" for i in range(5)]
    for start in range(0, 5, 2):
        batch = texts[start:start + 2]
        upstream.reply(json_body={"model": "nomic-embed-text", "prompt_eval_count": len(batch),
                                  "embeddings": [[float(int(t.split()[1])), 1.0] for t in batch]})
    result = providers.embed("ollama-embed", texts, normalize=False)
    assert [v[0] for v in result.vectors] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [r.body["input"] for r in upstream.requests] == [texts[0:2], texts[2:4], texts[4:]]
    assert {r.path for r in upstream.requests} == {"/api/embed"}


def test_tongyi_embeddings_respect_the_batch_limit(providers: Client, upstream: FakeUpstream) -> None:
    upstream.reset()
    texts = [f"doc {i}" for i in range(25)]
    for start in range(0, 25, 10):
        batch = texts[start:start + 10]
        # answered out of order, as the API may: the index field puts them back
        data = [{"object": "embedding", "index": i, "embedding": [float(start + i), 1.0]}
                for i in reversed(range(len(batch)))]
        upstream.reply(json_body={"object": "list", "data": data, "model": "text-embedding-v3",
                                  "usage": {"prompt_tokens": len(batch), "total_tokens": len(batch)}})
    result = providers.embed("tongyi-embed", texts, normalize=False)
    assert [v[0] for v in result.vectors] == [float(i) for i in range(25)]
    assert [len(r.body["input"]) for r in upstream.requests] == [10, 10, 5]
    assert upstream.requests[0].path == "/v1/embeddings"
    assert result.usage.prompt_tokens == 25


# retries


def test_429_and_5xx_are_retried_before_the_first_token(providers: Client, upstream: FakeUpstream) -> None:
    upstream.reset()
    upstream.reply(429, {"error": {"message": "slow down", "type": "rate_limit"}})
    upstream.reply(503, {"error": {"message": "overloaded"}})
    upstream.sse([chat_chunk("ok"), chat_chunk(finish="stop")])
    result = providers.chat("flaky-chat", HELLO)
    assert result.text == "ok"
    assert len(upstream.requests) == 3


def test_a_429_that_says_when_to_come_back_waits_without_spending_a_retry(
        providers: Client, upstream: FakeUpstream) -> None:
    # Given an upstream that rate-limits five times, saying when to come back (flaky-chat has
    # max_retries = 3: five ordinary failures would fail the job)
    upstream.reset()
    for _ in range(5):
        upstream.reply(429, {"error": {"message": "slow down", "type": "rate_limit"}},
                       headers={"retry-after": "0.1"})
    upstream.sse([chat_chunk("ok"), chat_chunk(finish="stop")])
    # When a chat is sent, then the job waits each time, and is answered
    assert providers.chat("flaky-chat", HELLO).text == "ok"
    assert len(upstream.requests) == 6


def test_a_429_cools_down_the_accounts_other_jobs_too(providers: Client, upstream: FakeUpstream) -> None:
    # Given a chat that met a 429 saying to come back in 4 s (flaky-chat has two slots)
    upstream.reset()
    upstream.reply(429, {"error": {"message": "slow down", "type": "rate_limit"}}, headers={"retry-after": "4"})
    for _ in range(2):
        upstream.sse([chat_chunk("ok"), chat_chunk(finish="stop")])
    answers: list[str] = []
    first = threading.Thread(target=lambda: answers.append(providers.chat("flaky-chat", HELLO).text))
    first.start()
    wait_until(lambda: len(upstream.requests) == 1, 10, "the first chat's 429")
    # When a second chat of the same account starts during the cool-down
    second = threading.Thread(target=lambda: answers.append(providers.chat("flaky-chat", HELLO).text))
    second.start()
    time.sleep(1.5)
    # Then it waits for the cool-down too, instead of calling the upstream (and meeting the 429)
    assert len(upstream.requests) == 1
    first.join(30)
    second.join(30)
    assert answers == ["ok", "ok"] and len(upstream.requests) == 3


def test_retries_give_up_with_the_providers_message(providers: Client, upstream: FakeUpstream) -> None:
    upstream.reset()
    for _ in range(4):
        upstream.reply(500, {"error": {"message": "upstream exploded"}})
    with pytest.raises(JobFailed) as failure:
        providers.chat("flaky-chat", HELLO)
    assert failure.value.error_type == "InternalServerError"
    assert "upstream exploded" in failure.value.message
    assert len(upstream.requests) == 4  # the first try and max_retries = 3


def test_a_failure_after_the_first_token_is_an_error_not_a_retry(
        providers: Client, upstream: FakeUpstream) -> None:
    upstream.reset()
    upstream.sse([chat_chunk("partial"), chat_chunk(" more"), chat_chunk(finish="stop")], cut_after=1)
    deltas = []
    with pytest.raises(JobFailed):
        for delta in providers.stream_chat("flaky-chat", HELLO):
            deltas.append(delta)
    assert "".join(d.text for d in deltas) == "partial"
    assert len(upstream.requests) == 1


def test_a_stream_chunk_that_is_not_an_object_fails_the_job_clearly(
        providers: Client, upstream: FakeUpstream) -> None:
    upstream.reset()
    upstream.sse([chat_chunk("ok"), ["not", "a", "chunk"], chat_chunk(finish="stop")])  # type: ignore[list-item]
    with pytest.raises(JobFailed, match="not a chunk"):
        list(providers.stream_chat("flaky-chat", HELLO))


def test_streamed_chats_reuse_the_upstream_connection(providers: Client,
                                                     upstream: FakeUpstream) -> None:
    # The openai SDK's own stream stops reading at [DONE], so httpx drops the connection
    # (openai/openai-python#3440); the provider reads each body to its end instead.
    upstream.reset()
    for word in ("one", "two"):
        upstream.sse([chat_chunk(word), chat_chunk(finish="stop")])
    texts = ["".join(d.text for d in providers.stream_chat("flaky-chat", HELLO)) for _ in range(2)]
    assert texts == ["one", "two"]
    assert upstream.requests[0].client_port == upstream.requests[1].client_port


def test_a_reply_ends_at_done_even_if_the_server_holds_the_body_open(
        providers: Client, upstream: FakeUpstream) -> None:
    upstream.reset()
    held = threading.Event()
    upstream.sse([chat_chunk("all"), chat_chunk(" here"), chat_chunk(finish="stop")], hold=held)
    try:
        # The job ends while the fake still holds the body (waiting for it would time out)
        reply = providers.chat("flaky-chat", HELLO, timeout=20)
        assert (reply.text, reply.finish_reason) == ("all here", "stop")
        assert not held.is_set()
    finally:
        held.set()


def test_the_configured_timeout_applies_and_a_timeout_is_retried(
        providers: Client, upstream: FakeUpstream) -> None:
    # Given an upstream slower than the model's timeout_s (0.5 s), twice
    upstream.reset()
    upstream.reply(json_body={}, delay_s=1.5)
    upstream.reply(json_body={}, delay_s=1.5)
    # Then each try times out (a late answer would fail differently: its body is no stream),
    # and the job fails with the timeout after the first try and max_retries = 1
    with pytest.raises(JobFailed) as failure:
        providers.chat("slow-chat", HELLO)
    assert failure.value.error_type == "APITimeoutError", failure.value.message
    assert len(upstream.requests) == 2


def test_embedding_requests_are_retried(providers: Client, upstream: FakeUpstream) -> None:
    upstream.reset()
    upstream.reply(502, {"error": {"message": "bad gateway"}})
    upstream.reply(json_body={"object": "list", "model": "m", "usage": {"prompt_tokens": 1, "total_tokens": 1},
                              "data": [{"object": "embedding", "index": 0, "embedding": [3.0, 4.0]}]})
    result = providers.embed("tongyi-embed", ["hello"], normalize=True)
    assert result.vectors == [pytest.approx([0.6, 0.8])]
    assert len(upstream.requests) == 2


def test_gateway_streams_deepseek_reasoning_as_reasoning_content(
        providers: Client, providers_config: Path, upstream: FakeUpstream,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    # Given the gateway in front of the DeepSeek model (upstream: the fake)
    port = free_port()
    log = tmp_path_factory.mktemp("gateway") / "gateway.log"
    base = f"http://127.0.0.1:{port}"
    gateway = start_service("gateway", providers_config, log, f"{base}/healthz", "--port", str(port))
    try:
        oai = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        reply = [chat_chunk(reasoning="Think."), chat_chunk(reasoning=" Done."), chat_chunk("4"),
                 chat_chunk(finish="stop")]
        # When a client streams a reply, and asks for a whole one
        upstream.reset()
        upstream.sse(reply)
        chunks = list(oai.chat.completions.create(model="deepseek-r1", messages=HELLO,  # type: ignore[arg-type]
                                                  stream=True))
        upstream.sse(reply)
        whole = oai.chat.completions.create(model="deepseek-r1", messages=HELLO)  # type: ignore[arg-type]
    finally:
        gateway.terminate()
        gateway.wait(timeout=15)
    # Then the reasoning travels as `reasoning_content`, apart from the answer, both ways
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "Think. Done."
    assert "".join(d.content or "" for d in deltas) == "4"
    assert (whole.choices[0].message.model_extra or {}).get("reasoning_content") == "Think. Done."
    assert whole.choices[0].message.content == "4"


@pytest.mark.parametrize(("question", "params"), [
    ("What is the capital of Japan?", {"temperature": 0}),  # ends at end-of-sequence
    ("用中文介绍一下巴黎。", {"temperature": 0, "max_tokens": 40}),  # multi-byte text, length
    ("Tell me a story about a cat.", {"temperature": 0, "max_tokens": 80, "stop": ["cat"]}),
], ids=["eos", "chinese-length", "stop-string"])
def test_llamacpp_usage_is_the_engines_own_count(question: str, params: dict[str, Any]) -> None:
    # Given the real SmolLM2 GGUF, streamed through our provider and asked unstreamed of
    # llama-cpp-python itself (whose usage counts its tokens)
    messages = [{"role": "user", "content": question}]
    provider = LlamaCppProvider(ModelConfig(name="smollm2", provider="llama.cpp", path=str(smollm2_gguf())))
    provider.load()
    chunks = list(provider.stream_chat(ChatRequest(model="smollm2", messages=messages, params=params)))
    engine = llama_cpp.Llama(model_path=str(smollm2_gguf()), n_ctx=4096, verbose=False)
    expected = engine.create_chat_completion(messages=messages, **params)  # type: ignore[arg-type]
    # Then text, finish reason and both token counts are the engine's
    assert "".join(c.text for c in chunks) == expected["choices"][0]["message"]["content"]  # type: ignore[index]
    assert chunks[-1].finish_reason == expected["choices"][0]["finish_reason"]  # type: ignore[index]
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        expected["usage"]["prompt_tokens"], expected["usage"]["completion_tokens"])  # type: ignore[index]
