"""The wire schema: what travels in job messages, stream events and results.

JSON only, versioned by `v`. A request never carries a provider secret: keys live in the
worker's config. Embedding vectors travel as base64 of little-endian float32 (exact and about
a quarter of the size of JSON floats).

Wire 2 added what apps send beyond plain text chat (tools, `response_format`, penalties, content
parts, assistant `tool_calls` and `tool` results) as fields that are left out when unset, so a
request that uses none of them is byte for byte a wire-1 message, which a wire-1 worker (strict
about unknown fields) still takes. A request that needs wire 2 says so in `v`, and a producer
sends it only while no wire-1 worker serves the model (client.py; workers say their wire in
the registry). Events only carry wire-2 fields (`tool_calls`) for requests that asked for them.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .json_types import JsonBody

#: wire version of requests and events; bump on an incompatible change.
WIRE_VERSION = 2
#: the version of a request that uses nothing wire 2 added.
PLAIN_WIRE = 1

EventType = Literal["delta", "end", "error", "restart"]
#: where an embedding job waits: "batch" chunks wait behind "interactive" jobs.
Lane = Literal["interactive", "batch"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: what a job id may contain (printable ASCII, no space): it is the Celery task id, part of
#: Redis keys, and the prefix of events on a reply channel, ended by a space.
JOB_ID_PATTERN = r"^[!-~]{1,200}$"


def new_job_id() -> str:
    """A fresh job id (also the Celery task id)."""
    return uuid.uuid4().hex


class FunctionCall(BaseModel):
    """The function an assistant's tool call names, with its arguments as a JSON string."""

    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str


class ToolCall(BaseModel):
    """A whole tool call, in OpenAI's shape (what a reply ends with and a later turn sends back).
    Extra keys are ignored: clients echo a streamed call's `index`."""

    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(_Wire):
    """A fragment of a streamed tool call: the first fragment of call `index` carries its id and
    function name, later ones only more of the arguments (flatter than OpenAI's chunk, which
    the gateway rebuilds; see tool_calls.py)."""

    index: int = Field(ge=0)
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class ContentPart(_Wire):
    """One part of a message's content: text, or an image by URL (http(s) or `data:`)."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: dict[str, Any] | None = None


class ChatMessage(_Wire):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    #: text, or parts where some are not text (wire 2); "" for an assistant turn of tool calls.
    content: str | list[ContentPart] = ""
    name: str | None = None
    #: an assistant turn's tool calls, and a `tool` message's answer to one of them (wire 2).
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The message as an engine or API takes it: unset fields left out."""
        return self.model_dump(exclude_none=True)

    @property
    def plain(self) -> bool:
        """Whether a wire-1 worker could read it: text content and nothing else."""
        return isinstance(self.content, str) and self.name is None and self.tool_calls is None \
            and self.tool_call_id is None


#: the largest seed: engines seed 32-bit generators (torch, numpy) and refuse more.
SEED_MAX = 2**32 - 1
#: most stop strings a request may carry.
MAX_STOPS = 16


class SamplingParams(_Wire, JsonBody):
    """Sampling parameters; None means "the model's default". 0 is a value, never dropped."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOPS)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    #: wire 2, OpenAI's: sent only to providers that honour them (chat_fields.py).
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    #: token id (as a string) → bias from -100 to 100, in the model's own vocabulary.
    logit_bias: dict[str, float] | None = None

    def given(self, **rename: str) -> dict[str, Any]:
        """The parameters the request sets (0 included; no stop list when empty), for an engine
        or API: `rename` maps our names to its own, e.g. max_tokens="num_predict" for Ollama."""
        values = self.model_dump(exclude_none=True)
        if not values.get("stop"):
            values.pop("stop", None)
        return {rename.get(name, name): value for name, value in values.items()}


class _JobRequest(_Wire, JsonBody):
    """What every job's request carries, whatever its kind. Its numbers and booleans are JSON's
    own (json_types.py): `max_tokens=True` from a caller's slip is an error, not one token."""

    v: int = WIRE_VERSION
    job_id: str = Field(default_factory=new_job_id, pattern=JOB_ID_PATTERN)
    #: the producer's reply channel: the worker publishes the job's events there too.
    reply_to: str | None = None
    #: the producer's clock (unix seconds) when it enqueued the job: time in queue.
    submitted_at: float = Field(default_factory=time.time)
    model: str

    def wire_needed(self) -> int:
        """The oldest wire version that can carry this request."""
        return PLAIN_WIRE

    def message(self) -> dict[str, Any]:
        """The job message: unset fields left out, so a plain request reads as wire 1."""
        return self.model_copy(update={"v": self.wire_needed()}).model_dump(mode="json",
                                                                            exclude_none=True)


class ChatRequest(_JobRequest):
    """A chat job, or a completion job (`prompt` instead of messages: no chat template; wire 2)."""

    messages: list[ChatMessage] = Field(default_factory=list)
    prompt: str | None = None
    params: SamplingParams = Field(default_factory=SamplingParams)
    #: wire 2, OpenAI's fields as sent (validated by the gateway's schema): function tools,
    #: which one to call ("auto", "required", "none" or {"type": "function", ...}), and
    #: {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    #: per-token log probabilities in the reply, and how many alternatives with each (wire 2).
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    #: the end user's id, for an API's abuse monitoring (sent on by proxies only).
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _messages_or_prompt(self) -> ChatRequest:
        if (self.prompt is None) == (not self.messages):
            raise ValueError("a chat job carries messages, a completion job a prompt: one of them")
        return self

    def given(self) -> dict[str, Any]:
        """The wire-2 top-level fields the request sets (tools, response_format...), by
        OpenAI's names, for an API or engine that takes them so."""
        return self.model_dump(include={"tools", "tool_choice", "parallel_tool_calls",
                                        "response_format", "logprobs", "top_logprobs", "user"},
                               exclude_none=True)

    def wire_needed(self) -> int:
        added = (self.prompt, self.tools, self.tool_choice, self.parallel_tool_calls, self.response_format,
                 self.logprobs, self.top_logprobs,
                 self.params.presence_penalty, self.params.frequency_penalty, self.params.logit_bias,
                 self.user)
        if any(value is not None for value in added) or not all(m.plain for m in self.messages):
            return WIRE_VERSION
        return PLAIN_WIRE


class EmbeddingRequest(_JobRequest):
    texts: list[str] = Field(min_length=1)
    #: scale vectors to unit length; None uses the model's setting.
    normalize: bool | None = None
    #: "batch" for a chunk of a batch pipeline: it waits behind interactive jobs and is run as
    #: it is (never merged with other jobs, so a resumed run embeds it bit for bit the same).
    lane: Lane = "interactive"
    #: OpenAI's `dimensions` (wire 2): only for providers that honour it.
    dimensions: int | None = Field(default=None, ge=1)

    def wire_needed(self) -> int:
        return WIRE_VERSION if self.dimensions is not None else PLAIN_WIRE


#: most documents one rerank job may score.
MAX_RERANK_DOCUMENTS = 10_000


class RerankRequest(_JobRequest):
    """Score `documents` for `query` (wire 2: only new producers send it, to new workers)."""

    v: int = WIRE_VERSION
    query: str
    documents: list[str] = Field(min_length=1, max_length=MAX_RERANK_DOCUMENTS)

    def wire_needed(self) -> int:
        return WIRE_VERSION


class Usage(_Wire):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamEvent(_Wire):
    """One event of a job's stream; `seq` counts from 1 across all attempts of the job."""

    v: int = WIRE_VERSION
    seq: int
    attempt: int
    type: EventType
    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    error_type: str | None = None
    error_message: str | None = None
    #: tool call fragments (wire 2; only for requests with tools).
    tool_calls: list[ToolCallDelta] | None = None
    #: OpenAI's `logprobs.content` entries of this event's tokens (wire 2; when asked).
    logprobs: list[dict[str, Any]] | None = None
    #: worker that ran this attempt (in `end`, `error` and `restart`).
    worker: str | None = None
    #: embedding jobs: base64 float32 vectors, row after row, and their width.
    vectors_b64: str | None = None
    dims: int | None = None
    #: rerank jobs: one relevance score per document, in input order (wire 2).
    scores: list[float] | None = None

    @property
    def terminal(self) -> bool:
        return self.type in ("end", "error")

    def encode(self) -> str:
        """Compact JSON for the wire (defaults left out)."""
        return self.model_dump_json(exclude_defaults=True)


class ChatDelta(BaseModel):
    """A piece of a streamed reply, as the SDK yields it; the last one says why it ended."""

    text: str = ""
    reasoning: str = ""
    #: fragments of tool calls (tool_calls.assemble puts them together).
    tool_calls: list[ToolCallDelta] = Field(default_factory=list)
    #: OpenAI's `logprobs.content` entries of its tokens, when asked.
    logprobs: list[dict[str, Any]] = Field(default_factory=list)
    #: true when a crash restarted the job: drop what was shown so far.
    restart: bool = False
    #: set on the last delta only ("stop", "length"), with the job's usage.
    finish_reason: str | None = None
    usage: Usage | None = None
    #: the `seq` of the event it came from: where a reader that drops may resume (SSE ids).
    seq: int = 0
    #: the model that answered, when it is a fallback of the one asked (config `fallbacks`).
    model: str | None = None


class ChatResult(BaseModel):
    job_id: str
    model: str
    text: str
    reasoning: str = ""
    #: the calls the model made (finish_reason "tool_calls").
    tool_calls: list[ToolCall] = Field(default_factory=list)
    #: OpenAI's `logprobs.content`: one entry per token, when asked.
    logprobs: list[dict[str, Any]] = Field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)
    worker: str | None = None


class EmbeddingResult(BaseModel):
    job_id: str
    model: str
    vectors: list[list[float]]
    usage: Usage = Field(default_factory=Usage)
    worker: str | None = None


class RerankItem(BaseModel):
    """One document's place in a reranking: its index in the input and its score."""

    index: int
    relevance_score: float
    #: the document's text, when asked for.
    document: str | None = None


class RerankResult(BaseModel):
    job_id: str
    model: str
    #: the documents by falling relevance (the `top_n` best when asked).
    results: list[RerankItem]
    usage: Usage = Field(default_factory=Usage)
    worker: str | None = None


def pack_vectors(vectors: Sequence[Sequence[float]] | np.ndarray) -> tuple[str, int]:
    """Vectors (rows of floats, or a 2-D array) → (base64 of little-endian float32 rows, width)."""
    rows = np.asarray(vectors, dtype="<f4")
    dims = int(rows.shape[1]) if rows.ndim == 2 else 0
    return base64.b64encode(rows.tobytes()).decode("ascii"), dims


def vector_rows(data: str, dims: int) -> np.ndarray:
    """The inverse of pack_vectors: a 2-D float32 array (no rows when `dims` is 0)."""
    if not dims:
        return np.empty((0, 0), dtype="<f4")
    return np.frombuffer(base64.b64decode(data), dtype="<f4").reshape(-1, dims)


def unpack_vectors(data: str, dims: int) -> list[list[float]]:
    """The inverse of pack_vectors, as lists of floats."""
    rows: list[list[float]] = vector_rows(data, dims).tolist()
    return rows
