"""Tokenizing a corpus into Megatron indexed datasets (`.bin`/`.idx`).

Files are byte-identical to what megatron-core's `IndexedDatasetBuilder` (the writer of
Megatron-LM's `tools/preprocess_data.py`) writes, with the same per-document content: the tokens
of each text (a JSON list is a list of sentences, one sequence each), then the EOD id when
`append_eod`, and megatron-core's dtype rule (`optimal_dtype(vocab_size)`). The writer is
`data/indexed.py`'s numpy `IndexedWriter`: preprocessing imports neither torch nor
megatron-core. Output is named `{prefix}_{key}_document`, with a JSON sidecar
`{prefix}_{key}_document.meta.json` (vocabulary size, largest id) that training checks at
start-up.

One process, three threads: a reader (read, decode, parse; Python), an encoder (the tokenizer
library's batch encoder, which releases the GIL and runs on `workers` native threads), and the
main thread, which writes in order and is the only one that handles signals. Threads hand work
through bounded queues polled with timeouts, so no wait is uninterruptible: a signal at any
moment ends the run, and a pipeline that makes no progress for `stall_timeout` seconds is an
error. Outputs are written under temporary names and renamed only when complete (the `.idx`
last), under a lock on the prefix, so an interrupted or failed run never leaves a
complete-looking pair and an existing good output survives it.
"""

import itertools
import json
import os
import queue
import signal
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.data import readers
from megatron_loopmdm.data.indexed import (  # noqa: F401
    METADATA_SUFFIX,
    AtomicIndexedWriter,
    PrefixLock,
    optimal_dtype,
)
from megatron_loopmdm.data.progress import Progress
from megatron_loopmdm.data.tokenizers import build_tokenizer

import numpy

MALFORMED_JSON = "malformed JSON"
MISSING_KEY = "missing key"
NON_UTF8 = "non-UTF-8 bytes"
EMPTY_DOCUMENT = "empty document"
OUT_OF_VOCABULARY = "token id outside the vocabulary"
BAD_INPUT_EXIT_CODE = 2
USAGE_EXIT_CODE = 2
SELF_CHECK_DOCUMENTS = 8


class BadInputError(Exception):
    """A document could not be used and `on_error="fail"`; the message names file and line."""


class StalledError(RuntimeError):
    """The pipeline made no progress for `stall_timeout` seconds."""


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
    tiktoken_pattern: Optional[str] = None
    eod_token: Optional[str] = None
    """A token string to use as end of document instead of the tokenizer's EOS (or SEP)."""
    vocab_size: Optional[int] = None
    """Megatron-LM's `--vocab-size`, for tiktoken JSON vocabularies."""
    tiktoken_num_special_tokens: int = 1000
    append_eod: bool = False
    workers: int = 1
    """Native threads of the tokenizer library's batch encoder."""
    batch_size: int = 256
    """Documents per encoder call."""
    stall_timeout: float = 300.0
    """Seconds without any finished batch after which the run stops with an error."""
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
        if not self.stall_timeout > 0:
            raise ValueError(f"--stall-timeout must be positive, got {self.stall_timeout}.")
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
            eod_token=self.eod_token,
            vocab_size=self.vocab_size,
            tiktoken_num_special_tokens=self.tiktoken_num_special_tokens,
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
    eod: str = "none"

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
        lines.append(f"end of document: {self.eod}")
        lines.extend(f"wrote {p}.bin/.idx" for p in self.outputs)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Parsing (reader thread) and tokenizing (encoder thread) one batch.


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
                    errors.append((loc, MALFORMED_JSON, f"{e.msg} (column {e.colno})"))
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


def _encode(state: dict, batch: readers.Batch, docs: list, errors: list, blank: int) -> dict:
    """Tokenizes the parsed documents of one batch into one token array per key."""
    tokenizer, keys = state["tokenizer"], state["keys"]
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
        if state["append_eod"]:
            for lens in lengths[d]:
                lens[-1] += 1
        out_lengths.append(lengths[d])
    arrays = []
    for k in range(len(keys)):
        chunks = per_key_ids[k]
        if state["append_eod"]:
            # Insert the EOD after the last sentence of each kept document.
            chunks, it = [], iter(per_key_ids[k])
            for d in keep:
                for _ in range(len(lengths[d][k])):
                    chunks.append(next(it))
                chunks.append([eod])
        flat = itertools.chain.from_iterable(chunks)
        arrays.append(numpy.fromiter(flat, dtype=numpy.int64))
    max_id = max((int(a.max()) for a in arrays if a.size), default=-1)
    if max_id >= state["vocab_size"] or any(a.size and int(a.min()) < 0 for a in arrays):
        # A tokenizer bug or a wrong --vocab-size; training would crash in the embedding.
        bad = next(i for i, a in enumerate(arrays) if a.size and int(a.max()) == max_id)
        raise BadInputError(
            f"{batch.source}: {OUT_OF_VOCABULARY}: id {max_id} in key {keys[bad]!r} is not below "
            f"the vocabulary size {state['vocab_size']}."
        )
    arrays = [a.astype(state["dtype"]) for a in arrays]
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
        max_id=max_id,
    )


# ---------------------------------------------------------------------------------------------
# Output and progress.


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


_END = object()
_POLL_SECONDS = 0.1


def _put(q: "queue.Queue", item, stop: threading.Event) -> bool:
    """Puts unless the run is stopping; never blocks for longer than a poll interval."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False


def _thread(target, out: "queue.Queue", stop: threading.Event, name: str) -> threading.Thread:
    """A daemon thread running `target`; its exception, if any, is handed on through `out`."""

    def run():
        try:
            target()
        except BaseException as e:  # handed to the main thread, which re-raises it
            _put(out, ("error", e), stop)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def _results(config: PreprocessConfig, state: dict, batches, stop: threading.Event):
    """Encoded batches in input order, from the reader and encoder threads.

    Raises:
        StalledError: No batch finished for `config.stall_timeout` seconds.
    """
    parsed: "queue.Queue" = queue.Queue(maxsize=4)
    encoded: "queue.Queue" = queue.Queue(maxsize=4)

    def read():
        for batch in batches:
            if stop.is_set() or not _put(parsed, (batch, *_parse(batch, config.json_keys)), stop):
                return
        _put(parsed, _END, stop)

    def encode():
        while not stop.is_set():
            try:
                item = parsed.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            if item is _END or item[0] == "error":
                _put(encoded, item, stop)
                return
            if not _put(encoded, _encode(state, *item), stop):
                return

    _thread(read, parsed, stop, "preprocess-reader")
    _thread(encode, encoded, stop, "preprocess-encoder")
    last = time.monotonic()
    while True:
        try:
            item = encoded.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            if time.monotonic() - last > config.stall_timeout:
                raise StalledError(
                    f"No progress for {config.stall_timeout:g} s (reading, parsing or "
                    "tokenizing is stuck; a stalled input such as a pipe or network file?); "
                    "stopped. Raise --stall-timeout if batches are legitimately that slow."
                ) from None
            continue
        if item is _END:
            return
        if isinstance(item, tuple) and item[0] == "error":
            raise item[1]
        last = time.monotonic()
        yield item


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _self_check(tokenizer, first: list, failures: list) -> Optional[threading.Thread]:
    """Compares the fast path with transformers on the first documents, in a thread (importing
    transformers takes seconds; the check overlaps the run and is awaited before commit)."""
    if not hasattr(tokenizer, "check_against_transformers") or not first:
        return None

    def check():
        try:
            tokenizer.check_against_transformers(first)
        except BaseException as e:  # reported by the main thread before commit
            failures.append(e)

    thread = threading.Thread(target=check, name="preprocess-self-check", daemon=True)
    thread.start()
    return thread


def _first_texts(batches, keys, sink: list):
    """Passes batches through, keeping a few texts of the first ones for the self-check."""
    for batch in batches:
        if len(sink) < SELF_CHECK_DOCUMENTS:
            docs = _parse(batch, keys)[0]
            for _, record in docs[:SELF_CHECK_DOCUMENTS]:
                value = record[keys[0]]
                sink.extend([value] if isinstance(value, str) else value[:1])
        yield batch


def preprocess(config: PreprocessConfig) -> Summary:
    """Tokenizes the configured corpus (or shard of it) into indexed datasets.

    Raises:
        BadInputError: A bad document with `on_error="fail"`, or no documents at all.
        StalledError: No progress for `config.stall_timeout` seconds.
        ValueError, FileNotFoundError, ImportError: Bad configuration or unreadable input.
        KeyboardInterrupt: SIGINT or SIGTERM.
    """
    # The library's native thread pool is sized once, at first use, by RAYON_NUM_THREADS.
    os.environ.setdefault("RAYON_NUM_THREADS", str(config.workers))
    tokenizer = build_tokenizer(**config.tokenizer_kwargs)
    tokenizer.num_threads = config.workers
    if config.append_eod:
        tokenizer.eod  # noqa: B018  (raises, naming --eod-token, when there is none)
    dtype = optimal_dtype(tokenizer.vocab_size)
    state = dict(
        tokenizer=tokenizer,
        keys=config.json_keys,
        append_eod=config.append_eod,
        dtype=dtype,
        vocab_size=tokenizer.vocab_size,
    )
    batches, total_bytes = _batches(config)
    check_texts, failures = [], []
    batches = _first_texts(batches, config.json_keys, check_texts)
    summary = Summary(eod=tokenizer.eod_source)
    progress = Progress(config.log_interval, total_bytes)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    stop, lock, writers, checker = threading.Event(), None, {}, None
    try:
        lock = PrefixLock(config.output_prefix)
        writers = {k: AtomicIndexedWriter(p, dtype) for k, p in config.output_prefixes().items()}
        max_id = -1
        for result in _results(config, state, batches, stop):
            if checker is None:
                checker = _self_check(tokenizer, check_texts, failures) or False
            _write(config, summary, writers, result)
            max_id = max(max_id, result["max_id"])
            progress.update(summary, result["input_bytes"])
        if summary.documents == 0:
            raise BadInputError(
                f"{', '.join(config.input) or config.hf_dataset}: no documents to write (empty "
                "input, or every document skipped); the existing output, if any, is kept."
            )
        if checker:
            checker.join(timeout=config.stall_timeout)
            if failures:
                raise failures[0]
        for key, writer in writers.items():
            writer.commit(_metadata(config, tokenizer, summary, max_id))
        summary.outputs = list(config.output_prefixes().values())
    except BaseException:
        stop.set()
        # A second signal must not interrupt the clean-up.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        stop.set()
        if lock is not None:
            lock.release()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        progress.close()
    summary.seconds = time.time() - progress.start
    return summary


def _write(config: PreprocessConfig, summary: Summary, writers: dict, result: dict) -> None:
    _record_errors(config, summary, result)
    for k, key in enumerate(config.json_keys):
        tokens = result["arrays"][k]
        writers[key].add_documents(tokens, [lengths[k] for lengths in result["lengths"]])
        summary.tokens += tokens.size
    summary.documents += len(result["lengths"])
    summary.text_bytes += result["text_bytes"]
    summary.blank_lines += result["blank"]


def _metadata(config: PreprocessConfig, tokenizer, summary: Summary, max_id: int) -> dict:
    """The sidecar: what training checks against its model before using the data."""
    return dict(
        format="megatron-loopmdm indexed dataset metadata",
        version=1,
        tokenizer_type=config.tokenizer_type,
        tokenizer_model=config.tokenizer_model or config.vocab_file,
        vocab_size=tokenizer.vocab_size,
        max_token_id=max_id,
        eod_id=tokenizer._eod,
        append_eod=config.append_eod,
        num_documents=summary.documents,
    )


def _record_errors(config: PreprocessConfig, summary: Summary, result: dict) -> None:
    for line, reason, detail in result["errors"]:
        where = f"{result['source']}:{line}: {reason}: {detail}"
        if config.on_error == "fail":
            raise BadInputError(
                f"{where} (use --on-error skip to skip bad documents and report them at the end)"
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
    """Megatron-LM's `--partitions`, accepted for its command lines.

    Megatron-LM splits the input into `partitions` files, runs a process pool on each and merges.
    Here one process already encodes on `workers` native threads, so partitions would add only
    start-up and merge time (and partial files); the run is the single run, whose files equal
    Megatron-LM's merged ones. Across processes or nodes, use `--num-shards`.
    """
    if partitions < 1:
        raise ValueError("--partitions must be at least 1.")
    if partitions > 1 and config.num_shards != 1:
        raise ValueError("--partitions and --num-shards > 1 cannot be combined.")
    return preprocess(config)
