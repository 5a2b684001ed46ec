"""Tokenizing a corpus into Megatron indexed datasets (`.bin`/`.idx`).

Files are written by megatron-core's own `IndexedDatasetBuilder`, the writer Megatron-LM's
`tools/preprocess_data.py` uses, with the same per-document content: the tokens of each text
(a JSON list is a list of sentences, one sequence each), then the EOD id when `append_eod`, and a
dtype of `DType.optimal_dtype(vocab_size)`. Output is named `{prefix}_{key}_document`.

Main process: reads raw batches in order, hands them to a pool of workers (decode, parse,
tokenize), and writes results in order. Outputs are written under temporary names and renamed
only when complete, so an interrupted run never leaves a complete-looking `.bin`/`.idx` pair.
"""

import itertools
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.data import readers
from megatron_loopmdm.data.tokenizers import build_tokenizer

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

MALFORMED_JSON = "malformed JSON"
MISSING_KEY = "missing key"
NON_UTF8 = "non-UTF-8 bytes"
EMPTY_DOCUMENT = "empty document"
BAD_INPUT_EXIT_CODE = 65  # sysexits' EX_DATAERR
USAGE_EXIT_CODE = 2


class BadInputError(Exception):
    """A document could not be used and `on_error="fail"`; the message names file and line."""


@dataclass
class PreprocessConfig:
    """What to tokenize, how, and where to write it. Built once from the command line."""

    output_prefix: str
    """Outputs are `{output_prefix}_{key}_document.{bin,idx}`."""
    tokenizer_type: str
    """A `megatron_loopmdm.data.tokenizers.TOKENIZER_TYPES` name."""
    input: List[str] = field(default_factory=list)
    """Input files, directories or glob patterns, in document order."""
    hf_dataset: Optional[str] = None
    """A Hugging Face dataset directory or name, instead of `input`."""
    hf_split: str = "train"
    hf_streaming: bool = False
    input_format: str = "auto"
    """auto (by extension), jsonl, parquet or text."""
    text_mode: str = "file"
    """Plain text: one document per `file`, or per `blank-line`-separated block."""
    json_keys: List[str] = field(default_factory=lambda: ["text"])
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    tiktoken_pattern: str = "cl100k"
    append_eod: bool = False
    workers: int = 1
    batch_size: int = 256
    """Documents per worker task."""
    shard_index: int = 0
    num_shards: int = 1
    on_error: str = "fail"
    """`fail`: stop at the first bad document; `skip`: count it, report it, go on."""
    log_interval: int = 1000
    """Documents between progress updates; 0 disables them."""

    def __post_init__(self) -> None:
        if bool(self.input) == bool(self.hf_dataset):
            raise ValueError("Give either --input files or --hf-dataset, not both or neither.")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"--on-error must be fail or skip, not {self.on_error!r}.")
        if self.input_format not in readers.FORMATS:
            raise ValueError(f"--input-format must be one of {readers.FORMATS}.")
        if self.text_mode not in ("file", "blank-line"):
            raise ValueError("--text-mode must be file or blank-line.")
        if self.workers < 1 or self.batch_size < 1:
            raise ValueError("--workers and --batch-size must be at least 1.")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(
                f"--shard-index must be in [0, --num-shards); got {self.shard_index} of "
                f"{self.num_shards}."
            )
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise ValueError("--json-keys must name at least one key, each once.")

    @property
    def tokenizer_kwargs(self) -> Dict[str, Optional[str]]:
        return dict(
            tokenizer_type=self.tokenizer_type,
            tokenizer_model=self.tokenizer_model,
            vocab_file=self.vocab_file,
            merge_file=self.merge_file,
            tiktoken_pattern=self.tiktoken_pattern,
        )

    def output_prefixes(self) -> Dict[str, str]:
        """Output prefix per JSON key."""
        return {key: f"{self.output_prefix}_{key}_document" for key in self.json_keys}


@dataclass
class Summary:
    """Counts reported at the end of a run."""

    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    seconds: float = 0.0
    skipped: Counter = field(default_factory=Counter)
    examples: Dict[str, List[str]] = field(default_factory=lambda: defaultdict(list))
    blank_lines: int = 0
    outputs: List[str] = field(default_factory=list)

    def format(self) -> str:
        rate = self.seconds if self.seconds > 0 else float("nan")
        lines = [
            f"documents: {self.documents}   tokens: {self.tokens}   "
            f"text: {self.text_bytes / 1e6:.1f} MB   time: {self.seconds:.1f} s   "
            f"({self.documents / rate:.0f} docs/s, {self.text_bytes / 1e6 / rate:.2f} MB/s, "
            f"{self.tokens / rate:.0f} tokens/s)",
        ]
        if self.blank_lines:
            lines.append(f"blank lines ignored: {self.blank_lines}")
        total = sum(self.skipped.values())
        lines.append(f"skipped documents: {total}")
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  {reason}: {count}")
            lines.extend(f"    {where}" for where in self.examples[reason])
        lines.extend(f"wrote {p}.bin/.idx" for p in self.outputs)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Workers: decode, parse and tokenize one batch.

_worker: Dict[str, object] = {}


def _init_worker(tokenizer_kwargs: Dict, keys: List[str], append_eod: bool, threads: int) -> None:
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles interrupts
    tokenizer = build_tokenizer(**tokenizer_kwargs)
    tokenizer.num_threads = threads
    _worker.update(
        tokenizer=tokenizer,
        keys=keys,
        append_eod=append_eod,
        dtype=DType.optimal_dtype(tokenizer.vocab_size),
    )


def _line_of(data: bytes, pos: int) -> int:
    return data.count(b"\n", 0, pos)


def _parse(batch: readers.Batch, keys: List[str]) -> Tuple[list, list, int]:
    """Turns raw payloads into {key: text or [sentences]} dicts; bad ones become errors."""
    docs, errors, blank = [], [], 0
    for loc, payload in zip(batch.locations, batch.payloads):
        if batch.kind == "records":
            record = payload
        else:
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError as e:
                where = loc + _line_of(payload, e.start)
                errors.append((where, NON_UTF8, f"invalid byte at byte {e.start} of the line"))
                continue
            if batch.kind == "text":
                record = {keys[0]: text}
            else:
                if not text.strip():
                    blank += 1
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    errors.append((loc, MALFORMED_JSON, e.msg))
                    continue
                if not isinstance(record, dict):
                    errors.append((loc, MALFORMED_JSON, "the line is not a JSON object"))
                    continue
        bad = [k for k in keys if not _is_text(record.get(k))]
        if bad:
            errors.append((loc, MISSING_KEY, f"no text under {bad}"))
            continue
        docs.append((loc, record))
    return docs, errors, blank


def _is_text(value) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value)
    )


def _encode(batch: readers.Batch) -> dict:
    tokenizer, keys = _worker["tokenizer"], _worker["keys"]
    docs, errors, blank = _parse(batch, keys)
    # Flatten every sentence of every key into one call of the library's batch encoder.
    texts, owners = [], []
    for d, (_, record) in enumerate(docs):
        for k, key in enumerate(keys):
            value = record[key]
            for sentence in [value] if isinstance(value, str) else value:
                texts.append(sentence)
                owners.append((d, k))
    encoded = tokenizer.encode_batch(texts) if texts else []
    lengths = [[[] for _ in keys] for _ in docs]
    for (d, k), ids in zip(owners, encoded):
        if ids:
            lengths[d][k].append(len(ids))
    keep = []
    for d, (loc, _) in enumerate(docs):
        if any(not lens for lens in lengths[d]):
            errors.append((loc, EMPTY_DOCUMENT, "no tokens"))
        else:
            keep.append(d)
    keep_set, eod = set(keep), tokenizer.eod
    per_key_ids = [[] for _ in keys]
    for (d, k), ids in zip(owners, encoded):
        if d in keep_set and ids:
            per_key_ids[k].append(ids)
    out_lengths = []
    for d in keep:
        if _worker["append_eod"]:
            for lens in lengths[d]:
                lens[-1] += 1
        out_lengths.append(lengths[d])
    arrays = []
    for k in range(len(keys)):
        chunks = per_key_ids[k]
        if _worker["append_eod"]:
            # Insert the EOD after the last sentence of each kept document.
            chunks, it = [], iter(per_key_ids[k])
            for d in keep:
                for _ in range(len(lengths[d][k])):
                    chunks.append(next(it))
                chunks.append([eod])
        flat = itertools.chain.from_iterable(chunks)
        arrays.append(numpy.fromiter(flat, dtype=_worker["dtype"]))
    if batch.kind == "records":
        text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    else:
        text_bytes = sum(len(p) for p in batch.payloads)
    return dict(
        source=batch.source,
        arrays=arrays,
        lengths=out_lengths,
        errors=sorted(errors),
        blank=blank,
        text_bytes=text_bytes,
        input_bytes=batch.input_bytes,
    )


# ---------------------------------------------------------------------------------------------
# Output and progress.


class AtomicIndexedWriter:
    """An `IndexedDatasetBuilder` on temporary paths, renamed into place by `commit`.

    `commit` removes any old `.idx` first, then renames `.bin`, then `.idx`: at every instant the
    pair on disk is either the old complete one, an `.idx`-less one, or the new complete one.
    """

    def __init__(self, prefix: str, dtype) -> None:
        self.prefix = prefix
        self.tmp = f"{prefix}.tmp-{os.getpid()}"
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        self.builder = IndexedDatasetBuilder(self.tmp + ".bin", dtype=dtype)

    def add_document(self, tokens: numpy.ndarray, lengths: List[int]) -> None:
        self.builder.add_document(tokens, lengths)

    def commit(self) -> None:
        self.builder.finalize(self.tmp + ".idx")
        if os.path.exists(self.prefix + ".idx"):
            os.remove(self.prefix + ".idx")
        os.replace(self.tmp + ".bin", self.prefix + ".bin")
        os.replace(self.tmp + ".idx", self.prefix + ".idx")

    def abort(self) -> None:
        try:
            self.builder.data_file.close()
        except Exception:
            pass
        for suffix in (".bin", ".idx"):
            if os.path.exists(self.tmp + suffix):
                os.remove(self.tmp + suffix)


class Progress:
    """Prints docs/s, MB/s, tokens/s and ETA every `interval` documents (to stderr)."""

    def __init__(self, interval: int, total_input_bytes: int) -> None:
        self.interval = interval
        self.total = total_input_bytes
        self.start = time.time()
        self.next_report = interval
        self.tty = sys.stderr.isatty()
        self.input_bytes = 0

    def update(self, summary: Summary, input_bytes: int) -> None:
        self.input_bytes += input_bytes
        if not self.interval or summary.documents < self.next_report:
            return
        self.next_report = (summary.documents // self.interval + 1) * self.interval
        elapsed = max(time.time() - self.start, 1e-9)
        eta = "?"
        if self.total and self.input_bytes:
            left = elapsed * max(self.total - self.input_bytes, 0) / self.input_bytes
            eta = time.strftime("%H:%M:%S", time.gmtime(left))
        done = f" {100 * self.input_bytes / self.total:5.1f}%" if self.total else ""
        line = (
            f"[preprocess]{done} {summary.documents} docs | {summary.documents / elapsed:.0f} "
            f"docs/s | {summary.text_bytes / 1e6 / elapsed:.2f} MB/s | "
            f"{summary.tokens / elapsed:.0f} tokens/s | ETA {eta}"
        )
        print(
            ("\r" + line) if self.tty else line,
            end="" if self.tty else "\n",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.tty and self.interval:
            print(file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# The run.


def _batches(config: PreprocessConfig) -> Tuple[Iterator[readers.Batch], int]:
    if config.hf_dataset:
        return (
            readers.hf_dataset_batches(
                config.hf_dataset,
                config.hf_split,
                config.hf_streaming,
                config.shard_index,
                config.num_shards,
                config.batch_size,
                config.json_keys,
            ),
            0,
        )
    files = readers.expand_inputs(config.input)
    units = readers.plan_shard(files, config.input_format, config.shard_index, config.num_shards)
    total = sum(u.size for u in units)

    def generate():
        for unit in units:
            yield from readers.unit_batches(
                unit, config.batch_size, config.json_keys, config.text_mode
            )

    return generate(), total


def _bounded(iterable, semaphore: threading.Semaphore):
    """Keeps the pool's task feeder at most a few batches ahead of the writer."""
    for item in iterable:
        semaphore.acquire()
        yield item


def _results(config: PreprocessConfig, batches) -> Iterator[dict]:
    if config.workers == 1:
        _init_worker(
            config.tokenizer_kwargs, config.json_keys, config.append_eod, os.cpu_count() or 1
        )
        signal.signal(signal.SIGINT, signal.default_int_handler)
        yield from map(_encode, batches)
        return
    semaphore = threading.Semaphore(4 * config.workers)
    context = multiprocessing.get_context("fork")
    with context.Pool(
        config.workers,
        initializer=_init_worker,
        initargs=(config.tokenizer_kwargs, config.json_keys, config.append_eod, 1),
    ) as pool:
        for result in pool.imap(_encode, _bounded(batches, semaphore)):
            semaphore.release()
            yield result


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def preprocess(config: PreprocessConfig) -> Summary:
    """Tokenizes the configured corpus (or shard of it) into indexed datasets.

    Raises:
        BadInputError: A bad document with `on_error="fail"`.
        ValueError, FileNotFoundError, ImportError: Bad configuration or unreadable input.
    """
    tokenizer = build_tokenizer(**config.tokenizer_kwargs)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    del tokenizer  # workers build their own; the library's thread pools do not survive fork
    batches, total_bytes = _batches(config)
    summary, progress = Summary(), Progress(config.log_interval, total_bytes)
    writers = {k: AtomicIndexedWriter(p, dtype) for k, p in config.output_prefixes().items()}
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for result in _results(config, batches):
            _record_errors(config, summary, result)
            for k, key in enumerate(config.json_keys):
                tokens, offset = result["arrays"][k], 0
                for lengths in result["lengths"]:
                    size = sum(lengths[k])
                    writers[key].add_document(tokens[offset : offset + size], lengths[k])
                    offset += size
                summary.tokens += offset
            summary.documents += len(result["lengths"])
            summary.text_bytes += result["text_bytes"]
            summary.blank_lines += result["blank"]
            progress.update(summary, result["input_bytes"])
        for writer in writers.values():
            writer.commit()
        summary.outputs = list(config.output_prefixes().values())
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
    summary.seconds = time.time() - progress.start
    return summary


def _record_errors(config: PreprocessConfig, summary: Summary, result: dict) -> None:
    for line, reason, detail in result["errors"]:
        where = f"{result['source']}:{line}: {reason}: {detail}"
        if config.on_error == "fail":
            raise BadInputError(
                f"{where}\n(use --on-error skip to skip bad documents and report them at the end)"
            )
        summary.skipped[reason] += 1
        if len(summary.examples[reason]) < 5:
            summary.examples[reason].append(where)


def shard_output_prefix(output_prefix: str, shard_index: int, num_shards: int) -> str:
    """The output prefix of one shard; zero-padded so that name order is shard order."""
    if num_shards == 1:
        return output_prefix
    return f"{output_prefix}-shard{shard_index:05d}-of-{num_shards:05d}"


def default_shard(environ=os.environ) -> Tuple[int, int]:
    """(shard_index, num_shards) from SLURM array/task or torchrun variables; (0, 1) otherwise."""
    if "SLURM_ARRAY_TASK_ID" in environ and "SLURM_ARRAY_TASK_COUNT" in environ:
        first = int(environ.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(environ["SLURM_ARRAY_TASK_ID"]) - first, int(environ["SLURM_ARRAY_TASK_COUNT"])
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"])
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return int(environ["RANK"]), int(environ["WORLD_SIZE"])
    return 0, 1


def run_partitions(config: PreprocessConfig, partitions: int) -> Summary:
    """Megatron-LM's `--partitions`: split the input `partitions` ways, run them as parallel
    processes sharing the workers, then merge, which gives the same files as one run."""
    from megatron_loopmdm.data.merge import merge_indexed_datasets

    if partitions == 1:
        return preprocess(config)
    if config.num_shards != 1:
        raise ValueError("--partitions and --num-shards > 1 cannot be combined.")
    parts = []
    for i in range(partitions):
        part = PreprocessConfig(**{**config.__dict__})
        part.output_prefix = shard_output_prefix(config.output_prefix + ".partial", i, partitions)
        part.shard_index, part.num_shards = i, partitions
        part.workers = max(1, config.workers // partitions)
        parts.append(part)
    # Not a Pool: its daemonic processes could not start each partition's own workers.
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(partitions, mp_context=context) as executor:
        summaries = list(executor.map(preprocess, parts))
    total = Summary()
    for s in summaries:
        total.documents += s.documents
        total.tokens += s.tokens
        total.text_bytes += s.text_bytes
        total.seconds = max(total.seconds, s.seconds)
        total.skipped.update(s.skipped)
        for reason, examples in s.examples.items():
            total.examples[reason].extend(examples)
    for key, prefix in config.output_prefixes().items():
        inputs = [p.output_prefixes()[key] for p in parts]
        merge_indexed_datasets(inputs, prefix)
        for p in inputs:
            os.remove(p + ".bin")
            os.remove(p + ".idx")
        total.outputs.append(prefix)
    return total
