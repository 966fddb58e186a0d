"""HuggingFace transformers: chat with the model's chat template and a streamer; embeddings;
reranking.

Embeddings use sentence-transformers when the folder is a sentence-transformers model (it has
`modules.json`), else mean pooling over the last hidden state. Rerankers are cross-encoders
run by sentence-transformers' `CrossEncoder`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from .. import hub
from ..errors import JobFailed, ProviderUnavailable
from ..jobs import ChatRequest, ToolCallDelta, Usage
from ..tool_parsers import HermesParser
from .base import ChatChunk, Embeddings, Provider, Reranked, StopFilter, drain, hand_over


def _lm_format_enforcer() -> Any:
    """lm-format-enforcer's transformers integration, imported when a request first asks for
    JSON. It imports PreTrainedTokenizerBase from where transformers before 5 kept it
    (transformers.tokenization_utils): that name is given back there first."""
    import transformers.tokenization_utils as old_home  # type: ignore[import-not-found]

    if not hasattr(old_home, "PreTrainedTokenizerBase"):
        old_home.PreTrainedTokenizerBase = transformers.PreTrainedTokenizerBase  # type: ignore[attr-defined]
    from lmformatenforcer.integrations import transformers as integration
    return integration


def _json_safe_tokens(data: Any) -> Any:
    """lm-format-enforcer's tokenizer data without the tokens that can break a JSON string: it
    lets any token without a quote, backslash or newline into a string, so a tab, another
    control character, or a piece of a UTF-8 character (decoded alone as U+FFFD) got in, and
    sampled replies failed json.loads (seen on the GPU). Spaces remain for JSON's whitespace;
    non-ASCII text comes from tokens that hold whole characters."""
    from lmformatenforcer import TokenEnforcerTokenizerData

    safe = [token for token in data.regular_tokens
            if "\ufffd" not in token[1] and not any(ord(char) < 0x20 for char in token[1])]
    return TokenEnforcerTokenizerData(safe, data.decoder, data.eos_token_id, data.use_bitmask, data.vocab_size)


class _HandOverStreamer(TextIteratorStreamer):
    """transformers' streamer for a job thread: after queueing text it yields the CPU, so the
    job thread publishes it now instead of after the next token (see base.hand_over). With a
    `_LogprobTap`, each generated token's logprob entry (OpenAI's shape) goes on the same queue,
    as a dict, when the token is sampled."""

    def __init__(self, tokenizer: Any, tap: _LogprobTap | None = None, **kwargs: Any):
        super().__init__(tokenizer, **kwargs)
        self.tap = tap
        self.specials = set(tokenizer.all_special_ids)

    def put(self, value: torch.Tensor) -> None:
        prompt = self.skip_prompt and self.next_tokens_are_prompt
        super().put(value)
        if self.tap is not None and not prompt:
            token_id = int(value.reshape(-1)[-1])
            entry = self.tap.entry(self.tokenizer, token_id)
            if token_id not in self.specials:
                self.text_queue.put(entry)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        super().on_finalized_text(text, stream_end)
        hand_over()


class _LogprobTap(transformers.LogitsProcessor):
    """A logits processor that changes nothing and keeps each step's log-probabilities (the
    model's own, before sampling settings) until the streamer learns which token was sampled."""

    def __init__(self, top: int):
        self.top = top
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.steps.append(torch.log_softmax(scores[0].float(), dim=-1))
        return scores

    def entry(self, tokenizer: Any, token_id: int) -> dict[str, Any]:
        """OpenAI's logprobs entry of the token sampled at the oldest step kept."""
        logprobs = self.steps.pop(0)
        best = torch.topk(logprobs, self.top) if self.top else None
        return {"token": tokenizer.decode([token_id]), "logprob": float(logprobs[token_id]),
                "bytes": None, "top_logprobs": [
                    {"token": tokenizer.decode([int(i)]), "logprob": float(v), "bytes": None}
                    for v, i in zip(best.values, best.indices)] if best is not None else []}


#: tokens generated when neither the request nor the config says.
DEFAULT_MAX_NEW_TOKENS = 256


class _StopWhen(StoppingCriteria):
    """Stops generation once an event is set (a stop string was seen, or the job was cancelled)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs: Any) -> bool:
        return self.event.is_set()


class _TokenTally(threading.local):
    """The attention-mask sums of the batches a sentence-transformers model was fed, per thread
    (each job thread counts its own call to encode)."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] = []


def _tally_tokens(sentence_model: Any) -> _TokenTally:
    """Count the tokens `encode` feeds the model from its own tokenization, with a hook on the
    first module: tokenizing the texts a second time to count them took 18% of the embedding
    time of a worker on a GPU (docs/performance-log.md). A module that takes no attention mask (a
    StaticEmbedding) gets the tokens of all texts in one flat `input_ids`."""
    tally = _TokenTally()

    def count(module: torch.nn.Module, args: tuple[dict[str, torch.Tensor], ...]) -> None:
        features = args[0]
        if "attention_mask" in features:
            tally.sums.append(features["attention_mask"].sum())
        elif "input_ids" in features:
            tally.sums.append(torch.tensor(features["input_ids"].numel()))

    sentence_model[0].register_forward_pre_hook(count)
    return tally


class HFProvider(Provider):
    """A transformers model on CPU or GPU."""

    #: the model's folder, once found (`_path`).
    _folder: str | None = None

    def check_hardware(self) -> None:
        device = self._device()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ProviderUnavailable(
                f"model '{self.model.name}' asks for device '{device}' but no CUDA device is "
                "visible to torch", model=self.model.name)
        if device == "mps" and not torch.backends.mps.is_available():
            raise ProviderUnavailable(f"model '{self.model.name}' asks for device 'mps' but "
                                      "Apple's Metal backend is not available", model=self.model.name)
        self._path()  # a missing folder or hub model refuses the worker before any loads

    def hardware(self) -> str:
        device = self._device()
        if device.startswith("cuda"):
            return f"{device} ({torch.cuda.get_device_name(0)})"
        return device

    def load(self) -> None:
        threads = self.model.options.get("num_threads")
        if threads:
            # Process-wide, which is right for a worker pinned to its models: a small model
            # gains nothing from intra-op threads that spin on the cores other work needs.
            torch.set_num_threads(int(threads))
        path = self._path()
        if self.model.kind == "embedding":
            self._load_embedder(path)
            return
        if self.model.kind == "reranker":
            from sentence_transformers import CrossEncoder
            max_length = self.model.options.get("max_length")
            self.cross_encoder = CrossEncoder(path, device=self._device(),
                                              max_length=int(max_length) if max_length else None,
                                              trust_remote_code=self._trust_remote_code())
            return
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=self._trust_remote_code())
        self._tokenizer_data: Any = None
        self._constraint_lock = threading.Lock()
        self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=self._dtype(),
                                                       trust_remote_code=self._trust_remote_code()
                                                       ).to(self._device())  # type: ignore[arg-type]
        # (the ignore: transformers types its decorated .to() as taking a model)
        self.lm.eval()
        if self.model.options.get("tool_parser") and "tools" not in str(self.tokenizer.chat_template):
            raise ProviderUnavailable(
                f"model '{self.model.name}' sets tool_parser but its chat template takes no tools "
                "(they would never reach the model); remove tool_parser", model=self.model.name)

    def _load_embedder(self, path: str) -> None:
        self.sentence_model: Any = None
        if (Path(path) / "modules.json").exists():
            from sentence_transformers import SentenceTransformer
            self.sentence_model = SentenceTransformer(path, device=self._device(),
                                                      trust_remote_code=self._trust_remote_code())
            self.tally = _tally_tokens(self.sentence_model)
            return
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=self._trust_remote_code())
        self.encoder = AutoModel.from_pretrained(path, dtype=self._dtype(),
                                                 trust_remote_code=self._trust_remote_code()
                                                 ).to(self._device())
        self.encoder.eval()

    def stream_chat(self, request: ChatRequest) -> Iterator[ChatChunk]:
        inputs = self._inputs(request)
        prompt_tokens = int(inputs["input_ids"].shape[-1])
        if prompt_tokens >= self._context_length():
            raise ValueError(f"prompt of {prompt_tokens} tokens does not fit the model's context "
                             f"length of {self._context_length()} tokens")
        stop_now = threading.Event()
        tap = _LogprobTap(request.top_logprobs or 0) if request.logprobs else None
        streamer = _HandOverStreamer(self.tokenizer, tap, skip_prompt=True, skip_special_tokens=True)
        kwargs = self._generation_kwargs(request, stop_now)
        if tap is not None:
            kwargs["logits_processor"] = transformers.LogitsProcessorList([tap])
        output: dict[str, Any] = {}

        def generate() -> None:
            try:
                with torch.inference_mode():
                    output["ids"] = self.lm.generate(**inputs, streamer=streamer, **kwargs)
            except BaseException as exc:  # re-raised in the job thread below
                output["error"] = exc
                streamer.end()

        thread = threading.Thread(target=generate, name=f"hf-generate-{request.job_id}", daemon=True)
        thread.start()
        stops = StopFilter(request.params.stop)
        calls = HermesParser() if self._takes_tools(request) else None
        try:
            for ready in drain(streamer.text_queue, streamer.stop_signal):
                piece = stops.feed("".join(item for item in ready if isinstance(item, str)))
                logprobs = [item for item in ready if isinstance(item, dict)]
                found: list[ToolCallDelta] = []
                if calls is not None:
                    piece, found = calls.feed(piece)
                if piece or logprobs or found:
                    yield ChatChunk(text=piece, logprobs=logprobs, tool_calls=found)
                if stops.stopped:
                    stop_now.set()
                    break
        finally:
            stop_now.set()
            thread.join()
        if "error" in output:
            raise output["error"]
        tail = stops.flush()
        if calls is not None:
            tail, found = calls.feed(tail)
            tail += calls.flush()
            if found:
                yield ChatChunk(tool_calls=found)
        if tail:
            yield ChatChunk(text=tail)
        completion = int(output["ids"].shape[-1]) - prompt_tokens
        finish = "stop" if stops.stopped or completion < kwargs["max_new_tokens"] else "length"
        if calls is not None and calls.calls:
            finish = "tool_calls"
        yield ChatChunk(finish_reason=finish, usage=Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion,
            total_tokens=prompt_tokens + completion))

    def _inputs(self, request: ChatRequest) -> Any:
        """The model's input: the messages (and tools) through its chat template, or a
        completion's prompt as it is."""
        if request.prompt is not None:
            return self.tokenizer(request.prompt, return_tensors="pt").to(self._device())
        tools: Any = request.tools if self._takes_tools(request) else None
        return self.tokenizer.apply_chat_template(
            [m.as_dict() for m in request.messages], tools=tools, add_generation_prompt=True,
            return_tensors="pt", return_dict=True).to(self._device())  # type: ignore[union-attr]

    def _takes_tools(self, request: ChatRequest) -> bool:
        """Whether the reply may call tools: the model may choose to (tool_choice "auto"); it
        cannot be made to, as nothing constrains what it writes (JobFailed for a forced call)."""
        if not request.tools or request.tool_choice == "none":
            return False
        if request.tool_choice not in (None, "auto"):
            raise JobFailed(f"model '{self.model.name}' (hf) cannot be made to call a tool; "
                            "send tool_choice \"auto\"", error_type="InvalidRequest",
                            model=self.model.name, job_id=request.job_id)
        return True

    def _generation_kwargs(self, request: ChatRequest, stop_now: threading.Event) -> dict[str, Any]:
        params = request.params
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_tokens or int(self.model.options.get(
                "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            "stopping_criteria": StoppingCriteriaList([_StopWhen(stop_now)]),
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        }
        if params.temperature == 0:
            kwargs["do_sample"] = False  # greedy: temperature 0 means deterministic
        else:
            kwargs["do_sample"] = True
            if params.temperature is not None:
                kwargs["temperature"] = params.temperature
            if params.top_p is not None:
                kwargs["top_p"] = params.top_p
        if params.seed is not None:
            transformers.set_seed(params.seed)
        if request.response_format is not None and request.prompt is None:
            kwargs["prefix_allowed_tokens_fn"] = self._json_constraint(request.response_format)
        return kwargs

    def _json_constraint(self, response_format: dict[str, Any]) -> Any:
        """lm-format-enforcer's filter of the tokens that keep the reply valid JSON (of the
        schema, when the format names one), for generate's `prefix_allowed_tokens_fn`. What
        it needs of the tokenizer is built once per worker (it decodes every token twice)."""
        lmfe = _lm_format_enforcer()
        with self._constraint_lock:
            if self._tokenizer_data is None:
                self._tokenizer_data = _json_safe_tokens(lmfe.build_token_enforcer_tokenizer_data(self.tokenizer))
        schema = ((response_format.get("json_schema") or {}).get("schema")
                  if response_format.get("type") == "json_schema" else response_format.get("schema"))
        from lmformatenforcer import JsonSchemaParser
        return lmfe.build_transformers_prefix_allowed_tokens_fn(self._tokenizer_data,
                                                                JsonSchemaParser(schema))

    def embed(self, texts: list[str], normalize: bool | None) -> Embeddings:
        normalize = self.wants_unit_vectors(normalize, default=True)
        batch_size = int(self.model.options.get("batch_size", 32))
        if self.sentence_model is not None:
            limit = self.sentence_model.max_seq_length or math.inf  # a static model has none
            if not self.model.options.get("truncate", True) and math.isfinite(limit):
                tokens = self.sentence_model.tokenizer(texts, truncation=False)["input_ids"]
                self._refuse_long_texts(tokens, int(limit))
            self.tally.sums = []
            # No progress bar: sentence-transformers draws one per call when its logger is at
            # INFO, as a worker's is, and wrote a tqdm line into the worker's log for every job.
            vectors = self.sentence_model.encode(texts, batch_size=batch_size,
                                                 normalize_embeddings=normalize,
                                                 convert_to_numpy=True, show_progress_bar=False)
            count = int(torch.stack(self.tally.sums).sum()) if self.tally.sums else 0
            return Embeddings(vectors, Usage(prompt_tokens=count, total_tokens=count))
        return self._mean_pool(texts, normalize, batch_size)

    def rerank(self, query: str, documents: list[str]) -> Reranked:
        """sentence-transformers' CrossEncoder scores (query, document) pairs, as DB-GPT's
        reranker does; usage counts the tokens of the pairs as the model reads them."""
        pairs = [(query, document) for document in documents]
        scores = self.cross_encoder.predict(pairs, batch_size=int(self.model.options.get("batch_size", 32)),
                                            show_progress_bar=False, convert_to_numpy=True)
        tokens = self.cross_encoder.tokenizer(pairs, truncation=True,
                                              max_length=self.cross_encoder.max_length)["input_ids"]
        count = sum(len(ids) for ids in tokens)
        return Reranked([float(score) for score in scores], Usage(prompt_tokens=count, total_tokens=count))

    @staticmethod
    def _refuse_long_texts(tokens: list[list[int]], limit: int) -> None:
        """With `truncate = false`, a text over the model's limit fails its job (not cut silently)."""
        long = [i for i, ids in enumerate(tokens) if len(ids) > limit]
        if long:
            raise ValueError(f"{len(long)} of {len(tokens)} texts are longer than the model's limit of "
                             f"{limit} tokens, and truncate = false")

    def _mean_pool(self, texts: list[str], normalize: bool, batch_size: int) -> Embeddings:
        vectors: list[list[float]] = []
        count = 0
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                   return_tensors="pt").to(self._device())
            with torch.inference_mode():
                hidden = self.encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            vectors.extend(pooled.float().cpu().tolist())
            count += int(batch["attention_mask"].sum())
        return Embeddings(vectors, Usage(prompt_tokens=count, total_tokens=count))

    def _context_length(self) -> int:
        """The config's context_length, else what the model was built for."""
        return self.model.context_length or int(
            getattr(self.lm.config, "max_position_embeddings", None) or 2**31)

    def _path(self) -> str:
        """The model's folder: `path` (else the name), or the cache folder of a hub id (hub.py)."""
        if self._folder is None:
            given = self.model.path or self.model.upstream_name
            if hub.is_hub_id(given):
                options = self.model.options
                given = str(hub.local_folder(self.model.name, given, offline=bool(options.get("offline")),
                                             revision=options.get("revision")))
            elif not Path(given).is_dir():
                raise ProviderUnavailable(f"model '{self.model.name}': path '{given}' is neither a "
                                          "folder nor a hub id (owner/name)", model=self.model.name)
            self._folder = given
        return self._folder

    def _device(self) -> str:
        device = self.model.device or "auto"
        if device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return device

    def _trust_remote_code(self) -> bool:
        """Run a model folder's own Python code only when the config says so."""
        return bool(self.model.options.get("trust_remote_code", False))

    def _dtype(self) -> Any:
        name = self.model.options.get("torch_dtype", "auto")
        return name if name == "auto" else getattr(torch, name)
