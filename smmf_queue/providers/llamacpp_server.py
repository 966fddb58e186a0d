"""DB-GPT's `llama.cpp.server` provider: the worker runs llama-cpp-python's OpenAI-compatible
server on the model's GGUF file as its child process, and talks to it as `proxy/openai` does.

Where `llama.cpp` runs the engine inside the worker, this keeps it in its own process (the
server's own batching and threads; a crash of the engine is not a crash of the worker). The
child listens on 127.0.0.1 only, with a key made for it at start, and dies with its worker
(Linux's parent-death signal; a clean stop terminates it). Same keys as DB-GPT's and
llama.cpp's where they overlap: `n_ctx`, `n_gpu_layers`, `n_threads`, `n_batch`, `chat_format`,
`startup_timeout` (seconds to wait for the server, 120).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ProviderUnavailable
from ..jobs import ChatRequest, Usage
from ..tool_calls import FragmentCleaner
from .base import ChatChunk
from .llamacpp import DEFAULT_N_CTX, auto_tools, json_schema_as_grammar_format, shown_tool_results
from .openai_api import OpenAIProvider, retryable

log = logging.getLogger("smmf_queue.providers.llamacpp_server")

#: the server's options that a model entry passes on, by our key.
SERVER_OPTIONS = ("n_gpu_layers", "n_threads", "n_batch", "chat_format")
DEFAULT_STARTUP_TIMEOUT_S = 120.0


class LlamaCppServerProvider(OpenAIProvider):
    """A GGUF model served by a `llama_cpp.server` child of the worker."""

    def check_hardware(self) -> None:
        if not Path(self._path()).is_file():
            raise ProviderUnavailable(f"model '{self.model.name}': path '{self._path()}' is not a "
                                      "GGUF file", model=self.model.name)

    def hardware(self) -> str:
        return "llama.cpp server (child process)"

    def load(self) -> None:
        self._key = secrets.token_urlsafe(24)
        self._url, self._server = _start_server(self.server_args(), self._key, self.model.name,
                                                float(self.model.options.get(
                                                    "startup_timeout", DEFAULT_STARTUP_TIMEOUT_S)))
        super().load()

    def server_args(self) -> list[str]:
        """`python -m llama_cpp.server` arguments from the model entry (no port, no key)."""
        options = self.model.options
        args = ["--model", self._path(), "--model_alias", self.model.upstream_name,
                "--n_ctx", str(int(self.model.context_length or options.get("n_ctx", DEFAULT_N_CTX)))]
        for key in SERVER_OPTIONS:
            if key in options:
                args += [f"--{key}", str(options[key])]
        if self.model.kind == "embedding":
            args += ["--embedding", "true"]
        if options.get("logits_all"):
            args += ["--logits_all", "true"]
        return args

    def _api_key(self) -> str:
        return getattr(self, "_key", "not-started")

    def _base_url(self) -> str:
        return getattr(self, "_url", "http://127.0.0.1:0/v1")

    def chat_kwargs(self, request: ChatRequest) -> dict[str, Any]:
        """As for any OpenAI-compatible API, but a JSON schema response format in the form the
        server takes (its JSON mode with a schema, sampled under a grammar), and tool results
        as its function-calling template can show them (llamacpp.shown_tool_results)."""
        kwargs = super().chat_kwargs(request)
        if "messages" in kwargs:
            kwargs["messages"] = shown_tool_results(kwargs["messages"], self.model.options.get("chat_format"))
        if "response_format" in kwargs:
            kwargs["response_format"] = json_schema_as_grammar_format(kwargs["response_format"])
        return kwargs

    def stream_chat(self, request: ChatRequest) -> Iterator[ChatChunk]:
        """Streamed, except where the model picks between text and tool calls: the server
        answers that choice only whole (llama-cpp-python cannot stream it)."""
        kwargs = self.chat_kwargs(request)
        if not auto_tools(kwargs):
            return super().stream_chat(request)
        return self._whole(kwargs)

    def _whole(self, kwargs: dict[str, Any]) -> Iterator[ChatChunk]:
        kwargs = {**kwargs, "stream": False}
        kwargs.pop("stream_options", None)
        reply = self.retry.call(lambda: self.client.chat.completions.create(**kwargs), retryable)
        choice = reply.choices[0]
        calls = [{"index": i, **call.model_dump()} for i, call in enumerate(choice.message.tool_calls or [])]
        yield ChatChunk(text=choice.message.content or "",
                        tool_calls=FragmentCleaner().from_openai(calls))
        usage = reply.usage
        yield ChatChunk(finish_reason=choice.finish_reason or "stop", usage=Usage(
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens) if usage else None)

    def _path(self) -> str:
        return self.model.path or self.model.upstream_name


def _start_server(args: list[str], key: str, name: str,
                  timeout_s: float) -> tuple[str, subprocess.Popen[bytes]]:
    """Start the server on a free local port; its base URL once it answers. (`--api_key=KEY`
    in one argument: a key that begins with "-" would read as an option.)"""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", *args, "--host", "127.0.0.1", "--port", str(port),
         f"--api_key={key}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent)
    atexit.register(_stop, server)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout_s
    while not _answers(url, key):
        if server.poll() is not None:
            error = (server.stderr.read() if server.stderr else b"").decode(errors="replace")
            raise ProviderUnavailable(f"model '{name}': llama_cpp.server exited with code "
                                      f"{server.returncode}: {error[-800:]}", model=name)
        if time.monotonic() > deadline:
            _stop(server)
            raise ProviderUnavailable(f"model '{name}': llama_cpp.server did not answer within "
                                      f"{timeout_s:.0f} s", model=name)
        time.sleep(0.2)
    log.info("model %s: llama_cpp.server (pid %d) serves at %s", name, server.pid, url)
    return url, server


def _answers(url: str, key: str) -> bool:
    request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=10)
        if server.poll() is None:
            server.kill()


def _die_with_parent() -> None:
    """In the child, before exec: be sent SIGTERM when the worker dies, however it dies
    (prctl PR_SET_PDEATHSIG, Linux); elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
