"""The training backend: one interface, a megatron and a DeepSpeed implementation.

A backend owns what wraps the model and what steps it: one training step, one forward-only
evaluation step, saving, finding and loading checkpoints, and the optimizer handle the LR
schedule drives. `build_backend` chooses one at start-up; the training loop calls only this
interface. DeepSpeed itself is imported only by `training.deepspeed_backend`.
"""

import os
from functools import partial
from typing import Callable, Optional

import megatron_loopmdm.checkpointing.dist_checkpoint as ckpt
from megatron_loopmdm.diffusion.config import DiffusionConfig
from megatron_loopmdm.distributed.parallel import ParallelConfig
from megatron_loopmdm.models.config import LoopConfig, LoopMDMModelConfig
from megatron_loopmdm.training.setup import build_model_chunks, build_optimizer, wrap_with_ddp
from megatron_loopmdm.training.step import StepResult, count_loss_tokens, train_step

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig

# Called with a checkpoint's saved extra state before its weights are used; returns a function
# to call once loading is done (e.g. to put the flags' LR bounds back).
PrepareResume = Callable[[dict], Callable[[], None]]


class Backend:
    """What the training loop needs from a backend (see the module docstring).

    Attributes:
        chunks: this rank's model chunks as megatron's schedules run them (one per virtual
            stage); `train()`/`eval()` switch their mode.
        optimizer: the handle `OptimizerParamScheduler` sets the LR and weight decay on.
        format_name: the checkpoint format, for messages ("megatron", "DeepSpeed").
    """

    chunks: list
    optimizer: object
    format_name: str
    uses_deepspeed_format: bool = False

    def __init__(self, num_microbatches: int, seq_length: int, micro_batch_size: int):
        self.num_microbatches = num_microbatches
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size

    def data_iterators(self, micro: list):
        """One iterator per model chunk over the same micro-batches (every stage reads them)."""
        if len(self.chunks) == 1:
            return iter(micro)
        return [iter(micro) for _ in self.chunks]

    def train_step(self, forward_step, micro: list) -> StepResult:
        """Forward, backward and update on this rank's micro-batches of one global batch."""
        raise NotImplementedError

    def eval_step(self, forward_step, micro: list) -> list:
        """Forward only; the loss functions' reports (on the last pipeline stage, else [])."""
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=self.data_iterators(micro),
            model=self.chunks,
            num_microbatches=self.num_microbatches,
            seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size,
            forward_only=True,
        )

    def save(self, root, iteration: int, extra: dict) -> str:
        """Saves a checkpoint (collective); returns where, for the log line."""
        raise NotImplementedError

    def find_checkpoint(self, root, iteration: Optional[int]) -> Optional[int]:
        """The iteration to resume from under `root` (None: no checkpoint there)."""
        raise NotImplementedError

    def load(
        self, root, iteration: int, weights_only: bool, prepare: PrepareResume
    ) -> tuple[int, dict]:
        """Loads `iteration` (weights only, or with the optimizer); returns (iteration, extra).

        `prepare` sees the saved extra state before the optimizer state is relied on.
        """
        raise NotImplementedError

    def no_checkpoint_message(self, root) -> str:
        """The error for `--load root` with nothing to resume."""
        raise NotImplementedError

    def after_schedule_override(self, lr: float) -> None:
        """Called after a resume that takes the LR schedule from the flags (`lr` = its LR now)."""


class MegatronBackend(Backend):
    """megatron DDP around the chunks, megatron-core's optimizer, dist checkpoints."""

    format_name = "megatron"

    def __init__(
        self,
        config: TransformerConfig,
        chunks: list,
        ddp_config: DistributedDataParallelConfig,
        optimizer_config: OptimizerConfig,
        **sizes,
    ):
        super().__init__(**sizes)
        self.chunks = wrap_with_ddp(config, chunks, ddp_config)
        self.optimizer = build_optimizer(optimizer_config, self.chunks)

    def train_step(self, forward_step, micro: list) -> StepResult:
        return train_step(
            forward_step,
            self.data_iterators(micro),
            self.chunks,
            self.optimizer,
            self.num_microbatches,
            self.seq_length,
            self.micro_batch_size,
        )

    def save(self, root, iteration: int, extra: dict) -> str:
        return str(ckpt.save_checkpoint(root, iteration, self.chunks, self.optimizer, extra))

    def find_checkpoint(self, root, iteration: Optional[int]) -> Optional[int]:
        return ckpt.select_checkpoint(root, iteration)

    def no_checkpoint_message(self, root) -> str:
        return f"--load {root}: no checkpoint there ({ckpt.LATEST_FILE} is missing)."

    def load(self, root, iteration, weights_only, prepare):
        restore = prepare(ckpt.read_extra_state(root, iteration))
        loaded, extra = ckpt.load_checkpoint(
            root, self.chunks, None if weights_only else self.optimizer, iteration
        )
        restore()
        return loaded, extra


class DeepSpeedBackend(Backend):
    """A DeepSpeed ZeRO engine around the one chunk (`deepspeed_backend.DeepSpeedTrainer`).

    DeepSpeed's checkpoints hold the whole state and are found by their `latest` file; the
    saved extra state is known only once loaded, so `prepare` runs after the engine loads.
    """

    format_name = "DeepSpeed"
    uses_deepspeed_format = True

    def __init__(
        self,
        chunks: list,
        ds_config: dict,
        optimizer_config: OptimizerConfig,
        parallel: ParallelConfig,
        diffusion: DiffusionConfig,
        seed: int,
        **sizes,
    ):
        from megatron_loopmdm.training import deepspeed_backend as ds

        super().__init__(**sizes)
        self.trainer = ds.DeepSpeedTrainer(
            chunks[0], ds_config, ds.AdamWConfig.from_optimizer_config(optimizer_config), parallel
        )
        # The engine trains; evaluation calls the module (ZeRO-3 gathers through its hooks),
        # whose `config` is the transformer config megatron's schedules look for.
        self.chunks = [self.trainer.module]
        self.optimizer = self.trainer.optimizer
        self.count_tokens = partial(count_loss_tokens, diffusion=diffusion, seed=seed)

    def train_step(self, forward_step, micro: list) -> StepResult:
        return self.trainer.train_step(
            forward_step, iter(micro), self.num_microbatches, num_tokens_func=self.count_tokens
        )

    def save(self, root, iteration: int, extra: dict) -> str:
        self.trainer.save_checkpoint(root, iteration, client_state=extra)
        directory = ckpt.checkpoint_dir(root, iteration)
        if "run_config" in extra and torch.distributed.get_rank() == 0:  # megatron's sidecar too
            sidecar = directory / ckpt.RUN_CONFIG_FILE
            staging = sidecar.with_suffix(".tmp")
            staging.write_text(extra["run_config"] + "\n")
            os.replace(staging, sidecar)
        return f"{directory} (DeepSpeed format)"

    def find_checkpoint(self, root, iteration: Optional[int]) -> Optional[int]:
        # The checkpoint DeepSpeed's `latest` file names, or --iteration's.
        marker = os.path.join(root, ckpt.DEEPSPEED_LATEST_FILE)
        if not os.path.isfile(marker):
            return None
        if iteration is not None:
            ckpt.saved_checkpoint_dir(root, iteration)  # or an error listing the saved ones
            return iteration
        return int(open(marker).read().strip().removeprefix("iter_"))

    def no_checkpoint_message(self, root) -> str:
        return (
            f"--load {root}: no DeepSpeed checkpoint (no '{ckpt.DEEPSPEED_LATEST_FILE}' file). "
            "Point --load at the --save directory of a --deepspeed run."
        )

    def load(self, root, iteration, weights_only, prepare):
        if weights_only:
            raise ValueError(
                "--finetune/--no-load-optim are not supported with --deepspeed checkpoints yet; "
                "resume the full state, or use the megatron backend."
            )
        loaded, extra = self.trainer.load_checkpoint(root, iteration)
        prepare(extra)()
        return loaded, extra

    def after_schedule_override(self, lr: float) -> None:
        self.trainer.set_lr(lr)


def build_backend(
    config: TransformerConfig,
    chunks: list,
    parallel: ParallelConfig,
    optimizer_config: OptimizerConfig,
    ddp_config: Optional[DistributedDataParallelConfig] = None,
    deepspeed_config: Optional[dict] = None,
    diffusion: Optional[DiffusionConfig] = None,
    seed: int = 0,
    **sizes,
) -> Backend:
    """DeepSpeed when a (prepared) DeepSpeed config is given, else megatron DDP + optimizer.

    `sizes` are `num_microbatches`, `seq_length` and `micro_batch_size` of one step;
    `ddp_config` defaults to megatron DDP with fp32 gradient reduction.
    """
    if deepspeed_config is not None:
        return DeepSpeedBackend(
            chunks, deepspeed_config, optimizer_config, parallel, diffusion, seed, **sizes
        )
    ddp_config = ddp_config or DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    return MegatronBackend(config, chunks, ddp_config, optimizer_config, **sizes)


def build_training(
    config: TransformerConfig,
    loop_config: LoopConfig,
    model_config: LoopMDMModelConfig,
    parallel: ParallelConfig,
    optimizer_config: OptimizerConfig,
    init_seed: Optional[int] = None,
    device: str = "cpu",
    use_te: Optional[bool] = None,
    **backend_options,
) -> Backend:
    """Builds a run from its configs: this rank's model chunks inside their backend.

    The one assembly of config -> model -> DDP (or DeepSpeed engine) -> optimizer, used by
    `pretrain_loopmdm.py` (`training.run.Run`), the distributed tests and the benchmarks.
    `backend_options` go to `build_backend` (DDP or DeepSpeed config, diffusion, seed, sizes).
    """
    chunks = build_model_chunks(
        config, loop_config, model_config, init_seed=init_seed, device=device, use_te=use_te
    )
    return build_backend(config, chunks, parallel, optimizer_config, **backend_options)
