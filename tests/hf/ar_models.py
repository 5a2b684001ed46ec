"""Tiny random Hugging Face AR models (Llama, Qwen2, Qwen3, Mistral), built offline."""

from pathlib import Path

import torch

VOCAB = 96  # tokenizer size; the models have a few spare rows on top
ROWS = 100
COMMON = dict(
    vocab_size=ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip


def ar_config(arch: str):
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig(
            **COMMON, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16},
        )  # fmt: skip
    if arch == "qwen2":
        return transformers.Qwen2Config(**COMMON, rms_norm_eps=1e-6, tie_word_embeddings=True)
    if arch == "qwen3":
        # head_dim 16 != hidden / heads = 8, as in the real Qwen3 models
        return transformers.Qwen3Config(
            **COMMON, head_dim=16, rms_norm_eps=1e-6, tie_word_embeddings=False
        )
    if arch == "mistral":
        return transformers.MistralConfig(
            **COMMON, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False
        )
    raise ValueError(arch)


def save_tokenizer(path: Path, with_mask: bool = False) -> None:
    """A word-level tokenizer of VOCAB tokens: w0 .. w{VOCAB-3}, <unk>, <eos> (and <mask>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(VOCAB - 2)] + ["<unk>", "<eos>"]
    if with_mask:
        words[-3] = "<mask>"
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = dict(unk_token="<unk>", eos_token="<eos>")
    if with_mask:
        special["mask_token"] = "<mask>"
    PreTrainedTokenizerFast(tokenizer_object=backend, **special).save_pretrained(path)


def save_ar_model(path: Path, arch: str, seed: int = 0, tokenizer: bool = True, config=None):
    """Saves a random AR model (fp32 safetensors) and its tokenizer; returns the model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config or ar_config(arch)).eval()
    with torch.no_grad():  # norms away from 1, so that a missed norm weight shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(path)
    if tokenizer:
        save_tokenizer(path)
    return model
