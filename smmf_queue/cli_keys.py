"""`smmf-queue keys ...`: the virtual keys' admin API (gateway_keys.py) from the command line,
straight on Redis (whoever can reach the broker administers its keys; no master key needed)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.table import Table

from . import redis_clients
from .cli import ConfigOption, JsonOption, _fail, _load, _redis_errors, console
from .errors import SmmfError
from .virtual_keys import KeySpec, KeyStore

keys_app = typer.Typer(help="Virtual keys for the gateway: make, show, change and revoke them.",
                       no_args_is_help=True)

Alias = Annotated[str | None, typer.Option("--alias", help="A unique name for the key.")]
Models = Annotated[list[str] | None, typer.Option("--model", help="A model (or pattern: 'team-*') it may call; repeat. Default: all.")]
Rpm = Annotated[int | None, typer.Option("--rpm", help="Requests per minute.")]
Tpm = Annotated[int | None, typer.Option("--tpm", help="Tokens per minute.")]
Budget = Annotated[int | None, typer.Option("--budget", help="Tokens per budget period.")]
BudgetDuration = Annotated[str | None, typer.Option("--budget-duration", help="The budget's period: 30d, 12h, 1mo...")]
Duration = Annotated[str | None, typer.Option("--duration", help="How long the key lives: 30d, 12h...")]
Metadata = Annotated[str | None, typer.Option("--metadata", help="A JSON object kept with the key.")]


@contextmanager
def _store(config: Any) -> Iterator[KeyStore]:
    """The key store on the config's Redis; a refusal or an unreachable Redis exits with why."""
    loaded = _load(config)
    with _redis_errors(loaded):
        try:
            yield KeyStore(redis_clients.connect(loaded.queue, socket_connect_timeout=2))
        except SmmfError as exc:
            _fail(exc.message)


#: the option that sets each KeySpec field.
_OPTION = {"key_alias": "--alias", "models": "--model", "rpm_limit": "--rpm", "tpm_limit": "--tpm",
           "token_budget": "--budget", "budget_duration": "--budget-duration", "duration": "--duration",
           "metadata": "--metadata"}


def _spec(alias: str | None, models: list[str] | None, rpm: int | None, tpm: int | None,
          budget: int | None, budget_duration: str | None, duration: str | None,
          metadata: str | None) -> dict[str, Any]:
    """The options given, as KeySpec fields (validated; exits with the reason)."""
    given: dict[str, Any] = {"key_alias": alias, "models": models, "rpm_limit": rpm, "tpm_limit": tpm,
                             "token_budget": budget, "budget_duration": budget_duration,
                             "duration": duration}
    if metadata is not None:
        try:
            given["metadata"] = json.loads(metadata)
        except json.JSONDecodeError as exc:
            _fail(f"--metadata: not JSON ({exc})")
    fields = {name: value for name, value in given.items() if value is not None}
    try:
        KeySpec(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        _fail(f"{_OPTION.get(str(error['loc'][0]), error['loc'][0])}: {error['msg']}")
    return fields


def _show(record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps(record))
        return
    for name, value in record.items():
        console.print(f"[bold]{name}[/bold]: {value}", highlight=False)


@keys_app.command("generate")
def generate(config: ConfigOption = None, alias: Alias = None, models: Models = None,
             rpm: Rpm = None, tpm: Tpm = None, budget: Budget = None,
             budget_duration: BudgetDuration = None, duration: Duration = None,
             metadata: Metadata = None, as_json: JsonOption = False) -> None:
    """Make a key. It is printed once: only its hash is kept."""
    fields = _spec(alias, models, rpm, tpm, budget, budget_duration, duration, metadata)
    with _store(config) as store:
        record = store.generate(KeySpec(**fields))
    if not as_json:
        console.print(f"{record['key']}\n(shown once: keep it now)", highlight=False)
    _show(record if as_json else {k: v for k, v in record.items() if k != "key"}, as_json)


@keys_app.command("info")
def info(key: Annotated[str, typer.Argument(help="The key, its token, or its alias.")],
         config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show a key's limits and usage."""
    with _store(config) as store:
        _show(store.info(key), as_json)


@keys_app.command("list")
def list_keys(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List every key (never the keys themselves)."""
    with _store(config) as store:
        records = store.records()
    if as_json:
        console.print_json(json.dumps(records))
        return
    table = Table("alias", "key", "models", "rpm", "tpm", "budget", "expires", "requests", "tokens")
    for r in records:
        usage = r["usage"]
        table.add_row(r["key_alias"] or "", r["key_name"], ", ".join(r["models"]) or "all",
                      str(r["rpm_limit"] or ""), str(r["tpm_limit"] or ""), str(r["token_budget"] or ""),
                      r["expires"] or "never", str(usage["requests"]),
                      str(usage["prompt_tokens"] + usage["completion_tokens"]))
    console.print(table if records else "no keys")


@keys_app.command("update")
def update(key: Annotated[str, typer.Argument(help="The key, its token, or its alias.")],
           config: ConfigOption = None, alias: Alias = None, models: Models = None,
           rpm: Rpm = None, tpm: Tpm = None, budget: Budget = None,
           budget_duration: BudgetDuration = None, duration: Duration = None,
           metadata: Metadata = None, as_json: JsonOption = False) -> None:
    """Change the given limits of a key; every gateway applies them from its next request."""
    fields = _spec(alias, models, rpm, tpm, budget, budget_duration, duration, metadata)
    with _store(config) as store:
        _show(store.update(key, fields), as_json)


@keys_app.command("delete")
def delete(keys: Annotated[list[str] | None, typer.Argument(help="Keys (or tokens) to revoke.")] = None,
           config: ConfigOption = None,
           aliases: Annotated[list[str] | None, typer.Option("--alias", help="Revoke by alias; repeat.")] = None,
           as_json: JsonOption = False) -> None:
    """Revoke keys: every gateway refuses them from its next request."""
    if not keys and not aliases:
        _fail("name the keys to revoke, or give --alias")
    with _store(config) as store:
        tokens = store.delete(keys or [], aliases or [])
    if as_json:
        console.print_json(json.dumps({"deleted_keys": tokens}))
        return
    console.print(f"revoked {len(tokens)} key(s)")


def usage(config: ConfigOption = None,
          key: Annotated[str | None, typer.Option("--key", help="One key (the key, its token or alias); default: all.")] = None,
          since: Annotated[str, typer.Option(help="How far back, in whole UTC days: 1d, 7d, 30d...")] = "1d",
          as_json: JsonOption = False) -> None:
    """Requests, tokens and failures through the gateway by virtual key and model."""
    with _store(config) as store:
        try:
            rows = store.usage(key, since)
        except ValueError as exc:
            _fail(f"--since: {exc}")
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("key", "model", "requests", "prompt tokens", "completion tokens", "failed")
    for row in rows:
        table.add_row(row["key_alias"] or row["token"][:12], row["model"], str(row["requests"]),
                      str(row["prompt_tokens"]), str(row["completion_tokens"]), str(row["failed"]))
    console.print(table if rows else f"no usage in the last {since}")
