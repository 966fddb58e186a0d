"""The admin API of virtual keys (virtual_keys.py) at LiteLLM's paths and with its field names,
so its users' scripts keep working: `/key/generate`, `/key/info`, `/key/list`, `/key/update`,
`/key/delete`; and `/usage`, by key and model. Only the master key may call them (the gateway's guard checks it); they exist
only where one is configured (`[gateway] master_key` or SMMF_MASTER_KEY).

The routes are plain functions: FastAPI runs them in its thread pool, on the synchronous Redis
client the command line's `smmf-queue keys` uses too.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from .errors import RequestError
from .virtual_keys import DURATION_PATTERN, KeySpec, KeyStore


class KeyUpdate(KeySpec):
    """`/key/update`: the key, and the fields to change."""

    key: str


class KeyDelete(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(default_factory=list)
    key_aliases: list[str] = Field(default_factory=list)


def admin_router(store: KeyStore) -> APIRouter:
    router = APIRouter(tags=["keys"])

    @router.get("/usage")
    def usage(key: str | None = None,
              since: str = Query("1d", json_schema_extra={"pattern": DURATION_PATTERN})) -> dict[str, Any]:
        """Requests, tokens and failures by key and model over the UTC days `since` ("7d")
        reaches back into; one key's (by key, token or alias) or every key's."""
        try:
            rows = store.usage(key, since)
        except ValueError as exc:  # not a duration
            raise RequestError(f"since: {exc}") from None
        return {"since": since, "data": rows}

    @router.post("/key/generate")
    def generate(spec: KeySpec) -> dict[str, Any]:
        """A new key: the answer is the only time the key itself is shown."""
        return store.generate(spec)

    @router.get("/key/info")
    def info(key: str) -> dict[str, Any]:
        """A key's record and usage, by the key or its token (the key's SHA-256)."""
        return {"key": key, "info": store.info(key)}

    @router.get("/key/list")
    def list_keys(return_full_object: bool = False) -> dict[str, Any]:
        """Every key's token, or its whole record with `return_full_object=true`."""
        records = store.records()
        return {"keys": records if return_full_object else [r["token"] for r in records],
                "total_count": len(records)}

    @router.post("/key/update")
    def update(body: KeyUpdate) -> dict[str, Any]:
        changes = body.model_dump(exclude_unset=True, exclude={"key"})
        return store.update(body.key, changes)

    @router.post("/key/delete")
    def delete(body: KeyDelete) -> dict[str, Any]:
        """Revoke keys (by key, token or alias): every replica refuses them from the next request."""
        return {"deleted_keys": store.delete(body.keys, body.key_aliases)}

    return router
