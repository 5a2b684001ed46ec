"""Concatenating indexed datasets (e.g. preprocessing shards) into one, in the given order.

Writes what megatron-core's `IndexedDatasetBuilder.add_index` writes (Megatron-LM's merge tool),
through the numpy `AtomicIndexedWriter`, so the merge of shards 0..n-1 of a corpus is byte for
byte the single-shot output and an interrupted merge leaves no half-written output.
"""

import json
import os
import re
from typing import List, Sequence

from megatron_loopmdm.data.indexed import (
    METADATA_SUFFIX,
    AtomicIndexedWriter,
    IndexedDatasetError,
    check_indexed_dataset,
)

_SHARD_NAME = re.compile(r"-shard(\d{5})-of-(\d{5})")


def find_prefixes(directory: str) -> List[str]:
    """All `.bin`/`.idx` prefixes in `directory`, sorted by name."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Not a directory: {directory}")
    names = sorted(n[: -len(".idx")] for n in os.listdir(directory) if n.endswith(".idx"))
    if not names:
        raise FileNotFoundError(f"No .idx files in {directory}.")
    return [os.path.join(directory, n) for n in names]


def check_shard_set(prefixes: Sequence[str]) -> None:
    """If the prefixes are named as shards `-shardIIIII-of-NNNNN`, all n must be there, in order."""
    matches = [_SHARD_NAME.search(os.path.basename(p)) for p in prefixes]
    if not any(matches):
        return
    if not all(matches):
        raise ValueError("Mixing shard outputs with other datasets; merge one shard set at a time.")
    counts = {int(m.group(2)) for m in matches}
    if len(counts) != 1:
        raise ValueError(f"Shards of different shard counts {sorted(counts)} cannot be merged.")
    (num_shards,) = counts
    indices = [int(m.group(1)) for m in matches]
    missing = sorted(set(range(num_shards)) - set(indices))
    if missing:
        raise ValueError(f"Missing shard(s) {missing} of {num_shards}; run them before merging.")
    if indices != sorted(indices) or len(indices) != len(set(indices)):
        raise ValueError(f"Shards must be given once each, in order; got {indices}.")


def merge_indexed_datasets(prefixes: Sequence[str], output_prefix: str) -> str:
    """Writes the concatenation of `prefixes` to `output_prefix` (temporary names, then rename).

    Raises:
        FileNotFoundError, IndexedDatasetError: An input is missing or corrupt.
        ValueError: Inputs of different token dtypes, or an incomplete shard set.
    """
    if not prefixes:
        raise ValueError("Nothing to merge.")
    check_shard_set(prefixes)
    infos = [check_indexed_dataset(p) for p in prefixes]
    dtypes = {info.dtype for info in infos}
    if len(dtypes) != 1:
        raise IndexedDatasetError(
            "Inputs have different token dtypes "
            + ", ".join(f"{i.prefix}: {i.dtype.__name__}" for i in infos)
            + "; they were made with different tokenizers."
        )
    meta = _merged_metadata(prefixes)
    writer = AtomicIndexedWriter(output_prefix, infos[0].dtype)
    try:
        for prefix in prefixes:
            writer.add_index(prefix)
        writer.commit(meta)
    except BaseException:
        writer.abort()
        raise
    return output_prefix


def _merged_metadata(prefixes: Sequence[str]):
    """The preprocessing sidecar of the merge (largest id over the inputs), when every input
    has one; None otherwise."""
    metas = []
    for prefix in prefixes:
        if not os.path.exists(prefix + METADATA_SUFFIX):
            return None
        with open(prefix + METADATA_SUFFIX, encoding="utf-8") as f:
            metas.append(json.load(f))
    sizes = {m.get("vocab_size") for m in metas}
    if len(sizes) != 1:
        raise IndexedDatasetError(
            f"Inputs were preprocessed with different vocabulary sizes {sorted(sizes)}."
        )
    merged = dict(metas[0])
    merged["max_token_id"] = max(int(m["max_token_id"]) for m in metas)
    merged["num_documents"] = sum(int(m.get("num_documents", 0)) for m in metas)
    return merged
