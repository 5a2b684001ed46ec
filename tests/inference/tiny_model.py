"""A tiny LoopMDM trained in-process on a synthetic language, for sampler and evaluation tests.

The language: arithmetic sequences mod 10, x_i = (a + d i) mod 10 with a in 0..9 and d in 1..3,
written as digit tokens 0..9. Two tokens determine the rest, so a model that learned the
language completes a 2-token prompt exactly; chance is 1 in 10 per token.
"""

import functools

from megatron_loopmdm.hf import LoopMDMConfig, LoopMDMForMaskedDiffusion

import torch

EOS, MASK, VOCAB = 10, 11, 12
SEQ = 16


def sample_sequences(n: int, generator: torch.Generator, length: int = SEQ) -> torch.Tensor:
    """[n, length] int64 sequences of the language."""
    a = torch.randint(0, 10, (n, 1), generator=generator)
    d = torch.randint(1, 4, (n, 1), generator=generator)
    return (a + d * torch.arange(length)[None]) % 10


def is_valid(row) -> bool:
    """Whether a token sequence is a sequence of the language."""
    row = list(row)
    if any(not 0 <= t < 10 for t in row):
        return False
    d = (row[1] - row[0]) % 10
    return d in (1, 2, 3) and all((row[i] - row[0]) % 10 == d * i % 10 for i in range(len(row)))


@functools.lru_cache(maxsize=None)
def train_tiny_model(
    steps: int = 600, seed: int = 0, lr: float = 3e-3
) -> LoopMDMForMaskedDiffusion:
    """Trains a 3-layer LoopMDM (layer 1 looped, S ~ U{1, 2}) with the masked-diffusion NELBO."""
    torch.manual_seed(seed)
    config = LoopMDMConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, mask_token_id=MASK, loop_layers=(1, 2), max_loops=2,
        max_position_embeddings=64, eos_token_id=EOS,
    )  # fmt: skip
    model = LoopMDMForMaskedDiffusion(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    eps = 1e-3
    for _ in range(steps):
        tokens = sample_sequences(64, generator)
        t = torch.rand(64, 1, generator=generator)
        p_mask = (1 - eps) * t + eps
        mask = torch.rand(tokens.shape, generator=generator) < p_mask
        noisy = torch.where(mask, MASK, tokens)
        num_loops = int(torch.randint(1, 3, (), generator=generator))
        logits = model(noisy, num_loops=num_loops).logits.float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
        loss = ((ce * mask) / p_mask).sum() / tokens.numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def write_hf_model_with_data(root) -> dict:
    """An untrained small HF LoopMDM directory with a BPE tokenizer, and an indexed dataset.

    Returns:
        {"hf": HF dir, "tokenizer": tokenizer dir, "data": dataset prefix}.
    """
    from pathlib import Path

    from megatron_loopmdm.data.tokenizer_training import train_bpe_tokenizer
    from megatron_loopmdm.data.tokenizers import HuggingFaceTokenizer
    from megatron_loopmdm.hf.checkpoint import write_hf_directory

    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    root = Path(root)
    texts = [f"the cat {i} sat on the mat and the dog {i % 7} ran far away." for i in range(200)]
    train_bpe_tokenizer(texts, str(root / "tok"), vocab_size=300, min_frequency=1)
    tokenizer = HuggingFaceTokenizer(str(root / "tok"))
    torch.manual_seed(0)
    config = LoopMDMConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, mask_token_id=tokenizer.mask,
        loop_layers=(1, 2), max_loops=3, eos_token_id=tokenizer.eod,
    )  # fmt: skip
    write_hf_directory(LoopMDMForMaskedDiffusion(config), root / "hf", root / "tok")
    prefix = str(root / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for text in texts:
        ids = tokenizer.tokenize(text) + [tokenizer.eod]
        builder.add_document(torch.tensor(ids, dtype=torch.long), [len(ids)])
    builder.finalize(prefix + ".idx")
    return {"hf": root / "hf", "tokenizer": root / "tok", "data": prefix}
