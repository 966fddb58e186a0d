"""The request bodies the gateway takes: OpenAI's chat, completions and embeddings requests,
and the rerank request of Cohere and Jina. Every field a client may send is declared (so the
OpenAPI document lists it); chat_fields.py decides which reach a model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import RequestError
from .jobs import MAX_STOPS, SEED_MAX, ToolCall
from .json_types import JsonBody


class _ContentPart(BaseModel):
    """One part of a message's content: text, an image by URL (http(s) or `data:`), or another
    kind that chat_fields.py refuses."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: dict[str, Any] | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[_ContentPart] | None = None
    name: str | None = None
    #: an assistant turn's tool calls, sent back with the `tool` messages that answer them.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def wire(self) -> dict[str, Any]:
        """The message as the SDK takes it (chat_fields.shape_messages makes it the wire's)."""
        return self.model_dump(include={"role", "content", "name", "tool_calls", "tool_call_id"},
                               exclude_none=True)


class _Function(JsonBody):
    """A function tool; keys beyond OpenAI's are passed on, as with every field of a tool or a
    response format (a vendor's extension reaches its API: nothing is dropped unsaid)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    #: a JSON schema of the arguments.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: _Function


class _NamedTool(BaseModel):
    type: Literal["function"]
    function: dict[str, str]


class _JsonSchema(JsonBody):
    model_config = ConfigDict(extra="allow")
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class _ResponseFormat(BaseModel):
    """`json_object` may carry a `schema` too (llama.cpp's extension of JSON mode)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None


#: what ChatCompletionRequest.fields() leaves out: not fields of the job.
_NOT_JOB_FIELDS = {"model", "messages", "stream", "stream_options", "max_completion_tokens"}


class ChatCompletionRequest(JsonBody):
    """OpenAI's chat completion request: the fields a model honours reach it, the others are
    refused or dropped (chat_fields.py); unknown extra fields are ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[_Message] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    tools: list[_Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | _NamedTool | None = None
    parallel_tool_calls: bool | None = None
    response_format: _ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1)
    user: str | None = None

    def fields(self) -> dict[str, Any]:
        """The fields it sets besides the model and messages, by the SDK's names."""
        fields = self.model_dump(exclude_unset=True, exclude=_NOT_JOB_FIELDS, by_alias=True)
        fields = {name: value for name, value in fields.items() if name in type(self).model_fields}
        if isinstance(self.stop, str):
            fields["stop"] = [self.stop]
        if self.max_completion_tokens is not None:
            fields["max_tokens"] = self.max_completion_tokens
        return {name: value for name, value in fields.items() if value is not None}


#: what the completions API refuses whatever the model: its logprobs (another shape than a chat's).
COMPLETION_REFUSES = frozenset({"logprobs"})


class CompletionRequest(JsonBody):
    """OpenAI's completions request: a prompt continued as it is, with no chat template."""

    model_config = ConfigDict(extra="allow")
    model: str
    #: one prompt (several would be several choices: refused by the length check).
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    #: OpenAI's default for this API is 16.
    max_tokens: int | None = Field(default=16, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    #: the prompt, then the completion, in the reply's text.
    echo: bool = False
    #: OpenAI's is a number; false is taken too, as for a chat (both are refused but when idle).
    logprobs: int | bool | None = Field(default=None, ge=0, le=5)
    n: int = Field(default=1, ge=1)
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def fields(self) -> dict[str, Any]:
        """The fields it sets besides the model and prompt, by the SDK's names."""
        fields = self.model_dump(exclude={"model", "prompt", "stream", "stream_options", "echo"})
        fields = {name: value for name, value in fields.items()
                  if name in type(self).model_fields and value is not None}
        if isinstance(self.stop, str):
            fields["stop"] = [self.stop]
        return fields


#: the most texts one embeddings request may carry (OpenAI's limit).
MAX_EMBEDDING_INPUTS = 2048


class EmbeddingsRequest(JsonBody):
    """OpenAI's embeddings request. `input` as token ids (LangChain's OpenAIEmbeddings sends
    them by default, counted with tiktoken's encodings, not the served model's) is refused
    with a 400 that says how to send text instead."""

    model_config = ConfigDict(extra="allow")
    model: str
    #: at most MAX_EMBEDDING_INPUTS texts, as OpenAI's API (a corpus goes through `embed-batch`).
    input: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
            | Annotated[list[int], Field(min_length=1)] | Annotated[list[list[int]], Field(min_length=1)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _not_too_many(cls, value: Any) -> Any:
        """Said plainly (the union's own first error would be "should be a valid string")."""
        if isinstance(value, list) and len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} texts per request, got {len(value)} "
                             "(a corpus: `smmf-queue embed-batch` or the SDK's embed_batch)")
        return value

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(item, str) for item in self.input):
            return self.input  # type: ignore[return-value]
        raise RequestError(
            "input: token ids are not taken: smmf-queue cannot know which tokenizer made them "
            "(LangChain's OpenAIEmbeddings counts with tiktoken whatever the model); send text "
            "(LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False))", model=self.model)


class _Document(BaseModel):
    text: str


class RerankRequest(JsonBody):
    """The rerank request of Cohere and Jina, as vLLM and Xinference serve it."""

    model_config = ConfigDict(extra="allow")
    model: str
    query: str
    #: (more than jobs.MAX_RERANK_DOCUMENTS is a 400 from the SDK's check)
    documents: list[str | _Document] = Field(min_length=1)
    #: only the best n (all when unset).
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]
