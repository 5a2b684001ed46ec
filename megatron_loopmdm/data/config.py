"""The training data configuration, validated on construction."""

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

Blend = Tuple[List[str], Optional[List[float]]]


def parse_blend(items: List[str], flag: str = "--data-path") -> Blend:
    """Parses Megatron's blend list: `["a"]`, `["a", "b"]` or `["0.7", "a", "0.3", "b"]`.

    Returns:
        (prefixes, weights), with weights None when none were given.

    Raises:
        ValueError: An empty list, a weight without a prefix, or a non-positive weight.
    """
    if isinstance(items, str):
        items = items.split()
    items = [str(i) for i in items]
    if not items:
        raise ValueError(f"{flag} is empty; give dataset prefixes, optionally with weights.")

    def is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    numbers = [is_number(s) for s in items]
    if not any(numbers):
        return items, None
    if len(items) % 2 or not all(numbers[0::2]) or any(numbers[1::2]):
        raise ValueError(
            f"{flag} {' '.join(items)}: expected 'weight prefix weight prefix ...' (for example "
            f"'0.7 data/a_text_document 0.3 data/b_text_document') or prefixes only."
        )
    weights = [float(w) for w in items[0::2]]
    if any(w <= 0 for w in weights):
        raise ValueError(f"{flag}: weights must be positive, got {weights}.")
    return items[1::2], weights


def _validate_split(split: str) -> None:
    parts = [p for p in re.split(r"[,/]", split) if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--split {split!r}: expected up to three numbers, e.g. '969,30,1'.")
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(
            f"--split {split!r}: expected one to three non-negative numbers with a positive sum, "
            "e.g. '969,30,1' for train, valid, test."
        )


@dataclass
class DataConfig:
    """Where training data comes from and how samples are cut.

    Either `data_path` (one blend divided by `split`) or any of the per-split paths.
    """

    seq_length: int
    """Tokens per sample; documents are packed with EOD separators, with no next-token shift."""
    data_path: Optional[List[str]] = None
    """Megatron's `--data-path`: `["0.7", "a", "0.3", "b"]` or `["a", "b"]` (weights by size)."""
    split: Optional[str] = "969,30,1"
    """Train/valid/test proportions of each dataset's documents, used with `data_path`."""
    train_data_path: Optional[List[str]] = None
    """A blend for the train split only (instead of `data_path` and `split`)."""
    valid_data_path: Optional[List[str]] = None
    """A blend for the validation split only."""
    test_data_path: Optional[List[str]] = None
    """A blend for the test split only."""
    seed: int = 1234
    """Seed of the document and sample shuffles."""
    path_to_cache: Optional[str] = None
    """Where the sample indices are cached (default: a `cache/` folder beside each dataset)."""
    per_document_attention: bool = False
    """Return `document_ids` so attention can be restricted to each packed document."""
    mmap_bin_files: bool = True
    """Memory-map the `.bin` files (else read them with file reads)."""
    num_dataset_builder_threads: int = 1
    """Threads megatron-core uses to build the per-dataset indices."""

    def __post_init__(self) -> None:
        if not isinstance(self.seq_length, int) or self.seq_length < 1:
            raise ValueError(f"seq_length must be a positive integer, got {self.seq_length!r}.")
        per_split = [self.train_data_path, self.valid_data_path, self.test_data_path]
        if self.data_path and any(per_split):
            raise ValueError(
                "Give either --data-path (with --split) or --train/valid/test-data-path, not both."
            )
        if not self.data_path and not any(per_split):
            raise ValueError("No data: set --data-path or --train-data-path.")
        if self.data_path:
            parse_blend(self.data_path)
            if not self.split:
                raise ValueError("--data-path needs --split, e.g. '969,30,1'.")
            _validate_split(self.split)
        else:
            for name, blend in zip(("train", "valid", "test"), per_split):
                if blend:
                    parse_blend(blend, f"--{name}-data-path")
        if self.num_dataset_builder_threads < 1:
            raise ValueError("num_dataset_builder_threads must be at least 1.")

    @property
    def blend(self) -> Optional[Blend]:
        """The `data_path` blend as megatron-core's (prefixes, weights), or None."""
        return parse_blend(self.data_path) if self.data_path else None

    @property
    def blend_per_split(self) -> Optional[List[Optional[Blend]]]:
        """Per-split blends (train, valid, test), or None when `data_path` is used."""
        if self.data_path:
            return None
        paths = [self.train_data_path, self.valid_data_path, self.test_data_path]
        flags = ("--train-data-path", "--valid-data-path", "--test-data-path")
        return [parse_blend(p, f) if p else None for p, f in zip(paths, flags)]

    def prefixes(self) -> List[str]:
        """Every dataset prefix the config names."""
        if self.blend is not None:
            return list(self.blend[0])
        return [p for blend in self.blend_per_split if blend for p in blend[0]]
