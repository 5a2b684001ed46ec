"""Writes a tiny random Llama (Hugging Face format) and a word-level tokenizer to DIR.

    python examples/from_pretrained/make_tiny_ar.py DIR

Stands in for a real pretrained model in the CPU walk-through (no download needed).
"""

import sys

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 128


def main(out: str) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    words = [f"w{i}" for i in range(VOCAB - 2)] + ["<unk>", "<eos>"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>"
    )
    tokenizer.save_pretrained(out)
    print(f"wrote a tiny random Llama to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
