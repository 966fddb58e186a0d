"""Loading a TOML config into typed settings.

The `[models]` part follows DB-GPT's schema, so a DB-GPT model section works unchanged:
`default_llm`, `default_embedding`, `default_reranker`, `[[models.llms]]`, `[[models.embeddings]]`,
`[[models.rerankers]]`. Our own
sections are `[queue]` (where jobs, streams and results live), `[worker]`, `[gateway]` and
`[flower]`;
they refuse unknown keys (a typo names its key), while a model entry only warns on keys it does
not know (DB-GPT ignores them silently). Every other top-level section is DB-GPT's and ignored.

Any string value may use `${env:VAR}`, `${env:VAR:-default}` and `${pkg:module}` (the folder of
an installed Python package, e.g. the packaged all-MiniLM-L6-v2).
"""

from __future__ import annotations

import importlib.util
import os
import re
import tomllib
import warnings
from pathlib import Path
from typing import Any, Literal, TypeVar

import platformdirs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError, UnknownModel, WrongModelKind, validation_message
from .providers import PROVIDERS, honoured, known_providers, suggest_provider

#: The config used when none is given: offline, embedded Redis, local models.
DEFAULT_CONFIG = Path("configs/local.toml")
#: the prefix of the environment variables that set our sections' keys (`_FromEnvironment`).
ENV_PREFIX = "SMMF_"
#: the environment variable naming a config file, for every command and the SDK.
CONFIG_ENV = "SMMF_CONFIG"
#: what `smmf-queue init` writes, and the first place looked in.
STARTER_CONFIG = Path("smmf.toml")


def user_config() -> Path:
    """The config in the user's config folder (~/.config/smmf-queue/smmf.toml on Linux)."""
    return platformdirs.user_config_path("smmf-queue") / "smmf.toml"


def find_config(given: str | os.PathLike[str] | None = None) -> tuple[Path, str]:
    """The config file to read, and where its name came from: `given` (`-c`), else
    $SMMF_CONFIG, else the first that exists of ./smmf.toml, configs/local.toml (a checkout of
    this repository) and the user's config folder. ConfigError naming each place if none does."""
    if given is not None:
        return Path(given), "from -c"
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]), f"from ${CONFIG_ENV}"
    places = [STARTER_CONFIG, DEFAULT_CONFIG, user_config()]
    for place in places:
        if place.is_file():
            return place, f"the first found of {', '.join(str(p) for p in places)}"
    raise ConfigError(f"no config file: none given (-c or {CONFIG_ENV}) and none at "
                      f"{', '.join(str(p) for p in places)}; `smmf-queue init` writes a starter {STARTER_CONFIG}")

ModelKind = Literal["llm", "embedding", "reranker"]
_SECTION_OF_KIND: dict[ModelKind, str] = {"llm": "llms", "embedding": "embeddings",
                                          "reranker": "rerankers"}
#: DB-GPT's key naming each kind's default model.
_DEFAULT_KEY: dict[ModelKind, str] = {"llm": "default_llm", "embedding": "default_embedding",
                                      "reranker": "default_reranker"}
_PLACEHOLDER = re.compile(r"\$\{(env|pkg):([^}:]+)(?::-([^}]*))?\}")
#: the key of a value inside one model entry (`models.llms[0].api_key`).
_MODEL_ENTRY = re.compile(r"models\.(llms|embeddings|rerankers)\[\d+\]\.")


class ConfigWarning(UserWarning):
    """Warned when a config has keys that smmf-queue does not use (they are ignored)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueueSettings(_Strict):
    """Where jobs, streams, the registry and results live."""

    #: Celery broker; `redis://` or `amqp://` (then streams and results stay on `redis_url`).
    broker_url: str = "redis://127.0.0.1:6379/0"
    #: Redis for streams, job records and the worker registry; defaults to a Redis broker_url.
    redis_url: str | None = None
    #: Celery result backend; defaults to redis_url.
    result_backend: str | None = None
    #: `smmf-queue up` starts a private redis-server on broker_url's port when true.
    embedded_redis: bool = False
    #: data folder of the embedded Redis, relative to the working directory.
    embedded_redis_dir: str = ".smmf/redis"
    #: when the embedded Redis fsyncs its append-only file: "everysec" (a killed redis-server
    #: loses the jobs accepted in its last second or two) or "always" (none; slower accepts).
    embedded_redis_fsync: Literal["everysec", "always"] = "everysec"
    #: how long a caller waits for a job's result by default, seconds.
    job_timeout_s: float = Field(default=600.0, gt=0)
    #: how long a job's events stay replayable after its last event, seconds.
    event_ttl_s: int = Field(default=600, gt=0)
    #: most events kept per job for replay (deltas are coalesced, so this is rarely reached).
    event_log_max: int = Field(default=10_000, gt=0)
    #: how long results stay in the result backend, seconds; a job's record (its state, which
    #: keeps a late delivery of a finished job from running it again) as long after its
    #: last lease renewal.
    result_ttl_s: int = Field(default=3600, gt=0)
    #: kombu's visibility timeout on a TLS Redis (`rediss://`) only, whose transport is
    #: kombu's own: there nothing renews the lease of a message a worker holds, so a dead
    #: worker's job comes back after this, and a job may run this long without being handed
    #: back. On `redis://` and `sentinel://` the lease is `worker.lease_s`, renewed by each
    #: heartbeat (celery_ext.renew_held_messages).
    visibility_timeout_s: int = Field(default=3600, gt=0)
    #: default for callers: fail at once with NoLiveWorker instead of waiting in the queue.
    fail_fast: bool = False
    #: how long a dead letter (a job that kept killing its workers) is kept, seconds.
    dead_letter_ttl_s: int = Field(default=7 * 24 * 3600, gt=0)
    #: with `sentinel://` URLs (Redis Sentinel): the name of the master the sentinels watch.
    sentinel_master: str | None = None
    #: seconds a Redis command (or a connect) may wait before its client gives up: a Redis that
    #: went silent without closing its connections (a frozen host, a partition, a failover's
    #: lost master) is then an outage, answered like one, not a hang; a worker checks its
    #: waiting connections (kombu's BRPOP and pub/sub) this often. At least 3: longer than the
    #: blocking reads we send (streaming.QUIET_CHECK_S).
    socket_timeout_s: float = Field(default=5.0, ge=3.0)

    @model_validator(mode="after")
    def _sentinel_needs_a_master(self) -> QueueSettings:
        urls = [self.broker_url, self.redis_url or "", self.result_backend or ""]
        if any(url.startswith("sentinel://") for url in urls) and not self.sentinel_master:
            raise ValueError("a sentinel:// URL needs queue.sentinel_master, the name of the "
                             "master the sentinels watch")
        return self

    @property
    def redis(self) -> str:
        """The Redis URL for streams, records and the registry."""
        if self.redis_url:
            return self.redis_url
        if self.broker_url.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
            return self.broker_url
        raise ConfigError("queue.redis_url is required when queue.broker_url is not a Redis URL")

    @property
    def results(self) -> str:
        """The Celery result backend URL."""
        return self.result_backend or self.redis


class WorkerSettings(_Strict):
    """How model-pinned workers report liveness and guard against crash loops."""

    #: seconds between heartbeats.
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    #: seconds a heartbeat stays valid; a dead worker disappears after this.
    heartbeat_ttl_s: float = Field(default=6.0, gt=0)
    #: deliveries of one job before it is failed as a worker killer.
    max_attempts: int = Field(default=3, ge=1)
    #: seconds the lease of a job a worker holds lasts without renewal (renewed with each
    #: heartbeat); a job whose worker died goes back on its queue once it expires, at the next
    #: restore by a live worker (celery_ext.renew_held_messages). The same on every worker.
    lease_s: float = Field(default=10.0, gt=0)
    #: seconds a stopping worker (SIGTERM) lets its running jobs finish; then it gives up their
    #: leases, so that another worker runs them again at once, and exits.
    shutdown_grace_s: float = Field(default=30.0, ge=0)


class GatewaySettings(_Strict):
    """The OpenAI-compatible HTTP gateway."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    #: bearer keys clients must send; empty means no authentication.
    api_keys: list[SecretStr] = Field(default_factory=list)
    #: the admin key of virtual keys (`/key/*` routes); SMMF_MASTER_KEY if unset. With one,
    #: keys made through it (`sk-...`, kept hashed in Redis) are accepted too.
    master_key: SecretStr | None = None
    #: largest request body accepted, bytes (413 above it).
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    #: with no live worker for a model: false answers 503 at once, true queues and waits.
    wait_for_worker: bool = False
    #: seconds a streamed reply whose HTTP client left keeps running, for a reconnect with
    #: `Last-Event-ID` to resume it; 0 cancels the job as soon as its client leaves.
    resume_grace_s: float = Field(default=5.0, ge=0)
    #: seconds a stopping gateway (SIGTERM) lets open requests finish; streams still open then
    #: are cut, and their clients may resume them on another replica.
    shutdown_grace_s: int = Field(default=10, ge=1)
    #: seconds between SSE comment lines sent while a streamed job waits for a worker: the
    #: response starts at once, and a proxy's idle timeout never cuts a queued request.
    keepalive_s: float = Field(default=15.0, gt=0)
    #: most choices (`n`) one chat request may ask for: each is a job of its own.
    max_n: int = Field(default=16, ge=1, le=128)


class FlowerSettings(_Strict):
    """Flower, Celery's monitoring UI, run by `smmf-queue flower`."""

    host: str = "127.0.0.1"
    port: int = Field(default=5555, ge=0, le=65535)
    #: "user:password" pairs for HTTP basic auth; empty means no authentication.
    basic_auth: list[SecretStr] = Field(default_factory=list)


class UsageSettings(_Strict):
    """Usage accounting beyond Redis' counters (usage_ledger.py)."""

    #: PostgreSQL to keep a row per job the gateway ran (`postgresql://user@host/db`); none: no
    #: ledger. The gateway needs the `ledger` extra (asyncpg) for it.
    database_url: SecretStr | None = None


#: our own sections, by their table's name.
SECTIONS: dict[str, type[_Strict]] = {"queue": QueueSettings, "worker": WorkerSettings,
                                       "gateway": GatewaySettings, "flower": FlowerSettings,
                                       "usage": UsageSettings}


class AccountSettings(_Strict):
    """An upstream account (one API key at one provider) that several models call: its limits
    hold across every worker calling it, each upstream call counted (upstream_accounts.py)."""

    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)


class ModelConfig(BaseModel):
    """One `[[models.llms]]`, `[[models.embeddings]]` or `[[models.rerankers]]` entry, as DB-GPT
    writes it.

    Provider-specific keys (e.g. `n_gpu_layers`) are kept in `options`.
    """

    model_config = ConfigDict(extra="allow")

    name: str
    provider: str
    kind: ModelKind = "llm"
    #: the upstream model name; defaults to `name`.
    backend: str | None = None
    path: str | None = None
    device: str | None = None
    api_key: SecretStr | None = None
    api_base: str | None = None
    #: DB-GPT's key for an embeddings or rerank endpoint URL.
    api_url: str | None = None
    #: jobs one worker runs at once for this model; None picks by provider.
    concurrency: int | None = Field(default=None, ge=1)
    context_length: int | None = Field(default=None, ge=1)
    verbose: bool = False
    prompt_template: str | None = None
    #: embedding models with concurrency > 1: merge concurrent jobs into one forward pass.
    dynamic_batching: bool = True
    #: how long the first job of a merged pass waits for others, milliseconds.
    batch_wait_ms: float = Field(default=2.0, ge=0)
    #: most texts in one merged forward pass.
    max_batch_texts: int = Field(default=256, ge=1)
    #: most jobs its queue may hold (all lanes): past it a new job is refused at once
    #: (QueueFull; 429 from the gateway) instead of filling Redis; None: no bound.
    max_queue_depth: int | None = Field(default=None, ge=1)
    #: drop request fields this model cannot honour (e.g. `tools`) instead of refusing the
    #: request with a 400 (LiteLLM's name for it; see chat_fields.py).
    drop_params: bool = False
    #: LLMs to send a chat to, in order, when this one cannot take it: no live worker, a full
    #: queue, or a failure before the first token (client.py). LiteLLM's name.
    fallbacks: list[str] = Field(default_factory=list)
    #: requests and tokens per minute for this model across every producer and worker
    #: (model_limits.py); past either, RateLimited / 429. LiteLLM's names.
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    #: the `[accounts.<name>]` this API proxy calls: its rpm and tpm, and a 429's cool-down,
    #: are shared with every model on the same account. None: the endpoint and key alone name
    #: the account (its cool-down is still shared; it has no limits).
    account: str | None = None

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        if value not in known_providers():
            raise ValueError(
                f"unknown provider '{value}'.{suggest_provider(value)} "
                f"Known providers: {', '.join(known_providers())}"
            )
        return value

    @property
    def supports(self) -> frozenset[str]:
        """OpenAI chat fields beyond the common sampling ones that it honours (providers.honoured)."""
        return honoured(self.provider, self.options)

    def unresolved(self) -> list[str]:
        """What this entry's `${env:...}` and `${pkg:...}` lack here (left as written when it
        was loaded: config._resolve); a worker serving the model refuses to start with them."""
        problems = []
        for key, value in self.model_dump().items():
            text = value.get_secret_value() if isinstance(value, SecretStr) else value
            if isinstance(text, str):
                problems += [f"key '{key}': {problem}" for match in _PLACEHOLDER.finditer(text)
                             if (problem := _unresolvable(match))]
        return problems

    @property
    def upstream_name(self) -> str:
        """The model name the engine or API knows it by."""
        return self.backend or self.name

    @property
    def slots(self) -> int:
        """Jobs a worker runs at once: `concurrency`, else the provider's default (ProviderSpec)."""
        return self.concurrency or PROVIDERS[self.provider].default_slots

    @property
    def options(self) -> dict[str, Any]:
        """Provider-specific keys from the entry."""
        return dict(self.model_extra or {})


class SmmfConfig(BaseModel):
    """A whole config file: the models and our own sections."""

    source: Path
    default_llm: str | None = None
    default_embedding: str | None = None
    default_reranker: str | None = None
    llms: list[ModelConfig] = Field(default_factory=list)
    embeddings: list[ModelConfig] = Field(default_factory=list)
    rerankers: list[ModelConfig] = Field(default_factory=list)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    flower: FlowerSettings = Field(default_factory=FlowerSettings)
    usage: UsageSettings = Field(default_factory=UsageSettings)
    #: upstream accounts by name, with the limits every model on one shares.
    accounts: dict[str, AccountSettings] = Field(default_factory=dict)
    #: where each of our sections' keys that is not a default came from ("file" or "$VAR").
    origins: dict[str, str] = Field(default_factory=dict, exclude=True)

    @property
    def models(self) -> list[ModelConfig]:
        """Every configured model, LLMs first, then embedding models, then rerankers."""
        return [*self.llms, *self.embeddings, *self.rerankers]

    def default_model(self, kind: ModelKind) -> str | None:
        """`default_llm`, `default_embedding` or `default_reranker`, else the first model of
        `kind`; None if none."""
        default: str | None = getattr(self, _DEFAULT_KEY[kind])
        return default or next((m.name for m in self.models if m.kind == kind), None)

    def model(self, name: str, kind: ModelKind | None = None) -> ModelConfig:
        """The model called `name`; with `kind`, one of that kind (else WrongModelKind)."""
        candidates = [m for m in self.models if m.name == name]
        if not candidates:
            known = ", ".join(m.name for m in self.models) or "none"
            raise UnknownModel(f"unknown model '{name}' (configured: {known})", model=name)
        for model in candidates:
            if kind is None or model.kind == kind:
                return model
        raise WrongModelKind(
            f"model '{name}' is an {candidates[0].kind} model, not an {kind} model", model=name
        )


def load_config(path: str | os.PathLike[str] | None = None) -> SmmfConfig:
    """Read, interpolate and validate a config file (`path`, else as find_config looks);
    ConfigError names file, key and what was expected."""
    source, _ = find_config(path)
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    raw = _interpolate(raw, source, "")
    return _build(raw, source)


def _build(raw: dict[str, Any], source: Path) -> SmmfConfig:
    models = raw.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f"{source}: key 'models': expected a table, got {type(models).__name__}")
    for ignored in sorted(set(models) - {*_SECTION_OF_KIND.values(), *_DEFAULT_KEY.values()}):
        warnings.warn(f"{source}: models.{ignored} is not served by smmf-queue; ignored",
                      ConfigWarning, stacklevel=3)
    entries = {kind: _model_entries(models, kind, source) for kind in _SECTION_OF_KIND}
    from_env = _environment()
    config = SmmfConfig(
        source=source,
        **{key: models.get(key) for key in _DEFAULT_KEY.values()},
        llms=entries["llm"],
        embeddings=entries["embedding"],
        rerankers=entries["reranker"],
        **{name: _section(cls, raw, name, source, overrides=from_env.get(name, {}))
           for name, cls in SECTIONS.items()},
        accounts=_accounts(raw, source),
        origins=_origins(raw, from_env),
    )
    _check_defaults(config)
    _check_fallbacks(config)
    _check_accounts(config)
    _check_timings(config)
    return config


_S = TypeVar("_S", bound=_Strict)


def _section(cls: type[_S], raw: dict[str, Any], name: str, source: Path, prefix: str = "",
             overrides: dict[str, Any] | None = None) -> _S:
    """One of our own sections, the file's keys and then the environment's (`overrides`); its
    keys are named `section.key` (or `prefix` + key) in errors."""
    prefix = prefix or f"{name}."
    values = raw.get(name, {})
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: key '{prefix.rstrip('.')}': expected a table, got {type(values).__name__}")
    try:
        return cls(**{**values, **(overrides or {})})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, "", prefix=prefix)) from None


class _FromEnvironment(BaseSettings):
    """Our sections' keys set in the environment, `SMMF_<SECTION>__<KEY>` (SMMF_QUEUE__BROKER_URL;
    lists and tables as JSON), read by pydantic-settings; they win over the file's."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore")

    queue: QueueSettings | None = None
    worker: WorkerSettings | None = None
    gateway: GatewaySettings | None = None
    flower: FlowerSettings | None = None
    usage: UsageSettings | None = None


def _environment() -> dict[str, dict[str, Any]]:
    """The keys of our sections the environment sets, by section; ConfigError naming the
    variable for one that is not a setting or not valid."""
    try:
        return _FromEnvironment().model_dump(exclude_unset=True)
    except ValidationError as exc:
        names = ", ".join(_env_name(*map(str, error["loc"][:2])) for error in exc.errors())
        raise ConfigError(f"{_describe(exc, 'environment', '')} (set by {names})") from None


def _env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}__{key.upper()}"


def _origins(raw: dict[str, Any], from_env: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Where each key of our sections that is not a default came from: the file or a variable."""
    origins = {f"{name}.{key}": "file" for name in SECTIONS
               if isinstance(raw.get(name), dict) for key in raw[name]}
    for name, keys in from_env.items():
        origins |= {f"{name}.{key}": f"${_env_name(name, key)}" for key in keys}
    return origins


def _accounts(raw: dict[str, Any], source: Path) -> dict[str, AccountSettings]:
    """`[accounts.<name>]` tables; keys named `accounts.<name>.key` in errors."""
    tables = raw.get("accounts", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: key 'accounts': expected a table of [accounts.<name>] tables, "
                          f"got {type(tables).__name__}")
    return {name: _section(AccountSettings, tables, name, source, prefix=f"accounts.{name}.")
            for name in tables}


def _model_entries(models: dict[str, Any], kind: ModelKind, source: Path) -> list[ModelConfig]:
    section = _SECTION_OF_KIND[kind]
    items = models.get(section, [])
    if not isinstance(items, list):
        raise ConfigError(f"{source}: key 'models.{section}': expected an array of tables "
                          f"([[models.{section}]]), got {type(items).__name__}")
    built: list[ModelConfig] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        where = f"models.{section}[{index}]"
        if isinstance(item, dict) and "name" in item:
            where += f" (model '{item['name']}')"
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: {where}: expected a table, got {type(item).__name__}")
        try:
            model = ModelConfig(**item, kind=kind)
        except ValidationError as exc:
            raise ConfigError(_describe(exc, source, where)) from None
        if model.name in seen:
            raise ConfigError(f"{source}: {where}: key 'name': model '{model.name}' is defined twice")
        if kind not in PROVIDERS[model.provider].kinds:
            raise ConfigError(f"{source}: {where}: key 'provider': provider '{model.provider}' "
                              f"serves no {kind} models (only {', '.join(sorted(PROVIDERS[model.provider].kinds))})")
        seen.add(model.name)
        _warn_unknown_keys(model, source, where)
        built.append(model)
    return built


def _warn_unknown_keys(model: ModelConfig, source: Path, where: str) -> None:
    unknown = sorted(set(model.options) - PROVIDERS[model.provider].keys)
    if unknown:
        warnings.warn(
            f"{source}: {where}: unknown keys for provider '{model.provider}' ignored: "
            f"{', '.join(unknown)}", ConfigWarning, stacklevel=4)


def _check_fallbacks(config: SmmfConfig) -> None:
    """Fallbacks name other configured LLMs. Embedding models and rerankers take none: another
    model's vectors or scores are not comparable with theirs."""
    llms = {m.name for m in config.llms}
    for model in config.models:
        where = f"{config.source}: model '{model.name}': key 'fallbacks'"
        if model.fallbacks and model.kind != "llm":
            raise ConfigError(f"{where}: only LLMs fall back (another {model.kind}'s vectors or "
                              "scores are not comparable with this one's)")
        for name in model.fallbacks:
            if name not in llms or name == model.name:
                raise ConfigError(f"{where}: expected the name of another configured LLM, got '{name}'")


def _check_accounts(config: SmmfConfig) -> None:
    """A model's account is a configured `[accounts.<name>]`, and only API proxies call one."""
    for model in config.models:
        if model.account is None:
            continue
        where = f"{config.source}: model '{model.name}': key 'account'"
        if not PROVIDERS[model.provider].calls_an_api:
            raise ConfigError(f"{where}: only API proxies call an upstream account "
                              f"('{model.provider}' runs the model itself)")
        if model.account not in config.accounts:
            known = ", ".join(sorted(config.accounts)) or "none"
            raise ConfigError(f"{where}: expected the name of an [accounts.<name>] table, got "
                              f"'{model.account}' (configured: {known})")


def _check_timings(config: SmmfConfig) -> None:
    """Times that only work together: each heartbeat renews the leases and the registry entry
    of its worker, so one late heartbeat must not hand a running job to another worker or hide
    a live worker; and a job's record, kept `result_ttl_s` after its last renewal, must outlive
    its lease."""
    worker, beat = config.worker, config.worker.heartbeat_interval_s
    for key, value in (("lease_s", worker.lease_s), ("heartbeat_ttl_s", worker.heartbeat_ttl_s)):
        if value < 2 * beat:
            raise ConfigError(f"{config.source}: key 'worker.{key}': expected at least twice "
                              f"worker.heartbeat_interval_s ({beat:g} s), which renews it (got {value:g})")
    if config.queue.result_ttl_s <= worker.lease_s:
        raise ConfigError(f"{config.source}: key 'queue.result_ttl_s': expected more than "
                          f"worker.lease_s ({worker.lease_s:g} s): a job's record must outlive its "
                          f"lease (got {config.queue.result_ttl_s})")


def _check_defaults(config: SmmfConfig) -> None:
    for kind, key in _DEFAULT_KEY.items():
        name = getattr(config, key)
        if name and not any(m.name == name and m.kind == kind for m in config.models):
            raise ConfigError(f"{config.source}: key 'models.{key}': expected the name of a "
                              f"configured {kind} model, got '{name}'")


def _describe(exc: ValidationError, source: Path | str, where: str, prefix: str = "") -> str:
    """Turn pydantic's errors into one line per problem, naming file, entry and key."""
    lines = []
    for error in exc.errors():
        key = prefix + (".".join(str(part) for part in error["loc"]) or "?")
        message = validation_message(error)
        if error["type"] == "extra_forbidden":
            message = "unknown key (not a setting of this section)"
        elif error["type"] == "missing":
            message = "required key is missing"
        else:
            message = f"expected: {message} (got {error['input']!r})"
        entry = f"{where}: " if where else ""
        lines.append(f"{source}: {entry}key '{key}': {message}")
    return "\n".join(lines)


def _interpolate(value: Any, source: Path, key: str) -> Any:
    """Replace ${env:...} and ${pkg:...} in every string, recursively; `key` names where we are."""
    if isinstance(value, dict):
        return {k: _interpolate(v, source, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda match: _resolve(match, source, key), value)
    return value


def _resolve(match: re.Match[str], source: Path, key: str) -> str:
    """A placeholder's value. One that cannot be resolved here is a ConfigError, except in a
    model entry: there it stays as written, for only a worker serving that model needs it
    (a gateway need not hold a provider's key or an engine's package), and that worker
    refuses to start, naming it (ModelConfig.unresolved)."""
    problem = _unresolvable(match)
    if problem is None:
        return _value(match)
    if _MODEL_ENTRY.match(key):
        return match.group(0)
    raise ConfigError(f"{source}: key '{key}': {problem}")


def _unresolvable(match: re.Match[str]) -> str | None:
    """Why a placeholder has no value here, or None."""
    scheme, name, default = match.group(1), match.group(2), match.group(3)
    if scheme == "env":
        if name in os.environ or default is not None:
            return None
        return f"environment variable {name} is not set (write ${{env:{name}:-default}} to give a default)"
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return f"Python package '{name}' is not installed"
    return None


def _value(match: re.Match[str]) -> str:
    scheme, name, default = match.group(1), match.group(2), match.group(3)
    if scheme == "env":
        return os.environ.get(name, default or "")
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations  # _unresolvable said so
    return str(Path(next(iter(spec.submodule_search_locations))))
