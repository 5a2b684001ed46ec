"""Data: corpus preprocessing, tokenizers, and the masked-diffusion training datasets.

Names are imported lazily, so that light tools (the synthetic corpus, tokenizer training) do not
pay for importing megatron-core.
"""

import importlib

_EXPORTS = {
    "DataConfig": "config",
    "parse_blend": "config",
    "MaskedDiffusionDataset": "dataset",
    "build_train_valid_test_datasets": "dataset",
    "document_attention_mask": "dataset",
    "PretrainingSampler": "sampler",
    "build_data_loader": "sampler",
    "build_tokenizer": "tokenizers",
    "check_indexed_dataset": "indexed",
    "IndexedDatasetError": "indexed",
    "merge_indexed_datasets": "merge",
    "write_synthetic_corpus": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
