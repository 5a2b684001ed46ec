"""A deterministic, resumable batch sampler for pretraining (Megatron's pretraining sampler).

Sample `i` of the global order goes to global batch `i // global_micro_batch`; each data-parallel
rank takes its contiguous slice of every global micro batch. Resuming from `consumed_samples`
continues with exactly the samples an uninterrupted run would have drawn next.
"""

from typing import Iterator, List

import torch


class PretrainingSampler(torch.utils.data.Sampler):
    """Yields this rank's micro batches of sample indices, starting after `consumed_samples`.

    Args:
        total_samples: Length of the dataset.
        consumed_samples: Samples already consumed by all ranks together (from the checkpoint).
        micro_batch_size: Samples per rank per micro batch.
        data_parallel_rank: This rank's index in the data-parallel group.
        data_parallel_size: Size of the data-parallel group.
        drop_last: Drop a last global micro batch that is not full (else yield what is left).
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"The dataset is empty (total_samples={total_samples}).")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError("micro_batch_size and data_parallel_size must be positive.")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank {data_parallel_rank} is outside [0, {data_parallel_size})."
            )
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed_samples {consumed_samples} is outside [0, {total_samples}): the run has "
                "used up the dataset; build it with more samples."
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.global_micro_batch = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        left = self.total_samples - self.consumed_samples
        if self.drop_last:
            return left // self.global_micro_batch
        return (left + self.global_micro_batch - 1) // self.global_micro_batch

    def __iter__(self) -> Iterator[List[int]]:
        start = self.data_parallel_rank * self.micro_batch_size
        for first in range(self.consumed_samples, self.total_samples, self.global_micro_batch):
            last = min(first + self.global_micro_batch, self.total_samples)
            if last - first < self.global_micro_batch:
                if self.drop_last:
                    return
                # Split the remainder evenly over ranks; a rank may get nothing.
                share = -(-(last - first) // self.data_parallel_size)
                begin = first + self.data_parallel_rank * share
                indices = list(range(begin, min(begin + share, last)))
                if indices:
                    yield indices
                return
            yield list(range(first + start, first + start + self.micro_batch_size))


class WithSampleIndex(torch.utils.data.Dataset):
    """Adds `sample_index`, the sample's index in `dataset`, to each sample dict.

    The diffusion noise (t and mask) is keyed by this global index, so it does not depend on
    which rank draws the sample, and for a blend it is the blend's index (unique across the
    blended datasets), not the index inside one of them.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        return {**self.dataset[idx], "sample_index": torch.tensor(idx, dtype=torch.long)}


def build_data_loader(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` with `PretrainingSampler`; batches carry `sample_index`."""
    sampler = PretrainingSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    return torch.utils.data.DataLoader(
        WithSampleIndex(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
