"""Tools, structured output and penalties end to end (issue #17), with the official `openai`
SDK against the gateway: through `proxy/openai` to a real `llama_cpp.server` running
llama-cpp-python's function-calling chat format, and through the `llama.cpp` provider with the
same format. Forced `tool_choice` makes even random weights emit a valid call (the engine
samples under a grammar made from the tool's schema). The exact stream shape of parallel calls
is checked against a FAKE upstream (tests/fake_upstream.py): no server that runs here streams
parallel calls.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import llama_cpp
import openai
import pytest
import redis
from pydantic import BaseModel, ConfigDict, Field

from smmf_queue import (
    Client,
    JobFailed,
    NoLiveWorker,
    ProviderUnavailable,
    UnsupportedParameter,
    chat_fields,
    keys,
    registry,
)
from smmf_queue.embedded_redis import EmbeddedRedis
from smmf_queue.jobs import ChatRequest, ToolCall
from smmf_queue.providers import TEXT_TOOL_CALLS, TOOL_FIELDS
from smmf_queue.tool_calls import assemble

from .conftest import StartWorker, gateway_process, llama_cpp_server, wait_until
from .fake_upstream import FakeUpstream, chat_chunk

KEY = "sk-tool-server-31"
#: a chat template of the Hermes family (as Qwen2.5's): the tools go into the system turn.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n"
    "{% endfor %}</tools>\nCall one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>"
    "<|im_end|>\n{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city", "parameters": CITY}}
FORCED = {"type": "function", "function": {"name": "get_weather"}}
ANSWER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                           "sunny": {"type": "boolean"}},
          "required": ["city", "sunny"], "additionalProperties": False}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOL_MODELS = ["tool-proxy", "gguf-tools", "gguf-server"]


@pytest.fixture(scope="module")
def tool_server(gguf_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("tool-server") / "server.log"
    with llama_cpp_server(gguf_model, log, KEY, "--chat_format", "chatml-function-calling",
                          "--logits_all", "true") as base:
        yield base


@pytest.fixture(scope="module")
def tools_config(tmp_path_factory: pytest.TempPathFactory, redis_server: EmbeddedRedis,
                 gguf_model: Path, tool_server: str, upstream: FakeUpstream, tiny_models: Path) -> Path:
    folder = tmp_path_factory.mktemp("tools")
    hermes = folder / "tiny-hermes"
    shutil.copytree(tiny_models / "tiny-noise-chat", hermes)
    (hermes / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    path = folder / "tools.toml"
    path.write_text(f"""
[[models.llms]]
name = "hf-hermes"
provider = "hf"
path = "{hermes}"
tool_parser = "hermes"

[[models.llms]]
name = "tool-proxy"
provider = "proxy/openai"
backend = "tiny-gguf"
api_base = "{tool_server}"
api_key = "{KEY}"
concurrency = 2

[[models.llms]]
name = "gguf-tools"
provider = "llama.cpp"
path = "{gguf_model}"
chat_format = "chatml-function-calling"
logits_all = true
n_threads = 1

[[models.llms]]
name = "gguf-server"
provider = "llama.cpp.server"
path = "{gguf_model}"
chat_format = "chatml-function-calling"
logits_all = true
n_threads = 1

[[models.llms]]
name = "gguf-plain"
provider = "llama.cpp"
path = "{gguf_model}"
n_threads = 1

[[models.llms]]
name = "fake-tools"
provider = "proxy/openai"
api_base = "{upstream.url}/v1"
api_key = "sk-fake"

[[models.embeddings]]
name = "fake-embed"
provider = "proxy/openai"
api_base = "{upstream.url}/v1"
api_key = "sk-fake"
{_models_for_the_table(upstream.url, tiny_models)}
[queue]
broker_url = "{redis_server.url}"
job_timeout_s = 60

[gateway]
resume_grace_s = 0
""")
    return path


#: a model of each provider for the field table's cells (those not served here only refuse).
TABLE_MODELS = {"hf": "hf-hermes", "llama.cpp": "gguf-tools", "llama.cpp.server": "gguf-server",
                "vllm": "table-vllm", "mlx": "table-mlx",
                "proxy/openai": "fake-tools", "proxy/deepseek": "table-deepseek",
                "proxy/tongyi": "table-tongyi", "proxy/siliconflow": "table-siliconflow",
                "proxy/ollama": "table-ollama"}
SERVED = ["hf-hermes", "tool-proxy", "gguf-tools", "gguf-server", "gguf-plain", "fake-tools", "fake-embed", "table-hf", "table-deepseek", "table-tongyi",
          "table-siliconflow"]


def _models_for_the_table(fake: str, models: Path) -> str:
    """The table's models not configured above: API proxies to the fake, engines that cannot
    run here (they only refuse), and an hf model without a tool parser."""
    entries = [f'[[models.llms]]\nname = "table-hf"\nprovider = "hf"\npath = "{models / "tiny-noise-chat"}"\n']
    for provider, name in TABLE_MODELS.items():
        if name in ("hf-hermes", "gguf-tools", "gguf-server", "fake-tools"):
            continue
        where = f'api_base = "{fake}/v1"\napi_key = "sk-fake"' if provider.startswith("proxy/") \
            else f'path = "/not/loaded/{name}"'
        entries.append(f'[[models.llms]]\nname = "{name}"\nprovider = "{provider}"\n{where}\n')
    return "\n".join(entries)


@pytest.fixture(scope="module")
def gateway(tools_config: Path, start_worker: StartWorker,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    start_worker(*SERVED, config=tools_config)
    with gateway_process(tools_config, tmp_path_factory.mktemp("tools-gateway")) as url:
        yield url


@pytest.fixture(scope="module")
def oai(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)


def _valid_call(call: Any) -> dict[str, Any]:
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments: dict[str, Any] = json.loads(call.function.arguments)
    jsonschema.validate(arguments, CITY)
    return arguments


@pytest.mark.parametrize("model", TOOL_MODELS)
def test_the_openai_sdk_runs_a_tool_loop_through_the_gateway(oai: openai.OpenAI, model: str) -> None:
    # Given a model behind the gateway that honours tools
    # When the official SDK streams a request that forces a tool call (its stream helper joins
    # the fragments as OpenAI's own stream would be joined)
    with oai.chat.completions.stream(model=model, messages=ASK, tools=[WEATHER],  # type: ignore[list-item]
                                     tool_choice=FORCED, temperature=0) as stream:  # type: ignore[arg-type]
        streamed = stream.get_final_completion()
    # Then the reply is one valid call, named once, its arguments valid against the schema
    choice = streamed.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls or []) == 1
    arguments = _valid_call(choice.message.tool_calls[0])  # type: ignore[index]
    # and the same request answered whole carries the same call
    whole = oai.chat.completions.create(model=model, messages=ASK, tools=[WEATHER],  # type: ignore[list-item]
                                        tool_choice=FORCED, temperature=0)  # type: ignore[arg-type]
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.content is None
    assert _valid_call(whole.choices[0].message.tool_calls[0]) == arguments  # type: ignore[index]
    # When the call's result goes back in a second turn
    call = whole.choices[0].message.tool_calls[0]  # type: ignore[index]
    turn = [*ASK, whole.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": '{"sunny": true}'}]
    answer = oai.chat.completions.create(model=model, messages=turn, tools=[WEATHER],  # type: ignore[arg-type,list-item]
                                         tool_choice="none", max_tokens=8, temperature=0)
    # Then the model answers in text
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("model", ["gguf-tools", "gguf-server"])
def test_with_tool_choice_auto_the_model_picks_text_or_a_valid_call(tools_config: Path, gateway: str,
                                                                  model: str) -> None:
    # llama-cpp-python answers that choice whole (it cannot stream it): still one reply
    with Client(tools_config) as sdk:
        chosen = sdk.chat(model, ASK, tools=[WEATHER], tool_choice="auto", max_tokens=16)
        deltas = list(sdk.stream_chat(model, ASK, tools=[WEATHER], tool_choice="auto", max_tokens=16))
    assert chosen.finish_reason in ("tool_calls", "stop", "length")
    assert (chosen.finish_reason == "tool_calls") == bool(chosen.tool_calls)
    for call in chosen.tool_calls:
        _valid_call(call)
    assert deltas[-1].finish_reason == chosen.finish_reason


def test_the_sdk_gives_typed_tool_calls_streamed_and_whole(tools_config: Path, gateway: str) -> None:
    with Client(tools_config) as sdk:
        result = sdk.chat("gguf-tools", ASK, tools=[WEATHER], tool_choice=FORCED, temperature=0)
        deltas = list(sdk.stream_chat("gguf-tools", ASK, tools=[WEATHER], tool_choice=FORCED,
                                      temperature=0))
    assert result.finish_reason == "tool_calls" and isinstance(result.tool_calls[0], ToolCall)
    _valid_call(result.tool_calls[0])
    fragments = [f for d in deltas for f in d.tool_calls]
    assert fragments[0].name == "get_weather" and all(f.name is None for f in fragments[1:])
    assert [c.function for c in assemble(fragments)] == [c.function for c in result.tool_calls]
    assert deltas[-1].finish_reason == "tool_calls"


def test_parallel_calls_keep_openai_stream_shape_and_fields_are_forwarded(
        oai: openai.OpenAI, gateway: str, upstream: FakeUpstream) -> None:
    # Given an upstream that streams two calls, their fragments interleaved, as OpenAI does
    def fragment(index: int, arguments: str, call_id: str | None = None) -> dict[str, Any]:
        chunk = chat_chunk()
        call: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
        if call_id:
            call.update(id=call_id, type="function")
            call["function"]["name"] = "get_weather"
        chunk["choices"][0]["delta"] = {"tool_calls": [call]}
        return chunk

    upstream.reset()
    upstream.sse([fragment(0, "", "call_a"), fragment(0, '{"city":'), fragment(1, "", "call_b"),
                  fragment(0, ' "Paris"}'), fragment(1, '{"city": "Rome"}'),
                  chat_chunk(finish="tool_calls"), chat_chunk(usage={"prompt_tokens": 9,
                                                                    "completion_tokens": 12})])
    fields = {"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False,
              "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER}},
              "presence_penalty": 0.5, "frequency_penalty": -0.5}
    # When a client streams a request through the gateway
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", timeout=60,
                      json={"model": "fake-tools", "messages": ASK, "stream": True, **fields}) as reply:
        chunks = [json.loads(line[6:]) for line in reply.iter_lines()
                  if line.startswith("data: {")]
    # Then every field reached the upstream unchanged
    sent = upstream.requests[0].body
    assert {name: sent[name] for name in fields} == fields
    # and each call's id, type and name came once, in its first fragment, then only arguments
    calls = [call for c in chunks for call in c["choices"][0]["delta"].get("tool_calls", [])]
    assert [c.get("id") for c in calls if "id" in c] == ["call_a", "call_b"]
    assert all(set(c["function"]) == {"arguments"} for c in calls if "id" not in c)
    joined = {i: "".join(c["function"]["arguments"] for c in calls if c["index"] == i) for i in (0, 1)}
    assert [json.loads(joined[0]), json.loads(joined[1])] == [{"city": "Paris"}, {"city": "Rome"}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("model", ["gguf-plain", "gguf-tools", "gguf-server"])
def test_a_json_schema_reply_validates_even_from_random_weights(oai: openai.OpenAI, model: str) -> None:
    # Given a llama.cpp model (random weights: unconstrained, its text is noise)
    # When a request asks for a JSON schema
    reply = oai.chat.completions.create(
        model=model, messages=ASK, max_tokens=200, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}})
    # Then sampling under the schema's grammar gives JSON that validates
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), ANSWER)


def test_json_mode_with_a_schema_reaches_a_real_upstream(oai: openai.OpenAI) -> None:
    # llama_cpp.server takes a schema inside `json_object` (its extension of OpenAI's JSON mode):
    # the gateway passes it through unchanged, and the server constrains its sampling with it
    reply = oai.chat.completions.create(model="tool-proxy", messages=ASK, max_tokens=200, temperature=0,
                                        response_format={"type": "json_object", "schema": ANSWER})  # type: ignore[typeddict-unknown-key]
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), ANSWER)


def test_dimensions_reach_an_openai_compatible_embeddings_api(oai: openai.OpenAI,
                                                             upstream: FakeUpstream) -> None:
    upstream.reset()
    upstream.reply(json_body={"object": "list", "model": "m", "usage": {"prompt_tokens": 2, "total_tokens": 2},
                              "data": [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}]})
    reply = oai.embeddings.create(model="fake-embed", input="a queue", dimensions=2)
    assert upstream.requests[0].body["dimensions"] == 2
    assert reply.data[0].embedding == pytest.approx([0.6, 0.8])


def test_tools_are_refused_where_the_chat_format_cannot_parse_calls(oai: openai.OpenAI) -> None:
    # Given a llama.cpp model whose chat format (the GGUF's own template) parses no tool calls
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model="gguf-plain", messages=ASK, tools=[WEATHER])  # type: ignore[list-item]
    assert (refused.value.code, refused.value.param) == ("unsupported_parameter", "tools")
    assert "gguf-plain" in refused.value.message


def test_penalties_reach_the_llama_cpp_sampler(oai: openai.OpenAI) -> None:
    def reply(**penalties: float) -> str:
        return oai.chat.completions.create(model="gguf-plain", messages=ASK, max_tokens=40,
                                           temperature=0, **penalties).choices[0].message.content or ""

    assert reply() == reply()
    assert reply(presence_penalty=2.0, frequency_penalty=2.0) != reply()


class _WireOneMessage(BaseModel):
    """The chat job message of wire 1, as released (strict, as its workers are)."""

    model_config = ConfigDict(extra="forbid")
    role: str
    content: str


class _WireOneRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    v: int
    job_id: str
    reply_to: str | None = None
    submitted_at: float
    model: str
    messages: list[_WireOneMessage]
    params: dict[str, Any] = Field(default_factory=dict)


def test_a_plain_request_is_still_a_wire_one_message() -> None:
    plain = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}],  # type: ignore[list-item]
                        params={"temperature": 0, "stop": ["x"]}, reply_to="r")
    message = plain.message()
    assert message["v"] == 1 and _WireOneRequest.model_validate(message)
    with_tools = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}],  # type: ignore[list-item]
                             tools=[WEATHER], reply_to="r")
    assert with_tools.message()["v"] == 2
    with pytest.raises(ValueError):
        _WireOneRequest.model_validate(with_tools.message())


def test_a_wire_two_request_waits_while_an_old_worker_serves_its_model(
        tools_config: Path, gateway: str, redis_server: EmbeddedRedis) -> None:
    # Given a worker from before wire 2 among the model's workers: a FAKE heartbeat of one (its
    # record has no `wire`, as such workers write it)
    heartbeats = redis.Redis.from_url(redis_server.url)
    old = registry.WorkerInfo(worker_id="old-worker@test", host="h", pid=1, hardware="cpu",
                              started_at=time.time(), beat_at=time.time(),
                              models=[registry.ServedModel(name="gguf-tools", kind="llm",
                                                           queue="q", provider="llama.cpp", slots=1)])
    heartbeats.set(keys.worker_heartbeat(old.worker_id), old.model_dump_json(exclude={"wire"}), ex=30)
    heartbeats.sadd(keys.WORKERS, old.worker_id)
    try:
        with Client(tools_config) as sdk:
            # When a request needs wire 2, Then it is refused before it is enqueued
            with pytest.raises(NoLiveWorker, match="predate job wire 2"):
                sdk.chat("gguf-tools", ASK, tools=[WEATHER], tool_choice=FORCED)
            # and a plain request still goes (any worker reads it)
            assert sdk.chat("gguf-tools", ASK, max_tokens=2).usage.completion_tokens == 2
    finally:
        registry.forget(heartbeats, old.worker_id)


# The field × provider table (README.md): kept current, and every cell tested.

#: a value of each field that asks for something, and the messages that carry it.
ASKING: dict[str, Any] = {
    "tools": [WEATHER], "tool_choice": FORCED, "parallel_tool_calls": False,
    "functions": [WEATHER["function"]], "function_call": {"name": "get_weather"},
    "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}},
    "logprobs": True, "top_logprobs": 2, "n": 2, "presence_penalty": 1.5, "frequency_penalty": 1.5,
    "logit_bias": {"65": 5.0}, "modalities": ["text", "audio"], "audio": {"voice": "alloy"},
    "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "low",
    "web_search_options": {}, "verbosity": "low", "prompt": "Once upon a time", "suffix": "The end.",
    "best_of": 3,
}
PARTS = {"messages[].content[].image_url": {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
         "messages[].content[].input_audio": {"type": "input_audio",
                                              "input_audio": {"data": "AA==", "format": "wav"}}}
CELLS = [(field, provider) for field in chat_fields.TABLE_FIELDS for provider in chat_fields.chat_providers()]


def _asking(field: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, fields) of a request that asks for `field`."""
    if field in PARTS:
        return [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, PARTS[field]]}], {}
    return ASK, {field: ASKING[field]}


def test_the_readme_holds_the_current_field_table() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start, end = "<!-- fields-table:start -->\n", "<!-- fields-table:end -->"
    assert readme[readme.index(start) + len(start):readme.index(end)] == chat_fields.support_table()
    assert set(ASKING) | set(PARTS) == set(chat_fields.TABLE_FIELDS)


@pytest.mark.parametrize(("field", "provider"), CELLS)
def test_each_cell_of_the_field_table(field: str, provider: str, tools_config: Path, gateway: str,
                                      upstream: FakeUpstream) -> None:
    status = chat_fields.status(provider, field)
    if provider == "vllm" and status != "refused":
        pytest.skip("vLLM runs on an NVIDIA GPU only (none here); its refusals are tested")
    model = TABLE_MODELS[provider]
    messages, fields = _asking(field)
    if field == "prompt":  # the completions API: a prompt in place of messages
        messages = []
    with Client(tools_config) as sdk:
        if status == "refused":
            with pytest.raises(UnsupportedParameter) as refused:
                sdk.chat(model, messages, **fields)
            assert refused.value.param == field and model in refused.value.message
        elif status == "forwarded":
            upstream.reset()
            upstream.sse([chat_chunk("ok"), chat_chunk(finish="stop")])
            sdk.chat(model, messages, **fields)
            sent = upstream.requests[0].body
            assert (sent["messages"] == messages) if field in PARTS else (sent[field] == fields[field])
            assert upstream.requests[0].path.endswith("/completions")
        else:
            honours = TEMPLATE_HONOURS if provider in TEXT_TOOL_CALLS and field in TOOL_FIELDS else HONOURED
            honours[field](sdk, model)
            if status != "honoured":  # honoured on a condition: a model without it refuses
                with pytest.raises(UnsupportedParameter):
                    sdk.chat(WITHOUT_CONDITION[provider], messages, **fields)


#: a model of each provider that lacks what its conditional cells need (chat_format, logits_all,
#: tool_parser).
WITHOUT_CONDITION = {"hf": "table-hf", "llama.cpp": "gguf-plain", "llama.cpp.server": "gguf-plain"}


def _tools_reach_the_template(sdk: Client, model: str) -> None:
    """A model that only writes text (its calls parsed from it) cannot be made to call: that
    the tools reach its template is what shows (the prompt grows by their schema)."""
    plain = sdk.chat(model, ASK, max_tokens=2)
    offered = sdk.chat(model, ASK, max_tokens=2, tools=[WEATHER], tool_choice="auto")
    assert offered.usage.prompt_tokens > plain.usage.prompt_tokens + 20


#: the same for tools parsed from text (hf, vLLM).
TEMPLATE_HONOURS: dict[str, Callable[[Client, str], None]] = {
    "tools": _tools_reach_the_template, "tool_choice": _tools_reach_the_template}


def _calls_the_tool(sdk: Client, model: str) -> None:
    result = sdk.chat(model, ASK, tools=[WEATHER], tool_choice=FORCED)
    assert result.finish_reason == "tool_calls"
    _valid_call(result.tool_calls[0])


def _answers_in_the_schema(sdk: Client, model: str) -> None:
    result = sdk.chat(model, ASK, max_tokens=200, response_format=ASKING["response_format"])
    jsonschema.validate(json.loads(result.text), ANSWER)


def _penalised(field: str) -> Callable[[Client, str], None]:
    def check(sdk: Client, model: str) -> None:
        plain = sdk.chat(model, ASK, max_tokens=40, temperature=0).text
        assert sdk.chat(model, ASK, max_tokens=40, temperature=0, **{field: 2.0}).text != plain
    return check


def _continues_the_prompt(sdk: Client, model: str) -> None:
    # (usage is not checked: llama_cpp.server streams none for this API)
    result = sdk.complete(model, ASKING["prompt"], max_tokens=8, temperature=0)
    assert result.text and result.finish_reason == "length"


def _gives_logprobs(sdk: Client, model: str) -> None:
    result = sdk.chat(model, ASK, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    assert "".join(entry["token"] for entry in result.logprobs) == result.text
    assert all(len(entry["top_logprobs"]) == 2 for entry in result.logprobs)


#: how an honoured field shows, by field.
HONOURED: dict[str, Callable[[Client, str], None]] = {
    "logprobs": _gives_logprobs, "top_logprobs": _gives_logprobs,
    "prompt": _continues_the_prompt,
    "tools": _calls_the_tool, "tool_choice": _calls_the_tool, "response_format": _answers_in_the_schema,
    "presence_penalty": _penalised("presence_penalty"), "frequency_penalty": _penalised("frequency_penalty"),
}


def test_a_llama_cpp_server_child_dies_with_its_worker(tools_config: Path, start_worker: StartWorker) -> None:
    # Given a worker of a `llama.cpp.server` model, and the server it started
    worker = start_worker("gguf-server", config=tools_config)
    children = subprocess.run(["pgrep", "-P", str(worker.process.pid), "-f", "llama_cpp.server"],
                              capture_output=True, text=True).stdout.split()
    assert len(children) == 1
    # When the worker is killed outright (no clean stop runs)
    worker.kill()
    # Then its server goes too
    wait_until(lambda: not Path(f"/proc/{children[0]}").exists()
               or "Z" in Path(f"/proc/{children[0]}/stat").read_text().split()[2], 15,
               "the llama_cpp.server child to exit")


@pytest.mark.parametrize("model", ["gguf-plain", "gguf-server", "tool-proxy"])
def test_the_completions_api_continues_a_prompt_as_it_is(oai: openai.OpenAI, gguf_model: Path,
                                                          model: str) -> None:
    # Given the engine in this process, reading the prompt with no chat template
    local = llama_cpp.Llama(model_path=str(gguf_model), n_ctx=512, n_threads=1, verbose=False)
    expected = local.create_completion("The queue", max_tokens=12, temperature=0)["choices"][0]["text"]
    # When the official SDK asks the gateway's completions API, whole and streamed
    whole = oai.completions.create(model=model, prompt="The queue", max_tokens=12, temperature=0)
    chunks = list(oai.completions.create(model=model, prompt="The queue", max_tokens=12,
                                         temperature=0, stream=True))
    # Then the text is the engine's own continuation of the prompt
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"
    # and `echo` puts the prompt first, `stop` cuts where the stop string begins
    echoed = oai.completions.create(model=model, prompt="The queue", max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == "The queue" + expected
    stop = expected[4:6]
    cut = oai.completions.create(model=model, prompt="The queue", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected[:expected.index(stop)]


def test_completion_fields_no_model_honours_are_refused(oai: openai.OpenAI) -> None:
    for fields, param in (({"logprobs": 2}, "logprobs"), ({"best_of": 2}, "best_of"),
                          ({"suffix": "end"}, "suffix"), ({"n": 2}, "n")):
        with pytest.raises(openai.BadRequestError) as refused:
            oai.completions.create(model="gguf-plain", prompt="x", **fields)  # type: ignore[call-overload]
        assert (refused.value.code, refused.value.param) == ("unsupported_parameter", param)


@pytest.mark.parametrize("model", ["gguf-tools", "gguf-server", "tool-proxy"])
def test_logprobs_come_in_openai_shape_streamed_and_whole(oai: openai.OpenAI, model: str) -> None:
    ask: dict[str, Any] = {"model": model, "messages": ASK, "max_tokens": 6, "temperature": 0,
                           "logprobs": True, "top_logprobs": 3}
    whole = oai.chat.completions.create(**ask)
    content = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    # one entry per token, the tokens spelling the text, each with its 3 best alternatives
    assert content and "".join(e.token for e in content) == whole.choices[0].message.content
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in content)
    assert all(e.logprob == pytest.approx(max(t.logprob for t in e.top_logprobs)) for e in content)
    streamed = [e for chunk in oai.chat.completions.create(**ask, stream=True)
                if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content or []]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_langchain_bind_tools_gets_calls_it_can_parse(gateway: str) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather in a city."""
        return "sunny"

    # Given LangChain's ChatOpenAI against the gateway, a tool bound and its call forced
    chat = ChatOpenAI(model="gguf-tools", base_url=f"{gateway}/v1", api_key="unused",  # type: ignore[arg-type]
                      temperature=0, max_retries=0)
    bound = chat.bind_tools([get_weather], tool_choice="get_weather")
    # When it asks, whole and streamed
    whole = bound.invoke("What is the weather in Paris?")
    streamed = None
    for chunk in bound.stream("What is the weather in Paris?"):
        streamed = chunk if streamed is None else streamed + chunk
    # Then LangChain parses the calls: the tool's name and arguments as a dict
    for message in (whole, streamed):
        assert message is not None
        calls = message.tool_calls  # type: ignore[attr-defined]
        assert [c["name"] for c in calls] == ["get_weather"] and calls[0]["args"]["city"] in ("Paris", "Rome")
    assert get_weather.invoke(whole.tool_calls[0]["args"]) == "sunny"


def test_an_hf_model_with_a_tool_parser_sees_the_tools_and_may_call_them(tools_config: Path,
                                                                        gateway: str) -> None:
    # Given an hf model whose chat template takes tools (Hermes family) and tool_parser = "hermes"
    with Client(tools_config) as sdk:
        plain = sdk.chat("hf-hermes", ASK, max_tokens=4, temperature=0)
        with_tools = sdk.chat("hf-hermes", ASK, max_tokens=4, temperature=0, tools=[WEATHER])
        # a forced call cannot be honoured by a model that only writes text: a clear failure
        with pytest.raises(JobFailed, match="cannot be made to call a tool"):
            sdk.chat("hf-hermes", ASK, max_tokens=4, tools=[WEATHER], tool_choice=FORCED)
    # Then the tools reach the model through its template (the prompt grew by their schema);
    # its reply (random weights: noise, no call) comes back as text, none of it lost
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    assert with_tools.text and not with_tools.tool_calls and with_tools.finish_reason == "length"


def test_a_tool_parser_on_a_template_without_tools_refuses_to_start(tiny_models: Path) -> None:
    from smmf_queue.config import ModelConfig
    from smmf_queue.providers.hf import HFProvider

    model = ModelConfig(name="m", provider="hf", path=str(tiny_models / "tiny-noise-chat"),
                        tool_parser="hermes")  # type: ignore[call-arg]
    with pytest.raises(ProviderUnavailable, match="takes no tools"):
        HFProvider(model).load()


def test_logit_bias_and_user_reach_an_openai_compatible_api(oai: openai.OpenAI,
                                                            upstream: FakeUpstream) -> None:
    upstream.reset()
    upstream.sse([chat_chunk("ok"), chat_chunk(finish="stop")])
    oai.chat.completions.create(model="fake-tools", messages=ASK, logit_bias={"42": -100},  # type: ignore[arg-type]
                                user="team-a/alice")
    sent = upstream.requests[0].body
    assert (sent["logit_bias"], sent["user"]) == ({"42": -100}, "team-a/alice")


def test_a_tool_result_reaches_a_function_calling_llama_cpp_model(oai: openai.OpenAI) -> None:
    # llama-cpp-python's function-calling template shows a `tool` message's role, not its
    # content: the provider turns it into a user turn, so the result's length shows in the prompt
    # (`llama.cpp.server` does the same, unseen here: its server streams no usage)
    model = "gguf-tools"
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}

    def prompt_tokens(result: str) -> int:
        turn = [*ASK, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": result}]
        reply = oai.chat.completions.create(model=model, messages=turn, max_tokens=2)  # type: ignore[arg-type]
        assert reply.usage is not None
        return reply.usage.prompt_tokens

    assert prompt_tokens("sunny and warm, 24 degrees, light wind from the west") > prompt_tokens("x") + 20


def test_the_llama_cpp_server_child_takes_a_key_that_begins_with_a_dash(gguf_model: Path) -> None:
    from smmf_queue.providers.llamacpp_server import _start_server, _stop

    url, server = _start_server(["--model", str(gguf_model), "--n_threads", "1"], "-starts-with-a-dash",
                                "m", 60)
    _stop(server)
    assert url.startswith("http://127.0.0.1:")
