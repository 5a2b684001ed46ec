"""Training with DeepSpeed ZeRO (stages 1-3) instead of megatron DDP and its optimizer.

All DeepSpeed coupling of the project lives here and in `training.deepspeed_config` (its JSON
config); model code never imports DeepSpeed, which is imported only when a `DeepSpeedTrainer`
is built (a clear error says how to install it).

The trainer wraps one *unwrapped* `LoopMDMModel` (no megatron DDP) and gives the same step as
the megatron path (`training.step.train_step`):

- **loss and gradients**: the gradient of (sum over the global batch of each micro-batch's
  `loss_sum`) / (tokens in the global batch). DeepSpeed divides each backward by the number of
  accumulation steps and averages gradients over data-parallel replicas, so each micro-batch
  backpropagates `loss_sum * data_parallel_size / global_tokens` without DeepSpeed's
  accumulation scaling. `global_tokens` must be known before the first backward: the caller
  passes a function that counts a micro-batch's loss tokens from the batch (padding and random
  lengths make them differ), or else every micro-batch must count the same number. The count
  is checked against the loss function's, all-reduced, before the update.
- **non-finite gradients**: DeepSpeed skips the update (fp32, bf16 and fp16); the step reports
  `update_successful=False` and no gradient norm, as the megatron path does.
- **optimizer**: torch's `AdamW` (so DeepSpeed does not JIT-compile its CPU Adam), with
  megatron's parameter groups: `wd_mult=0` (no weight decay) for biases and 1-D parameters
  (norms), as megatron's `OptimizerParamScheduler` applies them; clipping by DeepSpeed's
  `gradient_clipping` (the same `max_norm / (norm + 1e-6)` as megatron's).
- **tensor and sequence parallelism**: `MegatronMPU` answers DeepSpeed's model-parallel queries
  with megatron's tensor-parallel groups, so the gradient norm counts replicated parameters once.
  Under sequence parallelism the parameters tagged `sequence_parallel` (norms, loop adapter, loop
  embedding) see only this rank's slice of the sequence; a gradient hook sums their gradient over
  the tensor-parallel group *before* DeepSpeed accumulates or reduces it (what megatron's
  `finalize_model_grads` does), which works at every ZeRO stage.
- **a loop count that changes every step**: a looped layer runs S times in one forward, so
  ZeRO-3's prefetch trace (recorded module order) changes with S. The config passed to DeepSpeed
  turns prefetching off (`stage3_prefetch_bucket_size: 0`, `stage3_max_reuse_distance: 0`);
  a config asking for prefetching is refused. A parameter unused in a step (the injection
  adapter when S=1) must step with a zero gradient, as on the megatron path: ZeRO-3 would keep
  its gradient partition from an earlier step, so the trainer zeroes the partitions first.

The DeepSpeed JSON config is read, checked and prepared by `training.deepspeed_config`.
Pipeline parallelism is refused: DeepSpeed's own pipeline engine needs its `PipelineModule` and
supports only ZeRO-1; use the megatron backend (`--use-distributed-optimizer` is ZeRO-1 there).
"""

import os
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_loopmdm.checkpointing.dist_checkpoint import DEEPSPEED_LATEST_FILE
from megatron_loopmdm.distributed.parallel import ParallelConfig
from megatron_loopmdm.training.deepspeed_config import zero_stage
from megatron_loopmdm.training.step import StepResult, reduce_intermediate_loss, sum_reports

import torch
from megatron.core import parallel_state

# DeepSpeed merges the client state into its own checkpoint dict; ours lives under one key.
_CLIENT_KEY = "megatron_loopmdm"


def import_deepspeed():
    """Imports DeepSpeed, or raises an ImportError that says how to get it."""
    try:
        import deepspeed
    except ImportError as error:
        raise ImportError(
            "The DeepSpeed backend (--deepspeed) needs the deepspeed package: "
            "`pip install deepspeed==0.19.8` (`make install` installs it), or train without "
            "--deepspeed on the megatron backend."
        ) from error
    _skip_cpu_shared_memory_comm(deepspeed)
    return deepspeed


def _skip_cpu_shared_memory_comm(deepspeed) -> None:
    """On the CPU accelerator, tells DeepSpeed its shared-memory all-reduce op is unavailable.

    DeepSpeed JIT-compiles that C++ op (about a minute and 1.4 GB of compiler memory, again for
    every virtual environment path) when it first sets up its communication backend, for the
    all-reduce of its inference kernels (`module_inject`). Training never calls it: its
    collectives go through torch.distributed (gloo), so skipping the build changes no result
    and no C++ compiler is needed to train on CPU.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class MegatronMPU:
    """The `mpu` DeepSpeed asks for, answered from megatron's `parallel_state`.

    DeepSpeed's "model parallel" means the ranks that split one copy of the weights; with
    pipeline parallelism refused that is megatron's tensor-parallel group. `parallel_state`
    itself lacks the `get_model_parallel_*` names DeepSpeed calls. DeepSpeed's sequence-parallel
    queries (DeepSpeed-Ulysses) are deliberately not answered: megatron's sequence parallelism
    lives inside the tensor-parallel group.
    """

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list:
        return list(parallel_state._DATA_PARALLEL_GLOBAL_RANKS)

    def get_pipeline_model_parallel_group(self):
        return parallel_state.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()


@dataclass
class AdamWConfig:
    """The run's AdamW settings (megatron's `OptimizerConfig` names)."""

    lr: float
    """Initial learning rate; `DeepSpeedTrainer.set_lr` changes it per step."""

    weight_decay: float = 0.1
    """Decoupled weight decay; `set_weight_decay` changes it per step."""

    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8

    decay_biases_and_norms: bool = False
    """Also decay biases and 1-D parameters (norms). megatron's groups give them `wd_mult=0`,
    but only megatron's `OptimizerParamScheduler` applies `wd_mult`: megatron's optimizer
    stepped without that scheduler decays every parameter. True reproduces that."""

    @classmethod
    def from_optimizer_config(cls, config, decay_biases_and_norms: bool = False) -> "AdamWConfig":
        """From a megatron `OptimizerConfig` (e.g. `setup.default_optimizer_config`)."""
        if config.optimizer != "adam" or not config.decoupled_weight_decay:
            raise ValueError(
                f"The DeepSpeed backend trains with AdamW; --optimizer {config.optimizer} "
                f"(decoupled weight decay {config.decoupled_weight_decay}) is not supported."
            )
        return cls(
            config.lr,
            config.weight_decay,
            config.adam_beta1,
            config.adam_beta2,
            config.adam_eps,
            decay_biases_and_norms,
        )


def adamw_param_groups(
    model: torch.nn.Module, weight_decay: float, decay_biases_and_norms: bool = False
) -> list:
    """megatron's default groups: `wd_mult=0` for biases and 1-D parameters (norms)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (param.dim() == 1 or name.endswith(".bias")) and not decay_biases_and_norms:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0},
    ]
    return [group for group in groups if group["params"]]


def _sum_over_tensor_parallel(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
    return grad


def register_sequence_parallel_grad_hooks(model: torch.nn.Module) -> int:
    """Sums the gradients of `sequence_parallel` parameters over the tensor-parallel group.

    The hook runs on each parameter's gradient of one backward pass, after autograd has summed
    the contributions of every loop iteration and before the gradient is accumulated or handed
    to DeepSpeed's reduction, so it is correct at every ZeRO stage and with accumulation.
    Every tensor-parallel rank holds the same tagged parameters in the same order, so the
    collectives match.

    Returns:
        The number of parameters hooked.
    """
    count = 0
    for param in model.parameters():
        if getattr(param, "sequence_parallel", False) and param.requires_grad:
            param.register_hook(_sum_over_tensor_parallel)
            count += 1
    return count


# The classes DeepSpeed pickles into its optimizer files (ZeRO 1-3, fp32/bf16/fp16).
DEEPSPEED_ALLOWED_GLOBALS = (
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
)


def _read_checkpoints_safely(engine) -> None:
    """Makes the engine read its files with `torch.load(weights_only=True)` and the allow-list
    (DeepSpeed's own reader uses `weights_only=False`, which runs code from a crafted file)."""
    import importlib

    from megatron_loopmdm.checkpointing.safe_load import safe_torch_load

    allowed = [getattr(importlib.import_module(m), n) for m, n in DEEPSPEED_ALLOWED_GLOBALS]
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_torch_load(
        path, map_location, allowed
    )


class DeepSpeedTrainer:
    """A `LoopMDMModel` trained by a DeepSpeed engine (ZeRO stage from the config).

    Args:
        model: this rank's unwrapped model (`setup.build_model_chunks(...)[0]`).
        ds_config: the output of `prepare_deepspeed_config`.
        adamw: the optimizer settings.
        parallel: the run's layout (sequence parallelism adds gradient hooks).
    """

    def __init__(
        self, model: torch.nn.Module, ds_config: dict, adamw: AdamWConfig, parallel: ParallelConfig
    ):
        deepspeed = import_deepspeed()
        if parallel.sequence_parallel:
            register_sequence_parallel_grad_hooks(model)
        self.optimizer = torch.optim.AdamW(
            adamw_param_groups(model, adamw.weight_decay, adamw.decay_biases_and_norms),
            lr=adamw.lr,
            betas=(adamw.adam_beta1, adamw.adam_beta2),
            eps=adamw.adam_eps,
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=ds_config, mpu=MegatronMPU()
        )
        self.data_parallel_size = parallel.data_parallel_size(
            parallel.world_size or torch.distributed.get_world_size()
        )
        self.zero_stage = zero_stage(ds_config)

    @property
    def module(self) -> torch.nn.Module:
        """The model (its parameters are ZeRO-3 partitions outside forward/backward)."""
        return self.engine.module

    def set_lr(self, lr: float) -> None:
        """Sets the learning rate of every parameter group for the next step."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def set_weight_decay(self, weight_decay: float) -> None:
        """Sets the weight decay for the next step (times each group's `wd_mult`)."""
        for group in self.optimizer.param_groups:
            group["weight_decay"] = weight_decay * group["wd_mult"]

    def train_step(
        self,
        forward_step_func,
        data_iterator,
        num_microbatches: int,
        num_tokens_func: Optional[Callable[[dict], int]] = None,
    ) -> StepResult:
        """Forward, backward and optimizer step on this rank's share of one global batch.

        Each micro-batch backpropagates `loss_sum * dp / global_tokens`, so the global token
        count must be known before the first backward. With `num_tokens_func` (a micro-batch's
        loss token count from the batch alone, e.g. its valid positions) this rank's
        micro-batches are read first and counted, so micro-batches may differ (padding, random
        lengths). Without it every micro-batch must count the same tokens (b * s).

        `forward_step_func` is `step.make_forward_step(...)` (its loss function returns
        `(loss_sum, num_tokens, report)`, `report["nelbo"] = [loss_sum, num_tokens]`);
        `data_iterator` yields `num_microbatches` micro-batches, the config's accumulation steps.
        Returns the global per-token NELBO, the grad norm before clipping (None when DeepSpeed
        skipped the update for non-finite gradients) and whether it updated.
        """
        engine = self.engine
        if num_microbatches != engine.gradient_accumulation_steps():
            raise ValueError(
                f"{num_microbatches} micro-batches per step, but the DeepSpeed config has "
                f"gradient_accumulation_steps={engine.gradient_accumulation_steps()}."
            )
        data_iterator, global_tokens = self._count_tokens_first(
            data_iterator, num_microbatches, num_tokens_func
        )
        engine.train()
        if self.zero_stage == 3:
            # ZeRO-3 overwrites a parameter's gradient partition only when the parameter gets a
            # gradient, so one unused this step (the injection adapter when S=1) would step
            # with its gradient from an earlier step. The megatron path gives it zero.
            engine.optimizer.grad_partitions_flat_buffer.zero_()
        reports = []
        for i in range(num_microbatches):
            output, loss_func = forward_step_func(data_iterator, engine)
            loss_sum, num_tokens, report = loss_func(output)
            if global_tokens is None:
                global_tokens = int(num_tokens) * num_microbatches * self.data_parallel_size
            elif num_tokens_func is None and int(num_tokens) != reports[0]["nelbo"][1]:
                raise RuntimeError(
                    f"Micro-batches count different numbers of tokens ({int(num_tokens)} after "
                    f"{int(reports[0]['nelbo'][1])}): pass num_tokens_func to "
                    "DeepSpeedTrainer.train_step."
                )
            # DeepSpeed averages gradients over data-parallel replicas: scaling by the replica
            # count gives the gradient of the global loss sum over the global token count.
            engine.backward(
                loss_sum * (self.data_parallel_size / global_tokens), scale_wrt_gas=False
            )
            reports.append(report)
            if i < num_microbatches - 1:
                engine.step()  # only counts the micro-step: not an accumulation boundary
        total = sum_reports(reports, "nelbo")
        if int(total[1]) != int(global_tokens):
            raise RuntimeError(
                f"The global batch holds {int(total[1])} tokens, not the {int(global_tokens)} its "
                "gradients were scaled for (num_tokens_func disagrees with the loss function, or "
                "data-parallel ranks saw different micro-batch sizes)."
            )
        loss_by_t = None
        if all("nelbo_by_t" in r for r in reports):
            loss_by_t = sum_reports(reports, "nelbo_by_t")
        intermediate_loss = reduce_intermediate_loss(reports)
        engine.step()  # the accumulation boundary: clip and update (skipped if not finite)
        applied = bool(engine.was_step_applied())
        grad_norm = engine.get_global_grad_norm() if applied else None
        return StepResult(
            loss=(total[0] / total[1]).item(),
            grad_norm=None if grad_norm is None else float(grad_norm),
            update_successful=applied,
            loss_by_t=loss_by_t,
            intermediate_loss=intermediate_loss,
        )

    def _count_tokens_first(self, data_iterator, num_microbatches: int, num_tokens_func):
        """(this rank's micro-batches, the global loss-token count), or (`data_iterator`, None)."""
        if num_tokens_func is None:
            return data_iterator, None
        batches = [next(data_iterator) for _ in range(num_microbatches)]
        global_tokens = self._sum_over_data_parallel(
            torch.tensor([float(sum(num_tokens_func(batch) for batch in batches))])
        ).item()
        return iter(batches), global_tokens

    @staticmethod
    def _sum_over_data_parallel(tensor: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(tensor, group=parallel_state.get_data_parallel_group())
        return tensor

    def save_checkpoint(self, save_dir, iteration: int, client_state: Optional[dict] = None):
        """Saves DeepSpeed's checkpoint under `save_dir/iter_<iteration>` and updates `latest`.

        Collective: every rank calls it. `client_state` (e.g. data-loader position) comes back
        from `load_checkpoint`.
        """
        state = {_CLIENT_KEY: {"iteration": iteration, "client_state": dict(client_state or {})}}
        self.engine.save_checkpoint(
            str(save_dir), tag=f"iter_{iteration:07d}", client_state=state, save_latest=True
        )

    def load_checkpoint(self, load_dir, iteration: Optional[int] = None) -> tuple:
        """Loads `load_dir/iter_<iteration>`, or by default the checkpoint named by
        `load_dir/latest`; returns (iteration, client_state).

        Raises:
            FileNotFoundError: when `load_dir` holds no DeepSpeed checkpoint.
        """
        if not os.path.isfile(os.path.join(load_dir, DEEPSPEED_LATEST_FILE)):
            raise FileNotFoundError(
                f"--load {load_dir}: no DeepSpeed checkpoint (no '{DEEPSPEED_LATEST_FILE}' file). "
                "Point --load at the --save directory of a --deepspeed run."
            )
        _read_checkpoints_safely(self.engine)
        tag = None if iteration is None else f"iter_{iteration:07d}"
        path, client_state = self.engine.load_checkpoint(str(load_dir), tag=tag)
        if path is None:
            raise FileNotFoundError(f"--load {load_dir}: DeepSpeed found no checkpoint to load.")
        if _CLIENT_KEY not in client_state:
            raise ValueError(
                f"--load {load_dir}: the DeepSpeed checkpoint was not saved by "
                "DeepSpeedTrainer.save_checkpoint (no iteration in it)."
            )
        ours = client_state[_CLIENT_KEY]
        return ours["iteration"], ours["client_state"]
