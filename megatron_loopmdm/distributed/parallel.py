"""The parallel layout and process-group set-up."""

import contextlib
import dataclasses
import datetime
import os
import random
import socket
from dataclasses import dataclass
from typing import Optional

from megatron_loopmdm.distributed.cpu import enable_cpu_support

import numpy as np
import torch


@dataclass(frozen=True)
class ParallelConfig:
    """How one job is split, validated once on construction (the only place layout rules live).

    Ranks are tensor x context x pipeline x data parallel: `world_size` = TP x CP x PP x DP.
    A config without `world_size` describes one model replica (model-only code, conversion
    tools); `initialize_distributed` fills it from the started job with `with_world_size`.
    """

    tensor_model_parallel_size: int = 1
    """Ranks that split each layer's weights."""

    pipeline_model_parallel_size: int = 1
    """Pipeline stages."""

    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per stage for the interleaved schedule (None: not interleaved)."""

    sequence_parallel: bool = False
    """Split norms and dropout along the sequence over the tensor-parallel ranks."""

    world_size: Optional[int] = None
    """All ranks of the job (None: not known yet; the data-parallel size is then unknown)."""

    context_parallel_size: int = 1
    """Ranks that split the sequence in attention (room for it: only 1 is supported)."""

    expert_model_parallel_size: int = 1
    """Ranks that split the experts (room for it: the model has none, so only 1)."""

    num_layers_in_first_pipeline_stage: Optional[int] = None
    """Layers of the first stage when stages are uneven (None: an even split)."""

    num_layers_in_last_pipeline_stage: Optional[int] = None
    """Layers of the last stage when stages are uneven (None: an even split)."""

    pipeline_model_parallel_layout: Optional[str] = None
    """megatron's layout string (e.g. "Et*3|t*5L"), "auto", or None (an even split)."""

    batch_p2p_comm: Optional[bool] = None
    """Pipeline p2p mode: batched isend/irecv (True) or one by one (False). None: batched on
    GPU, one by one on CPU, where gloo mismatches batched messages under interleaving."""

    def __post_init__(self):
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
        ):
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} {value} must be an integer >= 1.")
        for name in ("context_parallel_size", "expert_model_parallel_size"):
            value, flag = getattr(self, name), "--" + name.replace("_", "-")
            if value != 1:
                raise ValueError(f"{flag} {value} is not supported yet; use 1.")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError(
                "--sequence-parallel needs --tensor-model-parallel-size > 1; drop one of them."
            )
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 2 or self.pipeline_model_parallel_size < 2):
            raise ValueError(
                "The interleaved schedule needs --pipeline-model-parallel-size >= 2 and at least "
                f"2 virtual stages per rank (got {vpp}); unset the virtual pipeline size "
                "(--num-layers-per-virtual-pipeline-stage) otherwise."
            )
        self._check_stage_layout()
        if self.world_size is not None:
            self.data_parallel_size(self.world_size)

    def _check_stage_layout(self) -> None:
        uneven = {
            "--decoder-first-pipeline-num-layers": self.num_layers_in_first_pipeline_stage,
            "--decoder-last-pipeline-num-layers": self.num_layers_in_last_pipeline_stage,
        }
        for flag, layers in uneven.items():
            if layers is not None and layers < 1:
                raise ValueError(f"{flag} {layers} must be at least 1.")
        given = [flag for flag, layers in uneven.items() if layers is not None]
        if given and self.pipeline_model_parallel_layout is not None:
            raise ValueError(
                f"--pipeline-model-parallel-layout and {' and '.join(given)} both set the "
                "stage layout; give one of them."
            )

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one copy of the model: TP x CP x PP."""
        return (
            self.tensor_model_parallel_size
            * self.context_parallel_size
            * self.pipeline_model_parallel_size
        )

    @property
    def num_pipeline_chunks(self) -> int:
        """Model chunks across the pipeline: PP x VPP (PP without interleaving)."""
        return self.pipeline_model_parallel_size * (self.virtual_pipeline_model_parallel_size or 1)

    def data_parallel_size(self, world_size: Optional[int] = None) -> int:
        """The data-parallel size for `world_size` ranks (default: this config's world size).

        Raises:
            ValueError: if the model-parallel size does not divide the world size, or no world
                size is known.
        """
        world_size = self.world_size if world_size is None else world_size
        if world_size is None:
            raise ValueError(
                "The data-parallel size needs the world size: build the ParallelConfig with "
                "world_size=..., or after initialize_distributed."
            )
        if world_size < 1 or world_size % self.model_parallel_size:
            raise ValueError(
                f"{world_size} processes cannot be split into --tensor-model-parallel-size "
                f"{self.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                f"{self.pipeline_model_parallel_size} groups; the world size must be a multiple "
                f"of {self.model_parallel_size}: launch that many processes or change the sizes."
            )
        return world_size // self.model_parallel_size

    def with_world_size(self, world_size: int) -> "ParallelConfig":
        """This layout for a job of `world_size` ranks (validated again)."""
        return dataclasses.replace(self, world_size=world_size)


def virtual_pipeline_size(
    num_layers: int, pipeline_model_parallel_size: int, layers_per_virtual_stage: Optional[int]
) -> Optional[int]:
    """Model chunks per stage from `--num-layers-per-virtual-pipeline-stage` (None: none)."""
    if not layers_per_virtual_stage:
        return None
    per_rank = num_layers // pipeline_model_parallel_size
    if layers_per_virtual_stage < 1 or per_rank % layers_per_virtual_stage:
        raise ValueError(
            f"--num-layers-per-virtual-pipeline-stage {layers_per_virtual_stage} must divide the "
            f"{per_rank} layers of each of the {pipeline_model_parallel_size} pipeline stages."
        )
    return per_rank // layers_per_virtual_stage


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
    world_size = torch.distributed.get_world_size()
    if parallel.world_size not in (None, world_size):
        raise ValueError(
            f"The parallel layout was built for {parallel.world_size} processes, but the job has "
            f"{world_size}; launch {parallel.world_size} processes or build it for {world_size}."
        )
    parallel.data_parallel_size(world_size)
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_group(error: type = ValueError):
    """A one-process gloo group with megatron's TP=1/PP=1 groups, unless one already exists.

    For work that runs the whole model in one process (checkpoint conversion). A group this
    started is destroyed on exit; an existing one must be TP=1/PP=1, else `error` is raised.
    """
    from megatron.core import parallel_state

    if torch.distributed.is_initialized():
        if not parallel_state.model_parallel_is_initialized():
            raise error(
                "torch.distributed is initialised without megatron's process groups: convert "
                "outside the job, or call initialize_distributed(ParallelConfig()) first."
            )
        if parallel_state.get_tensor_model_parallel_world_size() != 1 or (
            parallel_state.get_pipeline_model_parallel_world_size() != 1
        ):
            raise error(
                "Conversion runs the whole model in one process: call it outside a "
                "tensor/pipeline-parallel job (or in one with TP=1 and PP=1)."
            )
        yield
        return
    saved = dict(os.environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1"
    )
    try:
        initialize_distributed(ParallelConfig(), "cpu")
        yield
    finally:
        destroy_distributed()
        os.environ.clear()
        os.environ.update(saved)
