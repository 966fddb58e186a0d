"""The `smmf-queue` command: parses arguments and calls the library. Each command's docstring is its help."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib.metadata
import json
import math
import os
import signal
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import redis
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import chat_fields, dead_letters, keys, logs, redis_clients, registry, starter
from .client import Client, queued_jobs
from .config import (
    CONFIG_ENV,
    SECTIONS,
    STARTER_CONFIG,
    ModelConfig,
    ModelKind,
    SmmfConfig,
    find_config,
    load_config,
)
from .errors import SmmfError
from .providers import PROVIDERS, ProviderSpec, missing_extra
from .starter import PROXIES

app = typer.Typer(help="Many LLM, embedding and reranker models behind one interface, on per-model queues.",
                  no_args_is_help=True, add_completion=False)
console = Console()
errors = Console(stderr=True)

ConfigOption = Annotated[Path | None, typer.Option(
    "--config", "-c", show_default=False,
    help=f"Config file (TOML); default: ${CONFIG_ENV}, else the first of ./smmf.toml, configs/local.toml "
         "and the user config folder.")]
#: `embed-batch`'s exit code when some texts could not be embedded (the rest were): neither
#: success (0), nor a failed run (1), nor Click's code for a usage error (2).
PARTIAL_FAILURE = 3


class LogLevel(str, enum.Enum):
    """The log levels `--loglevel` accepts (any case)."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


ModelOption = Annotated[str | None, typer.Option("--model", "-m", help="Model name; default: the config's default.")]


def _fail(message: str) -> NoReturn:
    errors.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


def _model_name(loaded: SmmfConfig, model: str | None, kind: ModelKind) -> str:
    """The model a command was asked for, else the config's default of `kind` (or exit)."""
    name = model or loaded.default_model(kind)
    if name is None:
        what = {"llm": "LLM", "embedding": "embedding model", "reranker": "reranker"}[kind]
        _fail(f"{loaded.source} configures no {what}")
    return name


def _load(path: Path | None) -> SmmfConfig:
    """The config a command runs on; which file it is, and why, goes to stderr."""
    try:
        source, why = find_config(path)
        loaded = load_config(source)
    except SmmfError as exc:
        _fail(exc.message)
    errors.print(f"[dim]config: {escape(str(source))} ({why})[/dim]", highlight=False, soft_wrap=True)
    return loaded


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    errors.print(f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True)


warnings.showwarning = _show_warning  # type: ignore[assignment]


def _print_version(value: bool) -> None:
    if value:
        console.print(f"smmf-queue {importlib.metadata.version('smmf-queue')}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the version and exit.")] = False,
         log_format: Annotated[logs.LogFormat, typer.Option(
             envvar=logs.LOG_FORMAT_ENV, case_sensitive=False,
             help="Logs as text, or one JSON object per line (workers, gateway, and what `up` starts).")]
         = logs.LogFormat.TEXT) -> None:
    """Many LLM, embedding and reranker models behind one interface, on per-model queues."""
    if log_format is logs.LogFormat.JSON:  # for this process and the ones it starts
        os.environ[logs.LOG_FORMAT_ENV] = log_format.value


@app.command()
def init(proxy: Annotated[str | None, typer.Option(
             help=f"Write a config for an API provider instead: {', '.join(PROXIES)}.")] = None,
         output: Annotated[Path, typer.Option("--output", "-o", help="Where to write it.")] = STARTER_CONFIG,
         force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False) -> None:
    """Write a commented starter config: offline by default (the packaged all-MiniLM-L6-v2
    embedding model and a tiny random-weight chat model, made here), or --proxy's."""
    if proxy is not None and proxy not in PROXIES:
        _fail(f"--proxy: expected one of {', '.join(PROXIES)}, got '{proxy}'")
    if output.exists() and not force:
        _fail(f"{output} exists; --force overwrites it")
    if proxy is None:
        if missing_extra("hf"):
            _fail("the offline starter runs hf models: pip install 'smmf-queue[hf]' (or use --proxy)")
        made = starter.make_offline_models(output.parent)
        console.print(f"made the tiny chat model in {made}", highlight=False)
    output.write_text(starter.proxy_config(proxy) if proxy else starter.offline_config(), encoding="utf-8")
    console.print(f"wrote {output}; start it with: smmf-queue up --demo"
                  + ("" if output == STARTER_CONFIG else f" -c {output}"), highlight=False)


@app.command()
def config(config: ConfigOption = None,
           origins: Annotated[bool, typer.Option(
               "--origins", help="List our sections' keys, their values and where each came from: the "
                                 "file, an SMMF_<SECTION>__<KEY> variable, or the default.")] = False,
           as_json: Annotated[bool, typer.Option("--json", help="With --origins: JSON rows.")] = False) -> None:
    """Validate a config file and print it resolved, with secrets masked."""
    loaded = _load(config)
    dumped = loaded.model_dump(mode="json")
    if not origins:
        console.print_json(json.dumps(dumped))
        return
    rows = [{"key": f"{section}.{key}", "value": value, "from": loaded.origins.get(f"{section}.{key}", "default")}
            for section in SECTIONS for key, value in dumped[section].items()]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("key", "value", "from")
    for row in rows:
        table.add_row(row["key"], escape(json.dumps(row["value"])), row["from"])
    console.print(table)


@app.command()
def worker(models: Annotated[list[str], typer.Option("--model", "-m", help="Model to serve (repeatable).")],
           config: ConfigOption = None,
           loglevel: Annotated[LogLevel, typer.Option(case_sensitive=False, help="Log level.")] = LogLevel.INFO,
           metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port.")] = None) -> None:
    """Serve one or more models: load them once, consume only their queues."""
    from .worker import run_worker

    logs.configure(loglevel.value)
    loaded = _load(config)
    try:
        run_worker(loaded, models, loglevel=loglevel.value, metrics_port=metrics_port)
    except SmmfError as exc:
        _fail(exc.message)


@app.command()
def models(config: ConfigOption = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print JSON rows.")] = False) -> None:
    """List configured models, their live workers and queue depth."""
    loaded = _load(config)
    client = _redis(loaded)
    with _redis_errors(loaded):
        workers = registry.live_workers(client)
        broker_is_redis = loaded.queue.broker_url == loaded.queue.redis
        rows = [_model_row(m, workers, queued_jobs(client, m.kind, m.name) if broker_is_redis else None)
                for m in loaded.models]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("model", "kind", "provider", "queue", "live", "busy", "queued")
    for column in table.columns:
        column.overflow = "fold"
    for row in rows:
        table.add_row(row["model"], row["kind"], row["provider"], row["queue"],
                      str(row["live_workers"]), str(row["in_flight"]),
                      "n/a" if row["queued"] is None else str(row["queued"]))
    console.print(table)
    for w in workers:
        console.print(f"worker {w.worker_id} (pid {w.pid} on {w.host}, {w.hardware}): "
                      f"{', '.join(m.name for m in w.models)}", highlight=False, soft_wrap=True)


def _model_row(model: ModelConfig, workers: list[registry.WorkerInfo],
               depth: int | None) -> dict[str, Any]:
    serving = registry.serving(workers, model.kind, model.name)
    return {"model": model.name, "kind": model.kind, "provider": model.provider,
            "queue": keys.queue_name(model.kind, model.name), "live_workers": len(serving),
            "in_flight": sum(w.in_flight for w in serving), "queued": depth,
            "workers": [f"{w.worker_id} [{w.hardware}]" for w in serving]}


jobs_app = typer.Typer(help="Dead letters: jobs that kept killing their workers.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _redis(loaded: SmmfConfig) -> redis.Redis:
    return redis_clients.connect(loaded.queue, socket_connect_timeout=2)


@jobs_app.command("list")
def jobs_list(config: ConfigOption = None, as_json: JsonOption = False,
              limit: Annotated[int, typer.Option(help="Most letters to list, newest first.")] = 100) -> None:
    """List dead letters (no prompt text: sizes only)."""
    loaded = _load(config)
    with _redis_errors(loaded):
        rows = [dead_letters.summary(letter) for letter in dead_letters.listed(_redis(loaded), limit)]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("job", "queue", "size", "attempts", "error", "failed at")
    for row in rows:
        table.add_row(row["job_id"], row["queue"], row["size"], str(row["attempts"]),
                      f"{row['error_type']}: {row['error_message']}",
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["failed_at"])))
    console.print(table if rows else "no dead letters")


@jobs_app.command("show")
def jobs_show(job_id: Annotated[str, typer.Argument(help="The job's id.")],
              config: ConfigOption = None) -> None:
    """Print one dead letter as JSON, its request (prompt included) too."""
    loaded = _load(config)
    with _redis_errors(loaded):
        letter = dead_letters.get(_redis(loaded), job_id)
    if letter is None:
        _fail(f"no dead letter for job {job_id}")
    console.print_json(letter.model_dump_json())


@jobs_app.command("requeue")
def jobs_requeue(job_ids: Annotated[list[str], typer.Argument(help="Jobs to send again.")],
                 config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Send dead jobs again under their own ids, as new jobs (their letters are dropped)."""
    from .queues import JobSender, make_celery_app

    loaded = _load(config)
    client = _redis(loaded)
    with _redis_errors(loaded):
        letters = [dead_letters.get(client, job_id) for job_id in job_ids]
    missing = [job_id for job_id, letter in zip(job_ids, letters) if letter is None]
    if missing:
        _fail(f"no dead letter for job {', '.join(missing)}")
    sender = JobSender(make_celery_app(loaded, store_results=False))
    requeued: list[dict[str, str]] = []
    try:
        for letter in filter(None, letters):
            with _redis_errors(loaded):
                try:
                    dead_letters.requeue(client, sender, letter)
                except ValueError as exc:
                    _fail(str(exc))
            requeued.append({"job_id": letter.job_id, "queue": letter.queue})
            if not as_json:
                console.print(f"requeued {letter.job_id} on {letter.queue}", highlight=False)
    finally:
        sender.close()
    if as_json:
        console.print_json(json.dumps({"requeued": requeued}))


@jobs_app.command("purge")
def jobs_purge(job_ids: Annotated[list[str] | None, typer.Argument(help="Jobs to drop.")] = None,
               config: ConfigOption = None,
               purge_all: Annotated[bool, typer.Option("--all", help="Drop every dead letter.")] = False,
               as_json: JsonOption = False) -> None:
    """Drop dead letters: the ones named, or --all."""
    if purge_all == bool(job_ids):
        _fail("name the jobs to drop, or give --all (not both)")
    loaded = _load(config)
    client = _redis(loaded)
    with _redis_errors(loaded):
        targets = job_ids or [letter.job_id for letter in dead_letters.listed(client, limit=1_000_000)]
        dropped = dead_letters.forget(client, list(targets))
    if as_json:
        console.print_json(json.dumps({"dropped": dropped}))
        return
    console.print(f"dropped {dropped} dead letters")


@app.command()
def providers(as_json: JsonOption = False,
              fields: Annotated[bool, typer.Option(
                  "--fields", help="Print the field × provider table (Markdown) instead.")] = False,
              ) -> None:
    """List the providers a model entry may name: what each talks to, its extra, whether that
    extra is installed here, the kinds it serves, its default concurrency and the OpenAI chat
    fields it honours beyond sampling (others are refused, or dropped with drop_params)."""
    if fields:
        print(chat_fields.support_table(), end="")
        return
    rows = [_provider_row(spec) for spec in PROVIDERS.values()]
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("provider", "talks to", "extra", "installed", "kinds", "concurrency", "honours")
    table.columns[0].no_wrap = True
    for row in rows:
        table.add_row(row["provider"], row["talks_to"], row["extra"], "yes" if row["installed"] else "no",
                      ", ".join(row["kinds"]), str(row["default_concurrency"]),
                      ", ".join(row["supports"]) or "sampling only")
    console.print(table)


def _provider_row(spec: ProviderSpec) -> dict[str, Any]:
    return {"provider": spec.name, "talks_to": spec.talks_to, "extra": spec.extra,
            "installed": missing_extra(spec.name) is None, "kinds": sorted(spec.kinds),
            "default_concurrency": spec.default_slots, "keys": sorted(spec.keys),
            "supports": sorted(spec.supports)}


@contextlib.contextmanager
def _redis_errors(loaded: SmmfConfig) -> Iterator[None]:
    """Exit with a one-line reason when Redis cannot be reached."""
    try:
        yield
    except redis.RedisError as exc:
        _fail(f"cannot reach Redis at {loaded.queue.redis}: {exc}")


@app.command()
def chat(prompt: Annotated[str, typer.Argument(help="What to say.")],
         config: ConfigOption = None, model: ModelOption = None,
         system: Annotated[str | None, typer.Option(help="System message.")] = None,
         temperature: Annotated[float | None, typer.Option(help="Sampling temperature; 0 is greedy.")] = None,
         max_tokens: Annotated[int | None, typer.Option(help="Most tokens to generate.")] = None,
         seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print the whole reply as JSON (not streamed).")] = False,
         ) -> None:
    """Stream a reply in the terminal."""
    loaded = _load(config)
    name = _model_name(loaded, model, "llm")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    params = {k: v for k, v in {"temperature": temperature, "max_tokens": max_tokens,
                                "seed": seed}.items() if v is not None}
    with _client(loaded) as client:
        if as_json:
            result = _call(lambda: client.chat(name, messages, **params))
            console.print_json(result.model_dump_json())
            return
        _stream(client, name, messages, params)


@app.command()
def embed(texts: Annotated[list[str], typer.Argument(help="Texts to embed.")],
          config: ConfigOption = None, model: ModelOption = None,
          as_json: Annotated[bool, typer.Option("--json", help="Print the vectors as JSON.")] = False) -> None:
    """Print vectors, or with several texts their cosine similarities."""
    loaded = _load(config)
    name = _model_name(loaded, model, "embedding")
    with _client(loaded) as client:
        result = _call(lambda: client.embed(name, texts))
    if as_json:
        console.print_json(json.dumps(result.vectors))
        return
    _print_similarities(name, texts, result.vectors)


@app.command()
def rerank(query: Annotated[str, typer.Argument(help="What the documents are ranked against.")],
           documents: Annotated[list[str], typer.Argument(help="Documents to rank.")],
           config: ConfigOption = None, model: ModelOption = None,
           top_n: Annotated[int | None, typer.Option(help="Print only the best n.")] = None,
           as_json: JsonOption = False) -> None:
    """Print the documents by falling relevance to the query, with their scores."""
    loaded = _load(config)
    name = _model_name(loaded, model, "reranker")
    with _client(loaded) as client:
        result = _call(lambda: client.rerank(name, query, documents, top_n=top_n,
                                             return_documents=True))
    if as_json:
        console.print_json(result.model_dump_json(include={"results"}))
        return
    table = Table("rank", "score", "#", "document")
    for rank, item in enumerate(result.results, 1):
        table.add_row(str(rank), f"{item.relevance_score:.4f}", str(item.index), item.document or "")
    console.print(table)


@app.command("embed-batch")
def embed_batch(
        input: Annotated[Path, typer.Option("--input", "-i", help="Texts: .txt (a line each), .jsonl, .csv or .parquet.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Vectors: .npy, .jsonl or .parquet (id + vector).")],
        config: ConfigOption = None, model: ModelOption = None,
        field: Annotated[str, typer.Option("--field", "--column", help="The text's field (.jsonl) or column (.csv, .parquet).")] = "text",
        id_field: Annotated[str | None, typer.Option("--id-field", "--id-column", help="The id's field or column; default: the text's number from 0.")] = None,
        resume: Annotated[bool, typer.Option(help="Continue an interrupted run into the same output.")] = False,
        max_tokens: Annotated[int, typer.Option(help="Token budget of one chunk, counted by the model's tokenizer where its files are here, else estimated from the text's bytes.")] = 8192,
        max_texts: Annotated[int, typer.Option(help="Most texts in one chunk.")] = 256,
        window: Annotated[int, typer.Option(help="Chunks in flight at once.")] = 8,
        normalize: Annotated[bool | None, typer.Option("--normalize/--no-normalize", help="Unit-length vectors; default: the model's setting.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the run's report as JSON.")] = False,
) -> None:
    """Embed a file of texts through the model's queue, in chunks, resumably. Exits 3 when some
    texts could not be embedded (each is in OUTPUT.errors.jsonl; the others have vectors)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from .batch.files import InputSpec, count_records
    from .batch.run import run_embed_batch

    loaded = _load(config)
    name = _model_name(loaded, model, "embedding")
    spec = _call(lambda: InputSpec(input, field, id_field))
    total = _call(lambda: count_records(spec))
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[rate]:>8.0f} texts/s"), TimeRemainingColumn())
    with _client(loaded) as client, Progress(*columns, console=errors) as progress:
        task = progress.add_task(f"embedding with {name}", total=total, rate=0.0)
        started = time.perf_counter()

        def advance(count: int) -> None:
            progress.advance(task, count)
            elapsed = time.perf_counter() - started
            progress.update(task, rate=progress.tasks[0].completed / elapsed if elapsed > 0 else 0.0)

        report = _call(lambda: run_embed_batch(
            client, name, spec, output, resume=resume, normalize=normalize, max_tokens=max_tokens,
            max_texts=max_texts, window=window, on_progress=advance))
    failures = output.with_name(output.name + ".errors.jsonl")
    if as_json:
        console.print_json(json.dumps({**dataclasses.asdict(report), "output": str(output),
                                       "errors": str(failures) if report.failed else None}))
    else:
        console.print(f"{report.embedded} texts embedded into {output} in {report.seconds:.1f} s"
                      + (f" ({report.resumed_chunks} chunks kept from the interrupted run)" if report.resumed_chunks else ""))
        if report.failed:
            console.print(f"[yellow]{report.failed} texts could not be embedded: see {failures}[/yellow]")
    if report.failed:
        raise typer.Exit(code=PARTIAL_FAILURE)


@app.command()
def gateway(config: ConfigOption = None,
            host: Annotated[str | None, typer.Option(help="Address; default: gateway.host.")] = None,
            port: Annotated[int | None, typer.Option(help="Port; default: gateway.port.")] = None,
            loglevel: Annotated[LogLevel, typer.Option(
                case_sensitive=False, help="Log level; info logs a line per request.")] = LogLevel.WARNING,
            ) -> None:
    """Serve the OpenAI-compatible HTTP API over the queues."""
    from .gateway import serve

    serve(_load(config), host, port, loglevel.value)


@app.command()
def flower(config: ConfigOption = None) -> None:
    """Run Flower (Celery's monitoring UI) against the configured broker, with basic auth from config."""
    from .queues import run_flower

    loaded = _load(config)
    try:
        run_flower(loaded)
    except SmmfError as exc:
        _fail(exc.message)


@app.command()
def up(config: ConfigOption = None,
       demo: Annotated[bool, typer.Option(help="Send a chat and an embedding through the queues, then stop.")] = False,
       flower: Annotated[bool, typer.Option(help="Also run Flower.")] = False) -> None:
    """Run the standalone stack: embedded Redis (if configured), one worker per model, the gateway."""
    from .standalone import Stack

    loaded = _load(config)
    stack = Stack(loaded, flower=flower)
    _stop_on_signals()
    for name, reason in stack.skipped.items():
        console.print(f"[yellow]skipped[/yellow] {escape(f'{name}: {reason}')}", highlight=False)
    console.print(f"starting {len(stack.served)} workers for {loaded.source} …")
    started = time.monotonic()
    try:
        with stack:
            console.print(f"[green]ready[/green] in {time.monotonic() - started:.1f}s: "
                          f"redis {loaded.queue.redis}; OpenAI-compatible API {stack.gateway_url}/v1; "
                          f"logs in {stack.log_dir}/", highlight=False)
            if flower:
                console.print(f"Flower: http://{loaded.flower.host}:{loaded.flower.port}/",
                              highlight=False)
            if demo:
                _demo(loaded)
                _demo_gateway(stack.gateway_url, loaded)
                return
            console.print("serving; Ctrl-C stops everything")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        console.print("stopping …")
    except SmmfError as exc:
        _fail(exc.message)


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (docker stop, systemd, kill) both stop the whole stack, children first.

    Python's default for SIGTERM ends `up` at once and leaves its workers, gateway and Redis
    running; and a shell that starts `up` as a background job hands it SIGINT ignored, so Ctrl-C
    would do nothing. Both are set here.
    """
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)


def _demo(config: SmmfConfig) -> None:
    """One streamed chat and one embedding similarity, through the queues."""
    with _client(config) as client:
        llm = config.default_model("llm")
        if llm is not None:
            # Questions a 135 M-parameter model answers (the offline default's SmolLM2).
            prompt = "What is the capital of France? Answer in one sentence."
            console.print(f"\n[bold]chat[/bold] {llm} <- {prompt!r}")
            _stream(client, llm, [{"role": "user", "content": prompt}],
                    {"temperature": 0, "max_tokens": 48})
        name = config.default_model("embedding")
        if name is not None:
            texts = ["A worker pulls jobs from its model's queue.",
                     "Each model has its own queue that workers consume.",
                     "The cat sleeps in the afternoon sun."]
            console.print(f"\n[bold]embed[/bold] {name}")
            result = _call(lambda: client.embed(name, texts))
            _print_similarities(name, texts, result.vectors)


def _demo_gateway(url: str, config: SmmfConfig) -> None:
    """One chat through the OpenAI-compatible gateway, as any OpenAI client would send it."""
    model = config.default_model("llm")
    if model is None:
        return
    prompt = "What is the capital of Japan?"
    body = json.dumps({"model": model, "max_tokens": 48, "temperature": 0,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json"}
    if config.gateway.api_keys:
        headers["Authorization"] = f"Bearer {config.gateway.api_keys[0].get_secret_value()}"
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        reply = json.load(response)
    console.print(f"\n[bold]POST {url}/v1/chat/completions[/bold] ({model}) <- {prompt!r}")
    console.out(reply["choices"][0]["message"]["content"], highlight=False)
    console.print(f"[dim](finish_reason {reply['choices'][0]['finish_reason']}, "
                  f"usage {reply['usage']})[/dim]", highlight=False)


def _stream(client: Client, model: str, messages: list[dict[str, str]], params: dict[str, Any]) -> None:
    def run() -> None:
        started = time.perf_counter()
        first: float | None = None
        for delta in client.stream_chat(model, messages, **params):
            if delta.restart:
                console.print("\n[yellow](a worker was lost; the reply restarts)[/yellow]")
            first = first or time.perf_counter()
            console.out(delta.text, end="", highlight=False)
        ttft = f", first token after {(first - started) * 1000:.0f} ms" if first else ""
        console.print(f"\n[dim]({model}{ttft})[/dim]", highlight=False)

    _call(run)


def _print_similarities(model: str, texts: list[str], vectors: list[list[float]]) -> None:
    console.print(f"{len(vectors)} vectors of {len(vectors[0])} dimensions from {model}")
    if len(texts) == 1:
        console.print(f"[{', '.join(f'{x:.4f}' for x in vectors[0][:8])}, …]")
        return
    table = Table("cosine", *[f"#{i}" for i in range(len(texts))])
    for i, row in enumerate(vectors):
        table.add_row(f"#{i} {texts[i][:40]}", *[f"{_cosine(row, other):.3f}" for other in vectors])
    console.print(table)


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)) or 1.0)


def _client(config: SmmfConfig) -> Client:
    try:
        return Client(config)
    except SmmfError as exc:
        _fail(exc.message)


def _call(work: Any) -> Any:
    try:
        return work()
    except SmmfError as exc:
        _fail(exc.message)


# Command groups in modules of their own; they import this module's helpers, hence down here.
from .cli_keys import keys_app, usage  # noqa: E402

app.add_typer(keys_app, name="keys")
app.command("usage")(usage)
