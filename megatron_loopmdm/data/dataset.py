"""The masked-diffusion training dataset over Megatron indexed datasets.

megatron-core's `GPTDataset` does the work: documents shuffled per epoch, packed into samples,
samples shuffled, indices cached on disk (built by rank 0, then loaded by the others), blends and
splits by `BlendedMegatronDatasetBuilder`. With `add_extra_token_to_sequence=False` its samples
tile the packed token stream exactly, `seq_length` tokens each, which is what masked diffusion
needs (no next-token shift). This subclass only changes what a sample holds.
"""

from typing import Callable, Dict, List, Optional, Sequence

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.data.config import DataConfig
from megatron_loopmdm.data.indexed import check_indexed_dataset, check_metadata, check_vocab
from megatron_loopmdm.data.tokenizers import _TokenizerBase

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.tokenizers import MegatronTokenizerBase

# Our tokenizers implement megatron-core's tokenizer interface without importing it (so that
# preprocessing starts fast); declare them to megatron-core here, where its datasets use them.
MegatronTokenizerBase.register(_TokenizerBase)

PADDING_DOCUMENT_ID = -1


class MaskedDiffusionDataset(GPTDataset):
    """Packed `seq_length`-token samples of EOD-separated documents.

    Each sample is a dict of tensors:
        tokens: int64 [seq_length].
        loss_mask: float32 [seq_length], 0 on padding (only a last, partial validation sample
            can be padded; training samples never are).
        position_ids: int64 [seq_length], restarting at each document when
            `inter_document_masking` (DataConfig.per_document_attention) is set.
        document_ids: int64 [seq_length], only with per-document attention: the index of each
            token's document within the sample (0, 1, ...), `PADDING_DOCUMENT_ID` on padding.
    """

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: GPTDatasetConfig) -> IndexedDataset:
        info = check_indexed_dataset(dataset_path)
        check_vocab(info, config.tokenizer.vocab_size, type(config.tokenizer).__name__)
        return GPTDataset.build_low_level_dataset(dataset_path, config)

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        text, _, lengths = self._query_document_sample_shuffle_indices(0 if idx is None else idx)
        seq_length = self.config.sequence_length
        num_real = int(sum(lengths))
        tokens = torch.from_numpy(numpy.ascontiguousarray(text[:seq_length])).long()
        tokens[num_real:] = self.config.tokenizer.eod  # padding reuses EOD; loss_mask hides it
        loss_mask = torch.zeros(seq_length, dtype=torch.float32)
        if idx is not None:
            loss_mask[:num_real] = 1.0
        sample = {"tokens": tokens, "loss_mask": loss_mask}
        if self.config.inter_document_masking:
            document_ids = torch.full((seq_length,), PADDING_DOCUMENT_ID, dtype=torch.long)
            position_ids = torch.zeros(seq_length, dtype=torch.long)
            start = 0
            # A sample that starts exactly at a document boundary has an empty first part.
            for d, length in enumerate(length for length in lengths if length > 0):
                document_ids[start : start + length] = d
                position_ids[start : start + length] = torch.arange(length)
                start += length
            sample["document_ids"] = document_ids
            sample["position_ids"] = position_ids
        else:
            sample["position_ids"] = torch.arange(seq_length, dtype=torch.long)
        return sample

    def sample_document_indices(self, idx: int) -> numpy.ndarray:
        """The indexed-dataset document ids sample `idx` draws from, in order."""
        return self._query_document_sample_shuffle_indices(idx)[1]


def document_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """A bidirectional per-document attention mask from `document_ids`.

    Args:
        document_ids: int64 [B, S].

    Returns:
        bool [B, 1, S, S], True where attention is masked out (different documents), the
        convention of megatron-core's `padding` mask type.
    """
    return document_ids[:, None, :, None] != document_ids[:, None, None, :]


def build_gpt_dataset_config(data_config: DataConfig, tokenizer) -> GPTDatasetConfig:
    """The megatron-core dataset config for `data_config` (no shift, our sample layout)."""
    return GPTDatasetConfig(
        random_seed=data_config.seed,
        sequence_length=data_config.seq_length,
        blend=data_config.blend,
        blend_per_split=data_config.blend_per_split,
        split=data_config.split if data_config.data_path else None,
        path_to_cache=data_config.path_to_cache,
        mmap_bin_files=data_config.mmap_bin_files,
        num_dataset_builder_threads=data_config.num_dataset_builder_threads,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        add_extra_token_to_sequence=False,
        inter_document_masking=data_config.per_document_attention,
    )


def build_train_valid_test_datasets(
    data_config: DataConfig,
    tokenizer,
    train_valid_test_num_samples: Sequence[Optional[int]],
    is_built_on_rank: Optional[Callable[[], bool]] = None,
) -> List[Optional[torch.utils.data.Dataset]]:
    """Builds the train, valid and test datasets (each None when its split is empty).

    Call on every rank: rank 0 builds and caches the indices, the others wait and load them
    (megatron-core's builder does this when torch.distributed is initialised).

    Args:
        data_config: Where the data is and how to cut it.
        tokenizer: A `megatron_loopmdm.data.tokenizers` tokenizer (its vocabulary must match the
            datasets' token dtype).
        train_valid_test_num_samples: Samples needed per split (e.g. train_iters * global batch).
        is_built_on_rank: Whether this rank builds datasets (default: every rank).

    Raises:
        FileNotFoundError, IndexedDatasetError: A missing, corrupt or mismatched dataset.
    """
    if len(train_valid_test_num_samples) != 3:
        raise ValueError("train_valid_test_num_samples must have three entries.")
    try:
        tokenizer.eod
    except ValueError:  # samples are EOD-separated and padded with EOD
        raise ValueError(
            f"Training on indexed data needs an end-of-document token, but the "
            f"{type(tokenizer).__name__} at {tokenizer.path} has no EOS or SEP token: add one "
            "(e.g. eos_token in tokenizer_config.json), or name one with --eod-token TOKEN "
            "(pretrain_loopmdm.py and tools/preprocess_data.py; "
            "build_tokenizer(..., eod_token=TOKEN) in the library)."
        ) from None
    for prefix in data_config.prefixes():
        check_metadata(prefix, tokenizer.vocab_size, type(tokenizer).__name__)
        check_vocab(check_indexed_dataset(prefix), tokenizer.vocab_size, type(tokenizer).__name__)
    config = build_gpt_dataset_config(data_config, tokenizer)
    builder = BlendedMegatronDatasetBuilder(
        MaskedDiffusionDataset,
        list(train_valid_test_num_samples),
        is_built_on_rank or (lambda: True),
        config,
    )
    return builder.build()
