"""`--mock-data`: synthetic token sequences a small model learns quickly, with no files.

Each sample is an arithmetic progression modulo the vocabulary (the [MASK] id, the last one,
excluded) with a random start and a step of 0 (one token repeated) or 1 (counting). Every token
follows from any visible one, so a working model's loss falls below the unigram entropy within a
few dozen steps; the same (seed, index) always gives the same sample.
"""

import torch

_MOCK_STREAM = 0x50CC


class MockDiffusionDataset(torch.utils.data.Dataset):
    """`num_samples` samples of `seq_length` tokens in [0, vocab_size - 1)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        if vocab_size < 3:
            raise ValueError("--mock-data needs a vocabulary of at least 3 tokens.")
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.modulus = vocab_size - 1  # the last id is [MASK]
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        generator = torch.Generator().manual_seed(hash((self.seed, idx, _MOCK_STREAM)) % (1 << 63))
        start = int(torch.randint(0, self.modulus, (), generator=generator))
        step = int(torch.randint(0, 2, (), generator=generator))
        tokens = (start + step * torch.arange(self.seq_length)) % self.modulus
        return {"tokens": tokens.long()}
