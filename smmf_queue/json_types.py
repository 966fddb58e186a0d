"""Request bodies whose numbers and booleans are JSON's own.

pydantic's lax mode lets a request's 5.0 stand for 5 (JSON Schema's integers include it), but
it also takes `true` and "5" for numbers and 1 for `true`: a client's slip would get a one-token
reply, or a stream it did not ask for, instead of a 400 that names the field. A before-validator
on the model, not annotated types, so that the OpenAPI document keeps each field's bounds.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationInfo, field_validator


class JsonBody(BaseModel):
    """A request body: a field that takes numbers refuses booleans and strings, and one that
    takes only booleans refuses anything else."""

    @field_validator("*", mode="before")
    @classmethod
    def _json_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        takes = _scalars_taken(cls, str(info.field_name))
        if "number" in takes and "bool" not in takes and isinstance(value, bool):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        if "number" in takes and "str" not in takes and isinstance(value, str):
            raise ValueError("expected a number, got a string")
        if takes <= {"bool", "null"} and "bool" in takes and value is not None and not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value


@functools.cache
def _scalars_taken(model: type[BaseModel], field: str) -> frozenset[str]:
    """The JSON scalars a field's type takes at its top level ("other" for anything else);
    worked out once per field (a request's validation is on the gateway's hot path)."""
    annotation = model.model_fields[field].annotation
    union = get_origin(annotation) in (Union, types.UnionType)
    return frozenset(_scalar(option) for option in (get_args(annotation) if union else (annotation,)))


def _scalar(option: Any) -> str:
    if option is bool:
        return "bool"
    if option in (int, float):
        return "number"
    if option is str:
        return "str"
    return "null" if option is type(None) else "other"
