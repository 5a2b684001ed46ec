"""The parallel layout and process-group set-up."""

import datetime
import os
import random
from dataclasses import dataclass
from typing import Optional

from megatron_loopmdm.distributed.cpu import enable_cpu_support

import numpy as np
import torch


@dataclass
class ParallelConfig:
    """How one job is split: tensor x pipeline x data parallel ranks."""

    tensor_model_parallel_size: int = 1
    """Ranks that split each layer's weights."""

    pipeline_model_parallel_size: int = 1
    """Pipeline stages."""

    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per stage for the interleaved schedule (None: not interleaved)."""

    sequence_parallel: bool = False
    """Split norms and dropout along the sequence over the tensor-parallel ranks."""

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError(
                "--sequence-parallel needs --tensor-model-parallel-size > 1; drop one of them."
            )
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 2 or self.pipeline_model_parallel_size < 2):
            raise ValueError(
                "The interleaved schedule needs --pipeline-model-parallel-size >= 2 and at least "
                "2 virtual stages per rank; unset the virtual pipeline size otherwise."
            )

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size for `world_size` ranks, or a ValueError if it does not divide."""
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"{world_size} processes cannot be split into tensor-parallel "
                f"{self.tensor_model_parallel_size} x pipeline-parallel "
                f"{self.pipeline_model_parallel_size} groups; the world size must be a multiple "
                f"of {self.model_parallel_size}."
            )
        return world_size // self.model_parallel_size


def resolve_device(device: Optional[str]) -> str:
    """`cuda` when available unless `cpu` is asked for; a clear error for `cuda` without GPUs."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: choose cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is visible.")
    return device


def initialize_distributed(
    parallel: ParallelConfig, device: Optional[str] = None, timeout_minutes: int = 10
) -> str:
    """Starts torch.distributed from torchrun's environment and megatron's process groups.

    On CPU (no CUDA, or `device="cpu"`) this applies `enable_cpu_support()` and uses gloo;
    on GPU it uses NCCL with one device per local rank.

    Returns:
        The device type in use, "cpu" or "cuda".
    """
    from megatron.core import parallel_state

    device = resolve_device(device)
    if device == "cpu":
        enable_cpu_support()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        torch.distributed.init_process_group(
            backend="gloo" if device == "cpu" else "nccl",
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel.data_parallel_size(torch.distributed.get_world_size())
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        )
    return device


def set_seed(seed: int) -> None:
    """Seeds Python, NumPy, torch and megatron's model-parallel RNG streams.

    Pipeline stages get different default seeds (as in Megatron-LM) and tensor-parallel ranks
    different model-parallel streams; data-parallel replicas share both, so they hold the same
    initial weights.
    """
    from megatron.core import parallel_state, tensor_parallel

    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on any rank of the job (one all-reduce; the same answer everywhere).

    Lets every rank take the same branch (skip a step, stop the run), so no collective hangs.
    """
    tensor = torch.tensor([1.0 if flag else 0.0])
    if torch.cuda.is_available():
        tensor = tensor.cuda()
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def destroy_distributed() -> None:
    """Tears down megatron's groups and torch.distributed (for tests and clean exits)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
