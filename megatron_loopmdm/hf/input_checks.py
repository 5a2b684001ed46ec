"""Checks of inference inputs against the model, for `tools/generate.py` and `tools/evaluate.py`.

Each raises a one-line ValueError saying what to change, before any forward pass: a prompt
longer than the learned position table would crash with an IndexError, one longer than the
trained length under RoPE would run silently out of distribution, and a tokenizer that is not
the model's gives ids it never saw (a crash, or garbage with exit status 0).
"""


def check_sequence_length(config, total_length: int, allow_longer: bool = False) -> None:
    """Refuses prompt + generation beyond the positions the model was trained on.

    Args:
        config: the model's `LoopMDMConfig` (`max_position_embeddings`,
            `position_embedding_type`).
        total_length: the longest prompt plus the generation length, in tokens.
        allow_longer: RoPE only: run past the trained length anyway.
    """
    trained = config.max_position_embeddings
    if total_length <= trained:
        return
    if config.position_embedding_type == "learned_absolute":
        raise ValueError(
            f"prompt + generation is {total_length} tokens, but the model's learned positions "
            f"end at {trained}; shorten the prompt or --gen-length."
        )
    if not allow_longer:
        raise ValueError(
            f"prompt + generation is {total_length} tokens, longer than the {trained} the model "
            "was trained on; shorten the prompt or --gen-length, or pass "
            "--allow-longer-than-trained to extrapolate with RoPE."
        )


def check_tokenizer_matches(config, tokenizer) -> None:
    """Refuses a tokenizer whose ids do not fit the model (or whose [MASK] is another id).

    Args:
        config: the model's `LoopMDMConfig` (`vocab_size` is padded; `mask_token_id`).
        tokenizer: a project tokenizer (`vocab_size`, and `mask` when it has one).
    """
    tokenizer_vocab_size = tokenizer.vocab_size
    try:
        tokenizer_mask_id = tokenizer.mask
    except (AttributeError, ValueError):  # a tokenizer without a mask token
        tokenizer_mask_id = None
    if tokenizer_vocab_size > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer_vocab_size} ids but the model only {config.vocab_size}: "
            "it is not the model's tokenizer; pass --tokenizer with the one it was trained with."
        )
    if tokenizer_mask_id is not None and tokenizer_mask_id != config.mask_token_id:
        raise ValueError(
            f"the tokenizer's mask token is id {tokenizer_mask_id}, the model's "
            f"{config.mask_token_id}: it is not the model's tokenizer; pass --tokenizer with the "
            "one it was trained with."
        )
