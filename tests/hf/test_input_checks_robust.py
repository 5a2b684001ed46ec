"""Inference inputs checked against the model: trained length, RoPE, tokenizer vocabulary."""

from types import SimpleNamespace

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.hf.configuration_loopmdm import LoopMDMConfig
from megatron_loopmdm.hf.input_checks import check_sequence_length, check_tokenizer_matches

import pytest


def config(position_embedding_type):
    return LoopMDMConfig(
        vocab_size=128, mask_token_id=63, max_position_embeddings=32,
        position_embedding_type=position_embedding_type,
    )  # fmt: skip


def test_learned_positions_refuse_past_the_table():
    check_sequence_length(config("learned_absolute"), 32)
    with pytest.raises(ValueError, match="learned positions end at 32"):
        check_sequence_length(config("learned_absolute"), 33, allow_longer=True)


def test_rope_refuses_past_the_trained_length_unless_allowed():
    with pytest.raises(ValueError, match="--allow-longer-than-trained"):
        check_sequence_length(config("rope"), 40)
    check_sequence_length(config("rope"), 40, allow_longer=True)


class _NoMask:
    vocab_size = 60

    @property
    def mask(self):
        raise ValueError("no mask token")


def test_a_tokenizer_that_is_not_the_models_is_refused():
    check_tokenizer_matches(config("rope"), SimpleNamespace(vocab_size=64, mask=63))
    check_tokenizer_matches(config("rope"), _NoMask())
    with pytest.raises(ValueError, match="has 500 ids but the model only 128"):
        check_tokenizer_matches(config("rope"), SimpleNamespace(vocab_size=500, mask=63))
    with pytest.raises(ValueError, match="mask token is id 5, the model's 63"):
        check_tokenizer_matches(config("rope"), SimpleNamespace(vocab_size=64, mask=5))
