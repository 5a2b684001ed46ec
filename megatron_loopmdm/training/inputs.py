"""A run's inputs from its settings: the model size, the tokenizer and vocabulary, the datasets."""

import math

from megatron_loopmdm.data.mock import MockDiffusionDataset
from megatron_loopmdm.models.builder import replace_size
from megatron_loopmdm.models.sizes import ModelSize, get_model_size
from megatron_loopmdm.training.resume import check_mask_token_id


def model_size_from_args(args) -> ModelSize:
    """The named size with command-line overrides applied."""
    base = get_model_size(args.model_size) if args.model_size else get_model_size("debug")
    changes = {
        name: getattr(args, name)
        for name in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "seq_length",
            "normalization",
            "swiglu",
        )
        if getattr(args, name) is not None
    }
    if args.loop_layers is not None:
        changes["loop_layers"] = tuple(args.loop_layers)
    if args.max_loops is not None:
        changes["max_loops"] = args.max_loops
    changes.update(_ar_architecture_changes(args))
    if "hidden_size" in changes and "ffn_hidden_size" not in changes:
        changes["ffn_hidden_size"] = 4 * changes["hidden_size"]
    return replace_size(base, **changes)


def _ar_architecture_changes(args) -> dict:
    """ModelSize fields of imported AR models (--kv-channels, --norm-epsilon, ...)."""
    changes = {}
    if getattr(args, "kv_channels", None) is not None:
        changes["kv_channels"] = args.kv_channels
    if getattr(args, "norm_epsilon", None) is not None:
        changes["layernorm_epsilon"] = args.norm_epsilon
    for name in ("qk_layernorm", "add_qkv_bias"):
        if getattr(args, name, False):
            changes[name] = True
    return changes


def vocab_and_tokenizer(args):
    """(tokenizer or None with mock data, vocabulary size, [MASK] id) of the run."""
    if args.mock_data:
        mask_token_id = args.vocab_size - 1 if args.mask_token_id is None else args.mask_token_id
        return None, args.vocab_size, mask_token_id
    from megatron_loopmdm.data import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                                args.merge_file, eod_token=args.eod_token)  # fmt: skip
    mask_token_id = tokenizer.mask if args.mask_token_id is None else args.mask_token_id
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


def datasets(args, tokenizer, seq_length: int, vocab_size: int) -> tuple:
    """(train, validation) datasets sized for the run's iterations and validations."""
    num_train = args.train_iters * args.global_batch_size
    num_valid = 0
    if args.eval_interval:
        evals = args.train_iters // args.eval_interval + 1
        num_valid = evals * args.eval_iters * args.global_batch_size
    if args.mock_data:
        train = MockDiffusionDataset(num_train, seq_length, vocab_size, args.seed)
        valid = MockDiffusionDataset(max(num_valid, 1), seq_length, vocab_size, args.seed + 1)
        return train, valid
    if args.sft:
        from megatron_loopmdm.data.sft import SFTConfig, build_sft_datasets

        sft_config = SFTConfig(
            seq_length, args.data_path, args.split, args.train_data_path, args.valid_data_path,
            args.seed, args.sft_packing, args.sft_eos_in_loss,
        )  # fmt: skip
        return build_sft_datasets(sft_config, tokenizer, [num_train, num_valid])
    from megatron_loopmdm.data import DataConfig, build_train_valid_test_datasets

    data_config = DataConfig(
        seq_length=seq_length,
        data_path=args.data_path,
        split=args.split,
        train_data_path=args.train_data_path,
        valid_data_path=args.valid_data_path,
        test_data_path=args.test_data_path,
        seed=args.seed,
        path_to_cache=args.data_cache_path,
        per_document_attention=args.per_document_attention,
    )
    train, valid, _ = build_train_valid_test_datasets(
        data_config, tokenizer, [num_train, num_valid or None, None]
    )
    return train, valid
