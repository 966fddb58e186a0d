"""Streamed tool calls: fragments as engines and APIs send them, put back together.

OpenAI streams a tool call as fragments of one `index`: the first carries the call's id and
function name, the rest pieces of its JSON arguments. Not every server keeps to that:
llama-cpp-python (and its server) repeat the id and name in every fragment, which a client that
concatenates the fragments' strings, as OpenAI's SDK does, turns into "get_weatherget_weather".
`FragmentCleaner` passes each call's id and name once; `merge` joins the fragments of one event;
`assemble` makes whole calls of all of them (the SDK's result and the gateway's whole reply).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .jobs import FunctionCall, ToolCall, ToolCallDelta


class FragmentCleaner:
    """Makes a provider's fragments OpenAI's: id and name in the first fragment of a call only."""

    def __init__(self) -> None:
        self._started: set[int] = set()

    def clean(self, index: int, call_id: str | None, name: str | None,
              arguments: str | None) -> ToolCallDelta:
        if index in self._started:
            return ToolCallDelta(index=index, arguments=arguments or "")
        self._started.add(index)
        return ToolCallDelta(index=index, id=call_id or f"call_{index}", name=name or "",
                             arguments=arguments or "")

    def from_openai(self, fragments: Iterable[dict[str, Any]]) -> list[ToolCallDelta]:
        """Fragments from a chat.completion.chunk's `delta.tool_calls`."""
        cleaned = []
        for position, fragment in enumerate(fragments):
            function = fragment.get("function") or {}
            cleaned.append(self.clean(int(fragment.get("index", position)), fragment.get("id"),
                                      function.get("name"), function.get("arguments")))
        return cleaned


def merge(fragments: Iterable[ToolCallDelta]) -> list[ToolCallDelta]:
    """Fewer fragments saying the same: a fragment that only continues the call before it is
    joined to it (the way read_ahead merges text that arrived during one round trip)."""
    merged: list[ToolCallDelta] = []
    for fragment in fragments:
        if merged and merged[-1].index == fragment.index and fragment.id is None:
            last = merged[-1]
            merged[-1] = last.model_copy(update={"arguments": last.arguments + fragment.arguments})
        else:
            merged.append(fragment)
    return merged


def assemble(fragments: Iterable[ToolCallDelta]) -> list[ToolCall]:
    """The whole calls that the fragments make, by index."""
    calls: dict[int, ToolCall] = {}
    for fragment in fragments:
        call = calls.get(fragment.index)
        if call is None:
            calls[fragment.index] = ToolCall(id=fragment.id or f"call_{fragment.index}", function=FunctionCall(
                name=fragment.name or "", arguments=fragment.arguments))
        else:
            call.function.arguments += fragment.arguments
    return [calls[index] for index in sorted(calls)]


def openai_fragments(fragments: Iterable[ToolCallDelta]) -> list[dict[str, Any]]:
    """Fragments in the shape of OpenAI's `delta.tool_calls`."""
    shaped = []
    for fragment in fragments:
        function: dict[str, Any] = {"arguments": fragment.arguments}
        item: dict[str, Any] = {"index": fragment.index}
        if fragment.id is not None:
            item.update(id=fragment.id, type="function")
            function = {"name": fragment.name or "", **function}
        item["function"] = function
        shaped.append(item)
    return shaped
