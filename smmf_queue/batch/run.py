"""A resumable `smmf-queue embed-batch` run: from an input file to an output file.

While a run goes, `<output>.parts/` holds `manifest.json` (what the run is: input, model,
chunking, run id), one `.npy` file per committed chunk and `done.jsonl`, a line per committed
chunk, appended after its file is in place. `--resume` re-embeds only chunks without a line and
sends them under the same job ids, so a chunk that was in flight when the client died is not
run twice. The output is assembled from the parts at the end, so it is byte-identical to an
uninterrupted run's. Texts that could not be embedded are listed by id in
`<output>.errors.jsonl`.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..client import Client
from ..errors import RequestError
from ..jobs import new_job_id
from .chunks import ChunkResult
from .files import OUTPUT_FORMATS, InputSpec, OutputWriter, read_records, require_pyarrow
from .tokens import model_token_counter


@dataclass(frozen=True)
class Manifest:
    """What a run is; a resumed run must match it."""

    run_id: str
    model: str
    input: str
    input_size: int
    input_mtime_ns: int
    field: str
    id_field: str | None
    normalize: bool | None
    max_tokens: int
    max_texts: int
    #: how tokens were counted for the budget: "model" (its tokenizer) or "estimate"; a resumed
    #: run must count the same way, or its chunks would not line up.
    token_counting: str = "estimate"


class BatchParts:
    """The parts folder beside an output: the manifest, committed chunks, and the final assembly."""

    def __init__(self, output: Path):
        if output.suffix not in OUTPUT_FORMATS:
            raise RequestError(f"{output}: output must be one of {', '.join(OUTPUT_FORMATS)}")
        require_pyarrow(output)
        self.output = output
        self.folder = output.with_name(output.name + ".parts")
        self.errors_path = output.with_name(output.name + ".errors.jsonl")

    def start(self, manifest: Manifest, resume: bool) -> Manifest:
        """Begin a run, or with `resume` continue the one whose parts are here (same input)."""
        path = self.folder / "manifest.json"
        if resume and path.exists():
            previous = Manifest(**json.loads(path.read_text()))
            expected = {**asdict(manifest), "run_id": previous.run_id}
            if asdict(previous) != expected:
                changed = sorted(k for k in expected if expected[k] != asdict(previous)[k])
                raise RequestError(f"{self.output}: cannot resume: {', '.join(changed)} changed since "
                                   "the run began (run again without --resume to start over)")
            return previous
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        _write_atomically(path, json.dumps(asdict(manifest), indent=2).encode())
        return manifest

    def committed(self) -> dict[int, dict[str, Any]]:
        """Committed chunks by index (a torn last line from a crash is ignored)."""
        done: dict[int, dict[str, Any]] = {}
        path = self.folder / "done.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if (self.folder / _part_name(entry["index"])).exists():
                    done[entry["index"]] = entry
        return done

    def commit(self, result: ChunkResult) -> None:
        """Keep a chunk: its vectors first, then its line (so a line always has its file)."""
        buffer = self.folder / (_part_name(result.index) + ".partial")
        with buffer.open("wb") as file:
            np.save(file, np.ascontiguousarray(result.vectors, dtype="<f4"))
            file.flush()
            os.fsync(file.fileno())
        buffer.replace(self.folder / _part_name(result.index))
        entry = {"index": result.index, "start": result.start, "count": result.count,
                 "failures": {str(k): list(v) for k, v in result.failures.items()}}
        with (self.folder / "done.jsonl").open("a") as done:
            done.write(json.dumps(entry) + "\n")
            done.flush()
            os.fsync(done.fileno())

    def assemble(self, records: Iterator[tuple[str, str]]) -> tuple[int, int]:
        """Write the output and the errors file from the parts, then remove them.

        Returns (texts written, texts failed)."""
        done = self.committed()
        chunks = [done[i] for i in sorted(done)]
        total = sum(chunk["count"] for chunk in chunks)
        dims = next((width for width in (self._part(c, header_only=True).shape[1] for c in chunks)
                     if width), 0)
        failed = 0
        with OutputWriter(self.output, total, dims) as write, self.errors_path.open("w") as errors:
            for chunk in chunks:
                vectors = self._part(chunk)
                if vectors.shape[1] != dims:  # every text of the chunk failed
                    vectors = np.full((chunk["count"], dims), np.nan, dtype=np.float32)
                ids = [record_id for record_id, _ in itertools.islice(records, chunk["count"])]
                for offset, (error_type, message) in sorted((int(k), v) for k, v in chunk["failures"].items()):
                    errors.write(json.dumps({"id": ids[offset], "index": chunk["start"] + offset,
                                             "error_type": error_type, "message": message}) + "\n")
                    failed += 1
                write(chunk["start"], ids, vectors, {int(k) for k in chunk["failures"]})
        if not failed:
            self.errors_path.unlink()
        shutil.rmtree(self.folder)
        return total - failed, failed

    def _part(self, chunk: dict[str, Any], header_only: bool = False) -> np.ndarray:
        """A committed chunk's vectors; `header_only` maps the file instead of reading it."""
        return np.load(self.folder / _part_name(chunk["index"]), mmap_mode="r" if header_only else None)


def _part_name(index: int) -> str:
    return f"chunk-{index:08d}.npy"


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


def new_manifest(spec: InputSpec, model: str, normalize: bool | None, max_tokens: int,
                 max_texts: int, token_counting: str = "estimate") -> Manifest:
    stat = spec.path.stat()
    return Manifest(run_id=new_job_id(), model=model, input=str(spec.path.resolve()),
                    input_size=stat.st_size, input_mtime_ns=stat.st_mtime_ns, field=spec.field,
                    id_field=spec.id_field, normalize=normalize, max_tokens=max_tokens,
                    max_texts=max_texts, token_counting=token_counting)


@dataclass(frozen=True)
class BatchReport:
    embedded: int
    failed: int
    #: chunks a resumed run found committed and did not send again
    resumed_chunks: int
    seconds: float


def run_embed_batch(client: Client, model: str, spec: InputSpec, output: Path, *,
                    resume: bool = False, normalize: bool | None = None, max_tokens: int = 8192,
                    max_texts: int = 256, window: int = 8,
                    on_progress: Callable[[int], None] | None = None) -> BatchReport:
    """Embed every text of `spec` into `output`, committing chunk by chunk (see the module doc)."""
    started = time.perf_counter()
    count_tokens = model_token_counter(client.config.model(model, "embedding"))
    counting = "model" if count_tokens else "estimate"
    parts = BatchParts(output)
    manifest = parts.start(new_manifest(spec, model, normalize, max_tokens, max_texts, counting),
                           resume)
    done = parts.committed()
    if on_progress is not None:
        on_progress(sum(chunk["count"] for chunk in done.values()))
    texts = (text for _, text in read_records(spec))
    for result in client.embed_batch(model, texts, normalize=normalize, max_tokens=max_tokens,
                                     max_texts=max_texts, window=window, run_id=manifest.run_id,
                                     skip=done.__contains__, count_tokens=count_tokens):
        parts.commit(result)
        if on_progress is not None:
            on_progress(result.count)
    embedded, failed = parts.assemble(read_records(spec))
    return BatchReport(embedded, failed, len(done), time.perf_counter() - started)
