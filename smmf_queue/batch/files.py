"""File formats of `smmf-queue embed-batch`: texts in, vectors out.

Inputs: `.txt` (a text per line), `.jsonl` (a field), `.csv` (a column), `.parquet` (a column),
each read lazily. Outputs: `.npy` (float32 rows in input order; a text that failed is a NaN
row), `.jsonl` or `.parquet` (id + vector; a failed text has no row). Parquet needs pyarrow
(the `parquet` extra).
"""

from __future__ import annotations

import csv
import importlib.util
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import RequestError

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
        require_pyarrow(self.path)


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


def require_pyarrow(path: Path) -> None:
    if path.suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise RequestError(f"{path}: Parquet needs pyarrow: pip install 'smmf-queue[parquet]'")


Writer = Callable[[int, list[str], np.ndarray, set[int]], None]


class OutputWriter:
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
