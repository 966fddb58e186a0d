"""Files in and out of `smmf-queue embed-batch`, and the manifest that lets a run resume.

Inputs: `.txt` (a text per line), `.jsonl` (a field), `.csv` (a column), `.parquet` (a column),
each read lazily. Outputs: `.npy` (float32 rows in input order; a text that failed is a NaN
row), `.jsonl` or `.parquet` (id + vector; a failed text has no row). Failed texts are listed by
id in `<output>.errors.jsonl`.

While a run goes, `<output>.parts/` holds `manifest.json` (what the run is: input, model,
chunking, run id), one `.npy` file per committed chunk and `done.jsonl`, a line per committed
chunk, appended after its file is in place. `--resume` re-embeds only chunks without a line and
sends them under the same job ids, so a chunk that was in flight when the client died is not
run twice. The output is assembled from the parts at the end, so it is byte-identical to an
uninterrupted run's.
"""

from __future__ import annotations

import csv
import importlib.util
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

from .batch import ChunkResult
from .client import Client
from .errors import RequestError
from .jobs import new_job_id

INPUT_FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
OUTPUT_FORMATS = (".npy", ".jsonl", ".parquet")


@dataclass(frozen=True)
class InputSpec:
    path: Path
    #: the text's field (.jsonl) or column (.csv, .parquet)
    field: str = "text"
    #: the id's field or column; None numbers texts from 0
    id_field: str | None = None

    def __post_init__(self) -> None:
        if self.path.suffix not in INPUT_FORMATS:
            raise RequestError(f"{self.path}: input must be one of {', '.join(INPUT_FORMATS)}")
        if not self.path.is_file():
            raise RequestError(f"{self.path}: input file not found")
        _require_pyarrow(self.path)


def read_records(spec: InputSpec) -> Iterator[tuple[str, str]]:
    """(id, text) for each input text, in order, reading lazily."""
    rows = _READERS[spec.path.suffix](spec)
    for number, (record_id, text) in enumerate(rows):
        yield (str(record_id) if record_id is not None else str(number)), text


def _read_txt(spec: InputSpec) -> Iterator[tuple[Any, str]]:
    with spec.path.open(encoding="utf-8") as lines:
        for line in lines:
            yield None, line.rstrip("\n").rstrip("\r")


def _read_jsonl(spec: InputSpec) -> Iterator[tuple[Any, str]]:
    with spec.path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if spec.field not in record:
                raise RequestError(f"{spec.path}:{number}: no field '{spec.field}' (use --field)")
            yield (record.get(spec.id_field) if spec.id_field else None), str(record[spec.field])


def _read_csv(spec: InputSpec) -> Iterator[tuple[Any, str]]:
    with spec.path.open(encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        if spec.field not in (reader.fieldnames or []):
            raise RequestError(f"{spec.path}: no column '{spec.field}' (columns: "
                               f"{', '.join(reader.fieldnames or [])}; use --field)")
        for row in reader:
            yield (row.get(spec.id_field) if spec.id_field else None), row[spec.field]


def _read_parquet(spec: InputSpec) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(spec.path)
    columns = [spec.field] + ([spec.id_field] if spec.id_field else [])
    if spec.field not in file.schema_arrow.names:
        raise RequestError(f"{spec.path}: no column '{spec.field}' (use --field)")
    for batch in file.iter_batches(columns=columns, batch_size=4096):
        texts = batch.column(spec.field).to_pylist()
        ids = batch.column(spec.id_field).to_pylist() if spec.id_field else [None] * len(texts)
        yield from zip(ids, (str(text) for text in texts))


_READERS: dict[str, Callable[[InputSpec], Iterator[tuple[Any, str]]]] = {
    ".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}


def count_records(spec: InputSpec) -> int:
    if spec.path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return int(pq.ParquetFile(spec.path).metadata.num_rows)
    return sum(1 for _ in read_records(spec))


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


class BatchParts:
    """The parts folder beside an output: the manifest, committed chunks, and the final assembly."""

    def __init__(self, output: Path):
        if output.suffix not in OUTPUT_FORMATS:
            raise RequestError(f"{output}: output must be one of {', '.join(OUTPUT_FORMATS)}")
        _require_pyarrow(output)
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
        dims = next((self._part(c).shape[1] for c in chunks if self._part(c).shape[1]), 0)
        failed = 0
        with _OutputWriter(self.output, total, dims) as write, self.errors_path.open("w") as errors:
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

    def _part(self, chunk: dict[str, Any]) -> np.ndarray:
        return np.load(self.folder / _part_name(chunk["index"]))


def _require_pyarrow(path: Path) -> None:
    if path.suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise RequestError(f"{path}: Parquet needs pyarrow: pip install 'smmf-queue[parquet]'")


def _part_name(index: int) -> str:
    return f"chunk-{index:08d}.npy"


def _write_atomically(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


Writer = Callable[[int, list[str], np.ndarray, set[int]], None]


class _OutputWriter:
    """A writer of output rows by format; the file appears whole at the end (write, then rename)."""

    def __init__(self, output: Path, total: int, dims: int):
        self.output = output
        self.partial = output.with_name(output.name + ".partial")
        self.total, self.dims = total, dims

    def __enter__(self) -> Writer:
        suffix = self.output.suffix
        if suffix == ".npy":
            self.matrix = np.lib.format.open_memmap(self.partial, mode="w+", dtype="<f4",
                                                    shape=(self.total, self.dims))
            return self._write_npy
        if suffix == ".jsonl":
            self.file = self.partial.open("w")
            return self._write_jsonl
        import pyarrow as pa
        import pyarrow.parquet as pq
        self.schema = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32()))])
        self.parquet = pq.ParquetWriter(self.partial, self.schema)
        return self._write_parquet

    def __exit__(self, *exc: object) -> None:
        if self.output.suffix == ".npy":
            self.matrix.flush()
            del self.matrix
        elif self.output.suffix == ".jsonl":
            self.file.close()
        else:
            self.parquet.close()
        if exc[0] is None:
            self.partial.replace(self.output)

    def _write_npy(self, start: int, ids: list[str], vectors: np.ndarray, failed: set[int]) -> None:
        self.matrix[start:start + len(ids)] = vectors

    def _write_jsonl(self, start: int, ids: list[str], vectors: np.ndarray, failed: set[int]) -> None:
        for offset, record_id in enumerate(ids):
            if offset not in failed:
                self.file.write(json.dumps({"id": record_id, "vector": vectors[offset].tolist()}) + "\n")

    def _write_parquet(self, start: int, ids: list[str], vectors: np.ndarray, failed: set[int]) -> None:
        import pyarrow as pa

        keep = [i for i in range(len(ids)) if i not in failed]
        flat = pa.array(vectors[keep].reshape(-1), type=pa.float32())
        column = pa.FixedSizeListArray.from_arrays(flat, self.dims).cast(pa.list_(pa.float32()))
        self.parquet.write_table(pa.table({"id": [ids[i] for i in keep], "vector": column},
                                          schema=self.schema))


def new_manifest(spec: InputSpec, model: str, normalize: bool | None, max_tokens: int,
                 max_texts: int) -> Manifest:
    stat = spec.path.stat()
    return Manifest(run_id=new_job_id(), model=model, input=str(spec.path.resolve()),
                    input_size=stat.st_size, input_mtime_ns=stat.st_mtime_ns, field=spec.field,
                    id_field=spec.id_field, normalize=normalize, max_tokens=max_tokens,
                    max_texts=max_texts)


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
    client.config.model(model, "embedding")
    parts = BatchParts(output)
    manifest = parts.start(new_manifest(spec, model, normalize, max_tokens, max_texts), resume)
    done = parts.committed()
    if on_progress is not None:
        on_progress(sum(chunk["count"] for chunk in done.values()))
    texts = (text for _, text in read_records(spec))
    for result in client.embed_batch(model, texts, normalize=normalize, max_tokens=max_tokens,
                                     max_texts=max_texts, window=window, run_id=manifest.run_id,
                                     skip=done.__contains__):
        parts.commit(result)
        if on_progress is not None:
            on_progress(result.count)
    embedded, failed = parts.assemble(read_records(spec))
    return BatchReport(embedded, failed, len(done), time.perf_counter() - started)
