"""A run's inputs from its configuration: the tokenizer and vocabulary, the datasets."""

import math

from megatron_loopmdm.data.mock import MockDiffusionDataset
from megatron_loopmdm.training.config import DataSourceConfig, RunConfig
from megatron_loopmdm.training.resume import check_mask_token_id


def vocab_and_tokenizer(data: DataSourceConfig):
    """(tokenizer or None with mock data, vocabulary size, [MASK] id) of the run."""
    if data.mock_data:
        mask_token_id = data.vocab_size - 1 if data.mask_token_id is None else data.mask_token_id
        return None, data.vocab_size, mask_token_id
    from megatron_loopmdm.data import build_tokenizer

    tokenizer = build_tokenizer(data.tokenizer_type, data.tokenizer_model, data.vocab_file,
                                data.merge_file, eod_token=data.eod_token)  # fmt: skip
    mask_token_id = tokenizer.mask if data.mask_token_id is None else data.mask_token_id
    check_mask_token_id(mask_token_id, tokenizer.vocab_size, "the tokenizer's vocabulary")
    return tokenizer, tokenizer.vocab_size, mask_token_id


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """The vocabulary padded to a multiple of `divisible_by`, and of the TP size.

    Megatron-LM pads to a multiple of `divisible_by x tensor_parallel`, so the model (and its
    loss curve and checkpoints) change with the TP size. Padding to a multiple of
    `divisible_by` that TP also divides keeps one padded size across layouts whenever possible.
    """
    padded = math.ceil(vocab_size / divisible_by) * divisible_by
    if padded % tensor_parallel:
        multiple = divisible_by * tensor_parallel
        padded = math.ceil(vocab_size / multiple) * multiple
    return int(padded)


def datasets(config: RunConfig, tokenizer, seq_length: int, vocab_size: int) -> tuple:
    """(train, validation) datasets sized for the run's iterations and validations."""
    data, training, logging = config.data, config.training, config.logging
    seed = training.seed
    num_train = training.train_iters * training.global_batch_size
    num_valid = 0
    if logging.eval_interval:
        evals = training.train_iters // logging.eval_interval + 1
        num_valid = evals * logging.eval_iters * training.global_batch_size
    if data.mock_data:
        train = MockDiffusionDataset(num_train, seq_length, vocab_size, seed)
        valid = MockDiffusionDataset(max(num_valid, 1), seq_length, vocab_size, seed + 1)
        return train, valid
    if data.sft:
        from megatron_loopmdm.data.sft import SFTConfig, build_sft_datasets

        sft_config = SFTConfig(
            seq_length, data.data_path, data.split, data.train_data_path, data.valid_data_path,
            seed, data.sft_packing, data.sft_eos_in_loss,
        )  # fmt: skip
        return build_sft_datasets(sft_config, tokenizer, [num_train, num_valid])
    from megatron_loopmdm.data import DataConfig, build_train_valid_test_datasets

    data_config = DataConfig(
        seq_length=seq_length,
        data_path=data.data_path,
        split=data.split,
        train_data_path=data.train_data_path,
        valid_data_path=data.valid_data_path,
        test_data_path=data.test_data_path,
        seed=seed,
        path_to_cache=data.data_cache_path,
        per_document_attention=data.per_document_attention,
    )
    train, valid, _ = build_train_valid_test_datasets(
        data_config, tokenizer, [num_train, num_valid or None, None]
    )
    return train, valid
