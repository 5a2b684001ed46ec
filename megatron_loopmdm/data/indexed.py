"""Writing `.bin`/`.idx` pairs, and checking them before megatron-core opens them.

The writer produces megatron-core's format byte for byte without importing it (or torch).

megatron-core's `IndexedDataset` asserts on a missing file or a bad header and otherwise trusts
the index; a truncated or mismatched pair surfaces later as a numpy or segfault-like failure. These
checks read only the 34-byte header and file sizes (plus the first document for `check_vocab`).
"""

import fcntl
import json
import os
import shutil
import struct
from dataclasses import dataclass
from typing import List, Optional

import numpy

INDEX_HEADER = b"MMIDIDX\x00\x00"
"""The first 9 bytes of every megatron-core `.idx` file (index version 1 follows)."""
DTYPE_CODES = {
    1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32,
    5: numpy.int64, 6: numpy.float64, 7: numpy.float32, 8: numpy.uint16,
}  # fmt: skip
"""megatron-core's `DType` codes (the `.idx` byte after the version); a test holds them equal."""

METADATA_SUFFIX = ".meta.json"
"""The sidecar next to `.idx` (`{prefix}.meta.json`): vocabulary size and largest id."""
_HEADER_BYTES = 34  # magic (9) + version (8) + dtype code (1) + sequence and document counts


class IndexedDatasetError(ValueError):
    """A `.bin`/`.idx` pair that cannot be used; the message says which file and why."""


@dataclass
class IndexedDatasetInfo:
    """What the header of an `.idx` file says."""

    prefix: str
    dtype: type
    num_sequences: int
    num_documents: int
    """Number of documents (the index stores one more boundary than this)."""
    num_tokens: int


def check_indexed_dataset(prefix: str) -> IndexedDatasetInfo:
    """Validates the pair at `prefix` (header, sizes, document boundaries) without trusting it.

    Raises:
        FileNotFoundError: `.bin` or `.idx` is missing.
        IndexedDatasetError: The files are corrupt, truncated or do not belong together.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    missing = [p for p in (idx_path, bin_path) if not os.path.isfile(p)]
    if missing:
        hint = ""
        if os.path.exists(prefix + ".bin") or os.path.exists(prefix + ".idx"):
            hint = " (only half of the pair exists: an interrupted preprocessing run?)"
        raise FileNotFoundError(
            f"Indexed dataset {prefix!r}: missing {', '.join(missing)}{hint}. --data-path takes "
            "prefixes without the .bin/.idx suffix."
        )
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER_BYTES)
    if len(header) < _HEADER_BYTES or header[:9] != INDEX_HEADER:
        raise IndexedDatasetError(f"{idx_path} is not a Megatron index file (bad header).")
    version, code, num_sequences, num_boundaries = struct.unpack("<QBQQ", header[9:])
    if version != 1:
        raise IndexedDatasetError(f"{idx_path}: unsupported index version {version}.")
    dtype = DTYPE_CODES.get(code)
    if dtype is None:
        raise IndexedDatasetError(f"{idx_path}: unknown token dtype code {code}.")
    expected = _HEADER_BYTES + 12 * num_sequences + 8 * num_boundaries
    if idx_size not in (expected, expected + num_sequences):  # + optional multimodal modes
        raise IndexedDatasetError(
            f"{idx_path} is truncated or corrupt: {idx_size} bytes, but its header describes "
            f"{num_sequences} sequences and {num_boundaries} document boundaries ({expected} "
            "bytes)."
        )
    lengths = numpy.fromfile(idx_path, dtype=numpy.int32, count=num_sequences, offset=_HEADER_BYTES)
    boundaries = numpy.fromfile(
        idx_path, dtype=numpy.int64, count=num_boundaries, offset=_HEADER_BYTES + 12 * num_sequences
    )
    if (
        num_boundaries == 0
        or boundaries[0] != 0
        or boundaries[-1] != num_sequences
        or (numpy.any(numpy.diff(boundaries) < 0))
    ):
        raise IndexedDatasetError(f"{idx_path}: corrupt document boundaries.")
    num_tokens = int(lengths.sum(dtype=numpy.int64))
    bin_size = os.path.getsize(bin_path)
    if bin_size != num_tokens * numpy.dtype(dtype).itemsize:
        raise IndexedDatasetError(
            f"{bin_path} has {bin_size} bytes but {idx_path} indexes {num_tokens} "
            f"{numpy.dtype(dtype).name} tokens ({num_tokens * numpy.dtype(dtype).itemsize} "
            "bytes): the pair is truncated or does not belong together."
        )
    return IndexedDatasetInfo(prefix, dtype, num_sequences, num_boundaries - 1, num_tokens)


def check_vocab(info: IndexedDatasetInfo, vocab_size: int, tokenizer_name: str = "tokenizer"):
    """Checks that the dataset was written for a vocabulary like the tokenizer's.

    Preprocessing picks the dtype from the vocabulary size (`optimal_dtype`), so a dtype
    other than the tokenizer's means another tokenizer wrote the data; a token id at or above the
    vocabulary size in the first document means the same.

    Raises:
        IndexedDatasetError: The dataset does not match the tokenizer.
    """
    expected = optimal_dtype(vocab_size)
    if info.dtype != expected:
        raise IndexedDatasetError(
            f"{info.prefix}: tokens are {numpy.dtype(info.dtype).name}, but the {tokenizer_name} "
            f"has {vocab_size} tokens, for which preprocessing writes "
            f"{numpy.dtype(expected).name}: the data was made with a different tokenizer."
        )
    if info.num_tokens == 0:
        return
    with open(info.prefix + ".idx", "rb") as f:
        f.seek(_HEADER_BYTES)
        first_len = struct.unpack("<i", f.read(4))[0]
    first = numpy.fromfile(info.prefix + ".bin", dtype=info.dtype, count=min(first_len, 1 << 20))
    if first.size and int(first.max()) >= vocab_size:
        raise IndexedDatasetError(
            f"{info.prefix}: token id {int(first.max())} is outside the {tokenizer_name}'s "
            f"vocabulary of {vocab_size}: the data was made with a different tokenizer."
        )


def check_metadata(prefix: str, vocab_size: int, tokenizer_name: str = "tokenizer") -> None:
    """Refuses data whose ids do not fit the model, from the sidecar preprocessing wrote.

    Datasets without a sidecar (e.g. from Megatron-LM's tool) are left to `check_vocab`.

    Raises:
        IndexedDatasetError: The largest id is not below `vocab_size`, or the sidecar is bad.
    """
    path = prefix + METADATA_SUFFIX
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        max_id, made_with = int(meta["max_token_id"]), int(meta["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise IndexedDatasetError(f"{path} is not a readable metadata sidecar ({e}).") from None
    if max_id >= vocab_size:
        raise IndexedDatasetError(
            f"{path}: the data's largest token id is {max_id} (made with a vocabulary of "
            f"{made_with}), but the {tokenizer_name} has {vocab_size} tokens: train with the "
            "tokenizer the data was preprocessed with."
        )


def optimal_dtype(vocab_size: Optional[int]) -> type:
    """The token dtype of a vocabulary, as megatron-core's `DType.optimal_dtype` picks it."""
    return numpy.uint16 if vocab_size is not None and vocab_size < 65500 else numpy.int32


class IndexedWriter:
    """Writes a `.bin`/`.idx` pair byte-identical to megatron-core's `IndexedDatasetBuilder`.

    Plain numpy, so preprocessing imports neither torch nor megatron-core (seconds of start-up),
    and one `add_documents` call writes a whole batch. `.bin`: the tokens, back to back, in
    `dtype`. `.idx`: the 9-byte header, version 1 (<Q), the dtype code (<B), the sequence count
    and the document-boundary count (<Q each), then the sequence lengths (int32), the byte
    offset of each sequence in `.bin` (int64) and the boundaries (int64: 0, then the sequence
    count after each document).
    """

    def __init__(self, bin_path: str, dtype) -> None:
        self.dtype = numpy.dtype(dtype)
        self.code = next(c for c, d in DTYPE_CODES.items() if numpy.dtype(d) == self.dtype)
        self.data_file = open(bin_path, "wb")
        self.lengths: List[numpy.ndarray] = []
        self.boundaries: List[numpy.ndarray] = [numpy.zeros(1, dtype=numpy.int64)]
        self.num_sequences = 0

    def add_documents(self, tokens: numpy.ndarray, lengths: List[List[int]]) -> None:
        """Appends documents: `tokens` [sum of all lengths], `lengths[d]` = document d's
        sequence lengths (one per sentence)."""
        self.data_file.write(numpy.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        per_doc = numpy.fromiter((len(x) for x in lengths), dtype=numpy.int64, count=len(lengths))
        flat = numpy.fromiter(
            (n for x in lengths for n in x), dtype=numpy.int32, count=int(per_doc.sum())
        )
        self.lengths.append(flat)
        self.boundaries.append(self.num_sequences + numpy.cumsum(per_doc))
        self.num_sequences += flat.size

    def add_document(self, tokens: numpy.ndarray, lengths: List[int]) -> None:
        self.add_documents(tokens, [lengths])

    def add_index(self, prefix: str) -> None:
        """Appends every document of the checked pair at `prefix`, as megatron-core's
        `IndexedDatasetBuilder.add_index` does (same bytes)."""
        info = check_indexed_dataset(prefix)
        if numpy.dtype(info.dtype) != self.dtype:
            raise IndexedDatasetError(
                f"{prefix}: tokens are {numpy.dtype(info.dtype).name}, the output "
                f"{self.dtype.name}; they were made with different tokenizers."
            )
        plain_size = _HEADER_BYTES + 12 * info.num_sequences + 8 * (info.num_documents + 1)
        if info.num_sequences and os.path.getsize(prefix + ".idx") != plain_size:
            raise IndexedDatasetError(
                f"{prefix}.idx is a multimodal index (it stores sequence modes); merging those "
                "is not supported, and dropping the modes would change the data."
            )
        lengths = numpy.fromfile(
            prefix + ".idx", dtype=numpy.int32, count=info.num_sequences, offset=_HEADER_BYTES
        )
        boundaries = numpy.fromfile(
            prefix + ".idx",
            dtype=numpy.int64,
            count=info.num_documents + 1,
            offset=_HEADER_BYTES + 12 * info.num_sequences,
        )
        with open(prefix + ".bin", "rb") as f:
            shutil.copyfileobj(f, self.data_file, 16 << 20)
        self.lengths.append(lengths)
        self.boundaries.append(self.num_sequences + boundaries[1:])
        self.num_sequences += lengths.size

    def finalize(self, idx_path: str) -> None:
        self.data_file.close()
        lengths = numpy.concatenate(self.lengths) if self.lengths else numpy.zeros(0, numpy.int32)
        boundaries = numpy.concatenate(self.boundaries)
        pointers = numpy.zeros(lengths.size, dtype=numpy.int64)
        numpy.cumsum(lengths[:-1].astype(numpy.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(idx_path, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<QB", 1, self.code))
            f.write(struct.pack("<QQ", lengths.size, boundaries.size))
            f.write(lengths.astype(numpy.int32).tobytes())
            f.write(pointers.tobytes())
            f.write(boundaries.astype(numpy.int64).tobytes())


class AtomicIndexedWriter:
    """An `IndexedWriter` on temporary paths, renamed into place by `commit`.

    `commit` removes any old `.idx` first, then renames `.bin`, the metadata sidecar, then
    `.idx`: at every instant the files on disk are either the old complete set, an `.idx`-less
    one (which nothing loads), or the new complete set. Used by the SFT preprocessing too.
    """

    def __init__(self, prefix: str, dtype) -> None:
        self.prefix = prefix
        self.tmp = f"{prefix}.tmp-{os.getpid()}"
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        self.builder = IndexedWriter(self.tmp + ".bin", dtype)

    def add_documents(self, tokens: numpy.ndarray, lengths: List[List[int]]) -> None:
        self.builder.add_documents(tokens, lengths)

    def add_document(self, tokens: numpy.ndarray, lengths: List[int]) -> None:
        self.builder.add_document(tokens, lengths)

    def add_index(self, prefix: str) -> None:
        self.builder.add_index(prefix)

    def commit(self, metadata: Optional[dict] = None) -> None:
        """Finalizes and renames into place; `metadata` becomes `{prefix}.meta.json`."""
        self.builder.finalize(self.tmp + ".idx")
        if metadata is not None:
            with open(self.tmp + METADATA_SUFFIX, "w", encoding="utf-8") as f:
                json.dump(metadata, f, indent=1, sort_keys=True)
        if os.path.exists(self.prefix + ".idx"):
            os.remove(self.prefix + ".idx")
        os.replace(self.tmp + ".bin", self.prefix + ".bin")
        if metadata is not None:
            os.replace(self.tmp + METADATA_SUFFIX, self.prefix + METADATA_SUFFIX)
        elif os.path.exists(self.prefix + METADATA_SUFFIX):
            os.remove(self.prefix + METADATA_SUFFIX)  # it described the old data
        os.replace(self.tmp + ".idx", self.prefix + ".idx")

    def abort(self) -> None:
        try:
            self.builder.data_file.close()
        except Exception:
            pass
        for suffix in (".bin", ".idx", METADATA_SUFFIX):
            if os.path.exists(self.tmp + suffix):
                os.remove(self.tmp + suffix)


class PrefixLock:
    """An exclusive `flock` on `{prefix}.lock`, so two runs cannot write one prefix.

    The kernel releases it when the holder dies (even by SIGKILL); taking it then also removes
    the temporary files that dead holder left.

    Raises:
        ValueError: Another live run holds the lock.
    """

    def __init__(self, prefix: str) -> None:
        self.path = prefix + ".lock"
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise ValueError(
                f"Another preprocessing run (pid {holder}) is writing {prefix}; wait for it to "
                "finish or choose another --output-prefix."
            ) from None
        directory, base = os.path.split(os.path.abspath(prefix))
        for name in os.listdir(directory):
            if name.startswith(base) and ".tmp-" in name:
                pid = name.rsplit(".tmp-", 1)[1].split(".", 1)[0]
                if pid.isdigit() and not _alive(int(pid)):
                    os.remove(os.path.join(directory, name))
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        os.remove(self.path)  # before unlocking, so no waiter locks a file that is going away
        os.close(self.fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
