"""The OpenAI-compatible gateway, driven by the official `openai` SDK as its client."""

from __future__ import annotations

import base64
import json
from array import array
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .conftest import (
    CHAT,
    EMBED,
    GATEWAY_KEY,
    IDLE,
    SPARE,
    WorkerProcess,
    cosine,
    free_port,
    gateway_process,
    start_service,
    wait_until,
)

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def gateway_url(config_path: Path, chat_worker: WorkerProcess, embed_worker: WorkerProcess,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with gateway_process(config_path, tmp_path_factory.mktemp("gateway")) as url:
        yield url


@pytest.fixture(scope="module")
def oai(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=GATEWAY_KEY, max_retries=0)


def test_streaming_chat_matches_the_non_streaming_reply(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=20, temperature=0)
    stream = oai.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=20, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content != ""
    assert finishes == ["length"] == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert whole.usage is not None and whole.usage.completion_tokens == 20
    assert {c.object for c in chunks} == {"chat.completion.chunk"}


def test_stop_and_content_parts(oai: openai.OpenAI) -> None:
    whole = oai.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=40, temperature=0)
    text = whole.choices[0].message.content or ""
    stop = text[len(text) // 2:][:3]
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    cut = oai.chat.completions.create(model=CHAT, messages=parts, max_tokens=40,  # type: ignore[arg-type]
                                      temperature=0, stop=stop)
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_embeddings_in_float_and_base64_keep_order(oai: openai.OpenAI, gateway_url: str) -> None:
    texts = ["queues", "workers", "a cat in the sun"]
    floats = oai.embeddings.create(model=EMBED, input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    raw = httpx.post(f"{gateway_url}/v1/embeddings", headers={"Authorization": f"Bearer {GATEWAY_KEY}"},
                     json={"model": EMBED, "input": texts, "encoding_format": "base64"}).json()
    for item, float_item in zip(raw["data"], floats.data):
        decoded = array("f")
        decoded.frombytes(base64.b64decode(item["embedding"]))
        assert decoded.tolist() == pytest.approx(float_item.embedding)
    single = oai.embeddings.create(model=EMBED, input="queues")  # the SDK's default: base64
    assert cosine(single.data[0].embedding, floats.data[0].embedding) > 0.9999
    assert floats.usage.prompt_tokens > 3
    # The float reply holds base64's float32 numbers exactly, in float32's shortest digits (at
    # most 9 significant), not float64's 17
    text = httpx.post(f"{gateway_url}/v1/embeddings", headers={"Authorization": f"Bearer {GATEWAY_KEY}"},
                      json={"model": EMBED, "input": texts, "encoding_format": "float"}).text
    for item, packed in zip(json.loads(text)["data"], raw["data"]):
        assert array("f", item["embedding"]).tobytes() == base64.b64decode(packed["embedding"])
    numbers = text.split('"embedding":[', 1)[1].split("]", 1)[0].split(",")
    assert max(len(n.lstrip("-").lower().split("e")[0].replace(".", "").lstrip("0")) for n in numbers) <= 9


def test_models_lists_kind_provider_and_live_workers(oai: openai.OpenAI, gateway_url: str) -> None:
    assert {m.id for m in oai.models.list()} == {CHAT, SPARE, IDLE, EMBED}
    response = httpx.get(f"{gateway_url}/v1/models", headers={"Authorization": f"Bearer {GATEWAY_KEY}"})
    models = {m["id"]: m for m in response.json()["data"]}
    assert models[CHAT]["kind"] == "llm" and models[CHAT]["live_workers"] == 1
    assert models[EMBED]["kind"] == "embedding" and models[EMBED]["provider"] == "hf"
    assert models[IDLE]["live_workers"] == 0


def test_errors_are_openai_shaped(oai: openai.OpenAI, gateway_url: str) -> None:
    wrong_key = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong_key.chat.completions.create(model=CHAT, messages=HELLO)
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as not_found:
        oai.chat.completions.create(model="no-such-model", messages=HELLO)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model=CHAT, messages=HELLO, temperature=7)
    assert "temperature" in str(bad.value)
    with pytest.raises(openai.BadRequestError):
        oai.embeddings.create(model=CHAT, input="x")  # an LLM is not an embedding model
    with pytest.raises(openai.APIStatusError) as too_big:
        oai.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x" * 70_000}])
    assert too_big.value.status_code == 413
    with pytest.raises(openai.InternalServerError) as no_worker:
        oai.chat.completions.create(model=IDLE, messages=HELLO)
    assert no_worker.value.status_code == 503 and IDLE in str(no_worker.value)


def test_numbers_booleans_and_lists_must_be_what_json_and_openai_take(gateway_url: str) -> None:
    # pydantic alone took true for 1 (a one-token reply), "5" for 5, and 1 for true (a stream)
    url, auth = f"{gateway_url}/v1/chat/completions", {"Authorization": f"Bearer {GATEWAY_KEY}"}
    for field, value, said in (("max_tokens", True, "got true"), ("temperature", "0.5", "got a string"),
                               ("stream", 1, "true or false"), ("n", False, "got false")):
        answer = httpx.post(url, headers=auth, timeout=30,
                            json={"model": CHAT, "messages": HELLO, "max_tokens": 2, field: value})
        assert answer.status_code == 400, (field, answer.text)
        assert answer.json()["error"]["param"].startswith(field) and said in answer.json()["error"]["message"]
    # An embeddings request of more texts than OpenAI's API takes says so (not "a valid string")
    many = httpx.post(f"{gateway_url}/v1/embeddings", headers=auth, timeout=30,
                      json={"model": EMBED, "input": ["a"] * 2049})
    assert many.status_code == 400 and "at most 2048 texts" in many.json()["error"]["message"]
    # while a whole number written as 2.0 is still one (JSON Schema's integers include it)
    answer = httpx.post(url, headers=auth, timeout=60, json={"model": CHAT, "messages": HELLO, "max_tokens": 2.0})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 2


def test_health_and_readiness(gateway_url: str) -> None:
    assert httpx.get(f"{gateway_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{gateway_url}/readyz").json() == {"status": "ready"}


def test_client_disconnect_cancels_the_job_on_the_worker(gateway_url: str, redis_client) -> None:  # type: ignore[no-untyped-def]
    from smmf_queue import job_record, keys
    from smmf_queue.streaming import decode_log

    # Given a long streamed reply
    body = {"model": CHAT, "messages": HELLO, "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gateway_url}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {GATEWAY_KEY}"}) as response:
        first = next(line for line in response.iter_lines()  # the first text, after the role frame
                     if line.startswith("data: {") and '"role"' not in line)
    # When the client goes away after the first chunk
    job_id = first.split('"id":"chatcmpl-', 1)[1].split('"', 1)[0]

    def terminal() -> list:  # type: ignore[type-arg]
        events = decode_log(redis_client.xrange(keys.event_log(job_id)))
        return [e for e in events if e.terminal]

    # Then the worker stops generating and ends the job as cancelled, long before 4000 tokens
    wait_until(lambda: bool(terminal()), 30, "the job to end")
    end = terminal()[0]
    assert (end.type, end.error_type) == ("error", "Cancelled")
    assert job_record.read(redis_client, job_id)["state"] == "FAILED"


def test_prometheus_metrics_from_gateway_and_worker(oai: openai.OpenAI, gateway_url: str,
                                                    chat_worker: WorkerProcess) -> None:
    oai.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=5)
    list(oai.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=5, stream=True))
    gateway = httpx.get(f"{gateway_url}/metrics").text
    assert (f'smmf_gateway_requests_total{{endpoint="/v1/chat/completions",model="{CHAT}",'
            f'status="200"}}') in gateway
    assert f'smmf_gateway_time_to_first_token_seconds_count{{model="{CHAT}"}}' in gateway
    assert f'smmf_live_workers{{kind="llm",model="{CHAT}"}} 1.0' in gateway
    assert f'smmf_queue_depth{{kind="llm",model="{IDLE}"}} 0.0' in gateway
    # And what clients send cannot make up label values (a series each)
    headers = {"Authorization": f"Bearer {GATEWAY_KEY}"}
    for i in range(3):
        httpx.get(f"{gateway_url}/v1/made-up-{i}", headers=headers)
        httpx.post(f"{gateway_url}/v1/chat/completions", headers=headers,
                   json={"model": f"made-up-model-{i}", "messages": HELLO})
    gateway = httpx.get(f"{gateway_url}/metrics").text
    assert "made-up" not in gateway
    assert 'endpoint="unmatched",model="",status="404"' in gateway
    assert 'endpoint="/v1/chat/completions",model="unknown",status="404"' in gateway
    worker = httpx.get(f"http://127.0.0.1:{chat_worker.metrics_port}/metrics").text
    done = [line for line in worker.splitlines()
            if line.startswith(f'smmf_jobs_total{{kind="llm",model="{CHAT}",outcome="done"}}')]
    assert done and float(done[0].split()[-1]) >= 2
    for name in ("smmf_queue_wait_seconds_count", "smmf_worker_time_to_first_token_seconds_count",
                 "smmf_generated_tokens_total"):
        assert f"{name}{{" in worker, name


def test_a_worker_lost_mid_stream_ends_the_stream_with_an_openai_error_frame(
        gateway_url: str, start_worker) -> None:  # type: ignore[no-untyped-def]
    import json

    # Given a long reply streaming from a worker
    first = start_worker(SPARE)
    body = {"model": SPARE, "messages": HELLO, "max_tokens": 4000, "temperature": 0, "stream": True}
    frames: list[str] = []
    with httpx.stream("POST", f"{gateway_url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {GATEWAY_KEY}"}) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        frames.append(next(lines))  # the role frame
        frames.append(next(lines))  # the first text
        # When the worker dies and another replica takes the job over
        first.kill()
        second = start_worker(SPARE)
        frames.extend(lines)
    second.stop()
    # Then the stream ends with an OpenAI-shaped error frame, then [DONE], never mixed text
    assert frames[-1] == "data: [DONE]"
    error = json.loads(frames[-2].removeprefix("data: "))
    assert set(error) == {"error"}
    assert error["error"]["code"] == "job_failed" and "lost" in error["error"]["message"]


def test_with_wait_for_worker_a_request_waits_in_the_queue_until_a_worker_starts(
        config_path: Path, tmp_path: Path, redis_client, start_worker) -> None:  # type: ignore[no-untyped-def]
    import threading

    from fastapi.testclient import TestClient

    from smmf_queue import keys, load_config
    from smmf_queue.gateway import create_app

    # Given a gateway configured to queue and wait when no worker serves a model
    waiting_config = tmp_path / "wait.toml"
    waiting_config.write_text(config_path.read_text().replace(
        "max_body_bytes = 65536", "max_body_bytes = 65536\nwait_for_worker = true"))
    replies: list[httpx.Response] = []
    with TestClient(create_app(load_config(waiting_config))) as gateway:
        body = {"model": IDLE, "messages": HELLO, "max_tokens": 3}
        request = threading.Thread(target=lambda: replies.append(gateway.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {GATEWAY_KEY}"})))
        request.start()
        # When the request's job sits in the queue and only then a worker starts
        wait_until(lambda: redis_client.llen(keys.queue_name("llm", IDLE)) == 1, 10, "the queued job")
        worker = start_worker(IDLE)
        request.join(60)
    worker.stop()
    # Then the request is answered by that worker
    assert replies and replies[0].status_code == 200
    assert replies[0].json()["usage"]["completion_tokens"] == 3


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_fields_a_model_cannot_honour_are_refused_never_dropped_silently(oai: openai.OpenAI) -> None:
    # Given a model that honours no tools (no tool_parser), no audio, no logit_bias, no images
    image = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                          {"type": "image_url", "image_url": {"url": "data:,"}}]}]
    asks = [({"tools": TOOLS}, "tools"), ({"audio": {"voice": "alloy"}}, "audio"),
            ({"logit_bias": {"1": 5}}, "logit_bias"),
            ({"messages": image}, "messages[].content[].image_url")]
    for fields, param in asks:
        # When a request asks for one of them, Then it is a 400 naming the field and the model
        with pytest.raises(openai.BadRequestError) as refused:
            oai.chat.completions.create(**{"model": CHAT, "messages": HELLO, **fields})  # type: ignore[call-overload]
        assert (refused.value.code, refused.value.param) == ("unsupported_parameter", param)
        assert CHAT in refused.value.message
    # and a malformed part is a 400 too (it was a 500, found by schemathesis)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=CHAT, messages=[  # type: ignore[list-item]
            {"role": "user", "content": [{"type": "text", "text": {}}]}])
    # and fields sent with the values that ask for nothing (as many clients do) are accepted
    reply = oai.chat.completions.create(model=CHAT, messages=HELLO, max_tokens=2, tool_choice="none",
                                        response_format={"type": "text"}, logprobs=False, n=1,
                                        presence_penalty=0, user="someone")
    assert reply.choices[0].message.content


def test_a_model_with_drop_params_drops_them_and_says_which(gateway_url: str, config_path: Path,
                                                            start_worker) -> None:  # type: ignore[no-untyped-def]
    from smmf_queue import Client

    worker = start_worker(SPARE)  # SPARE has drop_params = true (conftest)
    reply = httpx.post(f"{gateway_url}/v1/chat/completions", timeout=60,
                       headers={"Authorization": f"Bearer {GATEWAY_KEY}"},
                       json={"model": SPARE, "messages": HELLO, "max_tokens": 3, "tools": TOOLS,
                             "logit_bias": {"1": 5}})
    with Client(config_path) as sdk:  # the SDK drops them too
        assert sdk.chat(SPARE, HELLO, max_tokens=3, tools=TOOLS).usage.completion_tokens == 3
    worker.stop()
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    assert reply.headers["x-smmf-dropped-params"] == "tools,logit_bias"


def test_protocol_details_clients_trip_on(gateway_url: str, config_path: Path, tmp_path: Path,
                                          start_worker) -> None:  # type: ignore[no-untyped-def]
    auth = {"Authorization": f"Bearer {GATEWAY_KEY}"}
    # An unknown route is an OpenAI-shaped 404; every response says x-request-id
    missing = httpx.get(f"{gateway_url}/v1/no-such-route", headers=auth)
    assert missing.status_code == 404 and set(missing.json()["error"]) >= {"message", "type"}
    assert missing.headers["x-request-id"]
    # /v1/models entries carry `created`
    models = httpx.get(f"{gateway_url}/v1/models", headers=auth).json()["data"]
    assert all(isinstance(m["created"], int) and m["created"] > 0 for m in models)
    # a 503 has OpenAI's error type
    down = httpx.post(f"{gateway_url}/v1/chat/completions", headers=auth,
                      json={"model": IDLE, "messages": HELLO})
    assert (down.status_code, down.json()["error"]["type"]) == (503, "server_error")

    # Given a gateway that queues requests for a model no worker serves yet
    waiting_config = tmp_path / "wait.toml"
    waiting_config.write_text(config_path.read_text().replace(
        "resume_grace_s = 0", "resume_grace_s = 0\nwait_for_worker = true\nkeepalive_s = 0.2"))
    port = free_port()
    gateway = start_service("gateway", waiting_config, tmp_path / "gateway.log",
                            f"http://127.0.0.1:{port}/healthz", "--port", str(port))
    worker = None
    try:
        body = {"model": IDLE, "messages": HELLO, "max_tokens": 3, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body,
                          headers=auth, timeout=60) as response:
            # When a streamed request waits in the queue
            # Then the response starts at once, uncached and unbuffered by proxies
            assert response.status_code == 200
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            lines = response.iter_lines()
            seen = []
            # and comment lines keep the connection busy until a worker takes the job
            while len([line for line in seen if line.startswith(":")]) < 3:
                seen.append(next(lines))
            worker = start_worker(IDLE, config=waiting_config)
            seen.extend(lines)
        frames = [json.loads(line[6:]) for line in seen if line.startswith("data: {")]
        assert "".join(f["choices"][0]["delta"].get("content", "") for f in frames)
        assert [line for line in seen if line][-1] == "data: [DONE]"
        # and its x-request-id is the job's id
        assert frames[0]["id"] == f"chatcmpl-{response.headers['x-request-id']}"
    finally:
        if worker is not None:
            worker.stop()
        gateway.terminate()
        gateway.wait(timeout=15)


def test_embedding_inputs_as_langchain_and_dbgpt_send_them(gateway_url: str) -> None:
    auth = {"Authorization": f"Bearer {GATEWAY_KEY}"}
    for tokens in ([101, 2023, 102], [[101, 2023], [101, 102]]):
        # token ids (LangChain's OpenAIEmbeddings' default) are refused, saying how to send text
        refused = httpx.post(f"{gateway_url}/v1/embeddings", headers=auth, json={"model": EMBED, "input": tokens})
        assert refused.status_code == 400
        assert "check_embedding_ctx_length=False" in refused.json()["error"]["message"]
    # `dimensions` on a model that cannot shorten its vectors: refused, naming the field
    shortened = httpx.post(f"{gateway_url}/v1/embeddings", headers=auth,
                           json={"model": EMBED, "input": "x", "dimensions": 8})
    assert shortened.status_code == 400
    assert (shortened.json()["error"]["code"], shortened.json()["error"]["param"]) == (
        "unsupported_parameter", "dimensions")
    # and text with a `user` (as DB-GPT's client sends it) is served
    served = httpx.post(f"{gateway_url}/v1/embeddings", headers=auth,
                        json={"model": EMBED, "input": ["a", "b"], "user": "dbgpt"})
    assert served.status_code == 200 and len(served.json()["data"]) == 2


def test_the_completions_api_on_an_hf_model_reads_the_prompt_as_it_is(oai: openai.OpenAI,
                                                                      tiny_models: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Given the model in this process, greedy, fed the prompt with no chat template
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "tiny-noise-chat")
    model = AutoModelForCausalLM.from_pretrained(tiny_models / "tiny-noise-chat")
    inputs = tokenizer("the quick brown fox", return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(ids[0, inputs["input_ids"].shape[-1]:], skip_special_tokens=True)
    # When the gateway's completions API is asked the same
    whole = oai.completions.create(model=CHAT, prompt="the quick brown fox", max_tokens=8, temperature=0)
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model=CHAT, prompt="the quick brown fox", max_tokens=8, temperature=0, stream=True))
    # Then it gives the model's own continuation, whole and streamed
    assert whole.choices[0].text == streamed == expected
    assert whole.usage is not None and whole.usage.completion_tokens == 8


def test_n_choices_are_one_job_each_seeded_in_turn(oai: openai.OpenAI) -> None:
    ask = {"model": CHAT, "messages": HELLO, "max_tokens": 6, "temperature": 1.0, "seed": 7}
    # Given the choice a single seeded request gives, for seeds 7, 8 and 9
    singles = [oai.chat.completions.create(**{**ask, "seed": 7 + i}).choices[0].message.content
               for i in range(3)]  # type: ignore[call-overload]
    # When a request asks for 3 choices, whole and streamed
    whole = oai.chat.completions.create(**ask, n=3)  # type: ignore[call-overload]
    texts: dict[int, str] = {}
    usage = None
    for chunk in oai.chat.completions.create(**ask, n=3, stream=True,  # type: ignore[call-overload]
                                             stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    # Then choice i is what seed 7 + i gives, in both
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.message.content for c in whole.choices] == singles == [texts[i] for i in range(3)]
    assert len(set(singles)) > 1
    # and usage counts every choice's tokens, the prompt once
    assert whole.usage is not None and whole.usage.completion_tokens == 18
    assert usage is not None and usage.completion_tokens == 18
    assert whole.usage.prompt_tokens == usage.prompt_tokens
    # and more choices than gateway.max_n (16) are refused before any job is queued
    with pytest.raises(openai.BadRequestError, match="max_n"):
        oai.chat.completions.create(**ask, n=17)  # type: ignore[call-overload]
    # and the largest seed there is gives its next choices seeds 0, 1 (it was a 400: "params.seed")
    from smmf_queue.jobs import SEED_MAX

    last = oai.chat.completions.create(**{**ask, "seed": SEED_MAX}, n=3)  # type: ignore[call-overload]
    assert [c.message.content for c in last.choices[1:]] == [
        oai.chat.completions.create(**{**ask, "seed": i}).choices[0].message.content for i in range(2)]  # type: ignore[call-overload]


def test_logprobs_of_an_hf_model_streamed_and_whole(oai: openai.OpenAI) -> None:
    ask = {"model": CHAT, "messages": HELLO, "max_tokens": 5, "temperature": 0, "logprobs": True,
           "top_logprobs": 2}
    whole = oai.chat.completions.create(**ask)  # type: ignore[call-overload]
    content = whole.choices[0].logprobs.content
    # one entry per token generated, greedy: the token taken is the most likely one
    assert len(content) == whole.usage.completion_tokens == 5
    assert all(len(e.top_logprobs) == 2 and e.logprob == pytest.approx(e.top_logprobs[0].logprob)
               for e in content)
    streamed = [e for chunk in oai.chat.completions.create(**ask, stream=True)  # type: ignore[call-overload]
                if chunk.choices and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_an_hf_model_answers_in_a_json_schema_under_constrained_decoding(oai: openai.OpenAI) -> None:
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    # Given a model with random weights (its text is noise), When a request asks for a schema
    for stream in (False, True):
        ask = {"model": CHAT, "messages": HELLO, "max_tokens": 120, "temperature": 0, "stream": stream,
               "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}
        reply = oai.chat.completions.create(**ask)  # type: ignore[call-overload]
        text = reply.choices[0].message.content if not stream else "".join(
            c.choices[0].delta.content or "" for c in reply if c.choices)
        # Then lm-format-enforcer kept every token to the schema: the reply validates
        jsonschema.validate(json.loads(text), schema)
