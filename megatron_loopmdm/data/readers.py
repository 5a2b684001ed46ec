"""Reading corpora as ordered batches of raw documents, and splitting them into shards.

The document order is the order of the input files as given (a directory contributes its files
sorted by name), then the order within each file. A shard is a contiguous run of that order, so
concatenating shards 0..n-1 gives back the single-shot order:

* uncompressed JSON lines are split by byte ranges (a line belongs to the range holding its first
  byte); compressed files, Parquet files and plain-text files go whole to the shard holding their
  first byte in the concatenated input;
* a Hugging Face dataset is split into contiguous row ranges (streaming: contiguous data files).

Batches carry raw payloads so that decoding and parsing happen in the worker processes.
"""

import glob
import gzip
import io
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED_SUFFIXES = (".gz", ".zst")
FORMATS = ("auto", "jsonl", "parquet", "text")


@dataclass
class Batch:
    """Raw documents for one worker task.

    Attributes:
        source: Where they come from (a file path or dataset name), for error reports.
        kind: "jsonl" (payloads are raw lines), "text" (raw document bytes) or "records"
            (dicts of field values, from Parquet or a Hugging Face dataset).
        locations: Line number (jsonl, text) or row number (records) of each document, 1-based.
        payloads: The documents.
        input_bytes: Input bytes consumed by this batch (compressed size for compressed files),
            for the progress bar's ETA.
    """

    source: str
    kind: str
    locations: List[int]
    payloads: list
    input_bytes: int = 0


@dataclass
class Unit:
    """A contiguous part of one input file: bytes [start, end) of it, or the whole file."""

    path: str
    fmt: str
    start: int = 0
    end: Optional[int] = None

    @property
    def size(self) -> int:
        end = os.path.getsize(self.path) if self.end is None else self.end
        return max(end - self.start, 0)


def detect_format(path: str, fmt: str = "auto") -> str:
    """The input format of a file: jsonl, parquet or text."""
    if fmt != "auto":
        return fmt
    name = path
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def expand_inputs(inputs: Sequence[str]) -> List[str]:
    """Files named by `--input`: paths, directories (their files, sorted) and glob patterns."""
    files: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(item)
                for name in names
                if not name.startswith(".")
            )
            if not found:
                raise FileNotFoundError(f"Input directory {item} holds no files.")
            files.extend(found)
        elif os.path.exists(item):
            files.append(item)
        else:
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"Input not found: {item}")
            files.extend(matches)
    return files


def _splittable(path: str, fmt: str) -> bool:
    return fmt == "jsonl" and not path.endswith(COMPRESSED_SUFFIXES)


def plan_shard(files: Sequence[str], fmt: str, shard_index: int, num_shards: int) -> List[Unit]:
    """The units of `files` that shard `shard_index` of `num_shards` processes, in order."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"--shard-index {shard_index} is outside [0, {num_shards}).")
    formats = [detect_format(f, fmt) for f in files]
    if num_shards == 1:
        return [Unit(f, k) for f, k in zip(files, formats)]
    sizes = [os.path.getsize(f) for f in files]
    total = sum(sizes)
    lo, hi = shard_index * total // num_shards, (shard_index + 1) * total // num_shards
    last = shard_index == num_shards - 1
    units, offset = [], 0
    for path, kind, size in zip(files, formats, sizes):
        if _splittable(path, kind):
            start, end = max(lo - offset, 0), min(hi - offset, size)
            if last:
                end = size
            if start < end or (size == 0 and lo <= offset < hi):
                units.append(Unit(path, kind, start, end))
        elif lo <= offset < hi or (last and offset >= hi):
            units.append(Unit(path, kind))
        offset += size
    return units


def _open_binary(path: str):
    """(text stream, raw file) for a possibly compressed file; raw.tell() measures progress."""
    raw = open(path, "rb")
    if path.endswith(".gz"):
        return gzip.open(raw), raw
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError as e:
            raw.close()
            raise ImportError(
                f"Reading {path} needs the optional package 'zstandard': pip install zstandard"
            ) from e
        stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return io.BufferedReader(stream, buffer_size=1 << 20), raw
    return raw, raw


def _tell(raw) -> int:
    try:
        return raw.tell()
    except OSError:  # a pipe
        return 0


def _count_newlines(f, nbytes: int) -> int:
    count = 0
    while nbytes > 0:
        chunk = f.read(min(nbytes, 1 << 24))
        if not chunk:
            break
        count += chunk.count(b"\n")
        nbytes -= len(chunk)
    return count


def _jsonl_batches(unit: Unit, batch_size: int) -> Iterator[Batch]:
    stream, raw = _open_binary(unit.path)
    with stream, raw:
        line_no = 0
        pos = unit.start
        if unit.start > 0:
            # Skip the line that began in the previous range; count lines for error reports.
            line_no = _count_newlines(stream, unit.start - 1) + 1
            if stream.read(1) != b"\n":
                pos += len(stream.readline())
        # Progress in input bytes: compressed bytes read, or line bytes (pipes cannot tell()).
        compressed = stream is not raw
        locations, payloads, last = [], [], raw.tell() if compressed else pos
        for line in stream:
            if unit.end is not None and pos >= unit.end:
                break
            line_no += 1
            pos += len(line)
            locations.append(line_no)
            payloads.append(line)
            if len(payloads) == batch_size:
                now = raw.tell() if compressed else pos
                yield Batch(unit.path, "jsonl", locations, payloads, now - last)
                locations, payloads, last = [], [], now
        if payloads:
            now = raw.tell() if compressed else pos
            yield Batch(unit.path, "jsonl", locations, payloads, now - last)


def _text_batches(unit: Unit, batch_size: int, text_mode: str) -> Iterator[Batch]:
    stream, raw = _open_binary(unit.path)
    with stream, raw:
        if text_mode == "file":
            data = stream.read()
            yield Batch(unit.path, "text", [1], [data], _tell(raw))
            return
        locations, payloads, block, block_line = [], [], [], 0
        for line_no, line in enumerate(stream, 1):
            if line.strip():
                if not block:
                    block_line = line_no
                block.append(line)
                continue
            if block:
                locations.append(block_line)
                payloads.append(b"".join(block).rstrip(b"\r\n"))
                block = []
                if len(payloads) >= batch_size:
                    yield Batch(unit.path, "text", locations, payloads)
                    locations, payloads = [], []
        if block:
            locations.append(block_line)
            payloads.append(b"".join(block).rstrip(b"\r\n"))
        yield Batch(unit.path, "text", locations, payloads, _tell(raw))


def _parquet_batches(unit: Unit, batch_size: int, keys: Sequence[str]) -> Iterator[Batch]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("Reading Parquet needs the optional package 'pyarrow'.") from e
    try:
        pf = pq.ParquetFile(unit.path)
    except Exception as e:
        raise ValueError(f"{unit.path} is not a readable Parquet file: {e}") from e
    missing = [k for k in keys if k not in pf.schema_arrow.names]
    if missing:
        raise ValueError(
            f"{unit.path}: no column {missing} (it has {pf.schema_arrow.names}); set --json-keys."
        )
    row = 0
    for record_batch in pf.iter_batches(batch_size=batch_size, columns=list(keys)):
        records = record_batch.to_pylist()
        yield Batch(unit.path, "records", list(range(row + 1, row + 1 + len(records))), records)
        row += len(records)
    yield Batch(unit.path, "records", [], [], os.path.getsize(unit.path))


def unit_batches(
    unit: Unit, batch_size: int, keys: Sequence[str], text_mode: str = "file"
) -> Iterator[Batch]:
    """Batches of raw documents from one unit, in file order."""
    if unit.fmt == "jsonl":
        return _jsonl_batches(unit, batch_size)
    if unit.fmt == "parquet":
        return _parquet_batches(unit, batch_size, keys)
    if unit.fmt == "text":
        return _text_batches(unit, batch_size, text_mode)
    raise ValueError(f"Unknown input format {unit.fmt!r}; choose one of {FORMATS[1:]}.")


def hf_dataset_batches(
    name: str,
    split: str,
    streaming: bool,
    shard_index: int,
    num_shards: int,
    batch_size: int,
    keys: Sequence[str],
) -> Iterator[Batch]:
    """Batches from a Hugging Face dataset: a `save_to_disk` directory, a local dataset directory
    or script, or a hub name (the hub needs network access)."""
    import datasets

    source = f"{name}[{split}]"
    try:
        if os.path.isdir(name) and (
            os.path.exists(os.path.join(name, "dataset_info.json"))
            or os.path.exists(os.path.join(name, "dataset_dict.json"))
        ):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
            if streaming:
                ds = ds.to_iterable_dataset(num_shards=max(num_shards, 1))
        else:
            ds = datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as e:
        raise ValueError(f"Cannot load Hugging Face dataset {source}: {e}") from e
    missing = [k for k in keys if ds.column_names is not None and k not in ds.column_names]
    if missing:
        raise ValueError(f"{source}: no column {missing} (it has {ds.column_names}).")
    row = 0
    if streaming:
        if num_shards > 1:
            if ds.num_shards < num_shards:
                raise ValueError(
                    f"{source} streams from {ds.num_shards} files, fewer than --num-shards "
                    f"{num_shards}; use fewer shards or a non-streaming load."
                )
            ds = ds.shard(num_shards=num_shards, index=shard_index, contiguous=True)
        records = []
        for example in ds:
            records.append({k: example.get(k) for k in keys})
            if len(records) == batch_size:
                yield Batch(
                    source, "records", list(range(row + 1, row + 1 + len(records))), records
                )
                row += len(records)
                records = []
        if records:
            yield Batch(source, "records", list(range(row + 1, row + 1 + len(records))), records)
        return
    total = len(ds)
    lo, hi = shard_index * total // num_shards, (shard_index + 1) * total // num_shards
    ds = ds.select_columns(list(keys))
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        columns = ds[start:stop]
        records = [{k: columns[k][i] for k in keys} for i in range(stop - start)]
        yield Batch(source, "records", list(range(start + 1, stop + 1)), records)
