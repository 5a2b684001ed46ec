"""One pre-training run's parts: configs, model, backend, schedule and data, and what the
training loop (`training.loop.train`) asks of them: a step, a validation, a save, a load."""

import dataclasses
from functools import partial
from typing import Optional

from megatron_loopmdm.checkpointing.run_config import run_config_json
from megatron_loopmdm.data.sampler import build_data_loader
from megatron_loopmdm.diffusion.config import DiffusionConfig
from megatron_loopmdm.diffusion.noise import validation_grid
from megatron_loopmdm.distributed.parallel import initialize_distributed, set_seed
from megatron_loopmdm.models.attention_masks import anneal_progress
from megatron_loopmdm.models.builder import transformer_config
from megatron_loopmdm.models.config import LoopMDMModelConfig
from megatron_loopmdm.models.flops import flops_per_token
from megatron_loopmdm.models.pipeline_layout import resolve_pipeline_layout
from megatron_loopmdm.training.backend import Backend, build_training
from megatron_loopmdm.training.config import RunConfig
from megatron_loopmdm.training.inputs import (
    datasets,
    padded_vocab_size,
    vocab_and_tokenizer,
)
from megatron_loopmdm.training.logging import print_rank_last
from megatron_loopmdm.training.resume import (
    check_checkpoint_format,
    check_schedule,
    match_param_group_lrs,
)
from megatron_loopmdm.training.setup import default_optimizer_config
from megatron_loopmdm.training.step import make_forward_step

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

# Fields that shape the weights; loop span, S_max and sequence length may change.
_WEIGHT_SHAPING_FIELDS = {
    "model_size": (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "ffn_hidden_size",
        "num_query_groups",
        "normalization",
        "swiglu",
        "kv_channels",
        "qk_layernorm",
        "add_qkv_bias",
    ),
    "model_config": (
        "vocab_size",
        "position_embedding_type",
        "share_embeddings_and_output_weights",
    ),
    "loop_config": ("input_injection", "loop_embedding"),
}


class Run:
    """Everything one pre-training run holds: configs, model, backend, schedule and data.

    Built from the run's typed configuration (`training.config.RunConfig`, made from the command
    line by `training.arguments.run_config_from_args`); the steps below are what
    `training.loop.train` calls.
    """

    def __init__(self, config: RunConfig):
        self.run_config = config
        self.size = size = config.model_size
        self.loop_config = config.loop
        self.device = initialize_distributed(config.parallel, config.backend.device)
        set_seed(config.training.seed)
        self.tokenizer, vocab, mask_token_id = vocab_and_tokenizer(config.data)
        self.dtype = config.training.dtype
        parallel = config.parallel
        layout = resolve_pipeline_layout(
            parallel.pipeline_model_parallel_layout,
            size.num_layers,
            parallel.num_pipeline_chunks,
            self.loop_config,
        )
        self.parallel = dataclasses.replace(parallel, pipeline_model_parallel_layout=layout)
        self.config = self._transformer_config()
        self.model_config = self._model_config(vocab, mask_token_id)
        self.diffusion = DiffusionConfig(
            mask_token_id=mask_token_id,
            time_eps=config.diffusion.time_eps,
            time_sampling=config.diffusion.time_sampling,
            global_batch_size=config.training.global_batch_size,
            random_length_prob=config.diffusion.random_length_prob,
        )
        training = config.training
        self.dp_size = self.parallel.data_parallel_size()
        self.num_microbatches = training.global_batch_size // (
            training.micro_batch_size * self.dp_size
        )
        self.backend = self._backend()
        self.scheduler = self._scheduler()
        self.train_data, self.valid_data = datasets(config, self.tokenizer, size.seq_length, vocab)

    def _transformer_config(self):
        model = self.run_config.model
        recompute = {}
        if model.recompute_granularity == "full":
            recompute = dict(
                recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
            )
        elif model.recompute_granularity == "selective":
            recompute = dict(recompute_granularity="selective")
        return transformer_config(
            self.size,
            self.parallel,
            params_dtype=self.dtype,
            calculate_per_token_loss=True,
            hidden_dropout=model.hidden_dropout,
            attention_dropout=model.attention_dropout,
            **recompute,
        )

    def _model_config(self, vocab: int, mask_token_id: int) -> LoopMDMModelConfig:
        model = self.run_config.model
        return LoopMDMModelConfig(
            vocab_size=model.padded_vocab_size
            or padded_vocab_size(
                vocab, model.make_vocab_size_divisible_by, self.parallel.tensor_model_parallel_size
            ),
            max_sequence_length=model.max_position_embeddings or self.size.seq_length,
            mask_token_id=mask_token_id,
            position_embedding_type=model.position_embedding_type,
            rotary_base=model.rotary_base,
            share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
            rope_scaling=model.rope_scaling,
            shift_logits=model.shift_logits,
        )

    def _optimizer_config(self):
        optimization = self.run_config.optimization
        return default_optimizer_config(
            lr=optimization.lr,
            min_lr=optimization.min_lr,
            weight_decay=optimization.weight_decay,
            adam_beta1=optimization.adam_beta1,
            adam_beta2=optimization.adam_beta2,
            adam_eps=optimization.adam_eps,
            clip_grad=optimization.clip_grad,
            params_dtype=self.dtype,
            use_distributed_optimizer=self.run_config.backend.use_distributed_optimizer,
        )

    def _deepspeed_config(self) -> Optional[dict]:
        """The prepared DeepSpeed config with --deepspeed, else None (the megatron backend)."""
        backend, training = self.run_config.backend, self.run_config.training
        if not backend.deepspeed:
            return None
        from megatron_loopmdm.training import deepspeed_config as ds

        return ds.prepare_deepspeed_config(
            ds.load_deepspeed_config(backend.deepspeed_config),
            self.parallel,
            micro_batch_size=training.micro_batch_size,
            global_batch_size=training.global_batch_size,
            data_parallel_size=self.dp_size,
            params_dtype=self.dtype,
            clip_grad=self.run_config.optimization.clip_grad,
        )

    def _backend(self) -> Backend:
        config = self.run_config
        return build_training(
            self.config,
            self.loop_config,
            self.model_config,
            self.parallel,
            self._optimizer_config(),
            init_seed=config.training.seed,
            device=self.device,
            use_te=config.model.use_te,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=config.backend.overlap_grad_reduce,
                use_distributed_optimizer=config.backend.use_distributed_optimizer,
            ),
            deepspeed_config=self._deepspeed_config(),
            diffusion=self.diffusion,
            seed=config.training.seed,
            num_microbatches=self.num_microbatches,
            seq_length=self.size.seq_length,
            micro_batch_size=config.training.micro_batch_size,
        )

    def _scheduler(self) -> OptimizerParamScheduler:
        optimization = self.run_config.optimization
        decay_iters = optimization.lr_decay_iters or self.run_config.training.train_iters
        override = optimization.override_opt_param_scheduler
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=optimization.lr,
            min_lr=optimization.min_lr,
            lr_warmup_steps=optimization.lr_warmup_iters,
            lr_decay_steps=decay_iters,
            lr_decay_style=optimization.lr_decay_style,
            start_wd=optimization.weight_decay,
            end_wd=optimization.weight_decay,
            wd_incr_steps=decay_iters,
            wd_incr_style="constant",
            wsd_decay_steps=optimization.lr_wsd_decay_iters,
            lr_wsd_decay_style=optimization.lr_wsd_decay_style,
            # Differences are refused (or chosen by flag) in check_schedule before loading.
            override_opt_param_scheduler=override,
            use_checkpoint_opt_param_scheduler=not override,
        )

    @property
    def chunks(self) -> list:
        return self.backend.chunks

    @property
    def optimizer(self):
        return self.backend.optimizer

    def step(self, num_loops: int, micro: list, iteration: int = 0):
        """One training step on this rank's micro-batches of the global batch."""
        forward_step = make_forward_step(
            self.diffusion,
            self.run_config.training.seed,
            num_loops,
            anneal_progress=anneal_progress(
                iteration, self.run_config.training.attention_mask_anneal_iters
            ),
        )
        return self.backend.train_step(forward_step, micro)

    @property
    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def micro_batches(self, loader_iter) -> list:
        """This rank's micro-batches of the next global batch, on the run's device."""
        return [
            {k: v.to(self.device) for k, v in next(loader_iter).items()}
            for _ in range(self.num_microbatches)
        ]

    def loader(self, dataset, consumed_samples: int):
        return iter(
            build_data_loader(
                dataset,
                consumed_samples,
                self.run_config.training.micro_batch_size,
                parallel_state.get_data_parallel_rank(),
                self.dp_size,
            )
        )

    def flops(self, num_loops: int, tokens: int) -> float:
        return (
            flops_per_token(
                self.config,
                self.loop_config,
                self.model_config.vocab_size,
                self.size.seq_length,
                num_loops,
            )
            * tokens
        )

    def extra_state(self, iteration: int, skipped: int) -> dict:
        """The checkpoint's state besides the weights: position, schedule and configuration."""
        return {
            "consumed_samples": iteration * self.run_config.training.global_batch_size,
            "scheduler": self.scheduler.state_dict(),
            "skipped_iterations": skipped,
            "loop_config": dataclasses.asdict(self.loop_config),
            "model_config": dataclasses.asdict(self.model_config),
            "model_size": dataclasses.asdict(self.size),
            "run_config": self.run_config_json(),
        }

    def run_config_json(self) -> str:
        """The stored run configuration: the resolved model, layout and objective, and the
        other sections as configured (`checkpointing.run_config`)."""
        config = self.run_config
        return run_config_json(
            {
                "model_size": self.size,
                "model_config": self.model_config,
                "loop_config": self.loop_config,
                "parallel": self.parallel,
                "diffusion": self.diffusion,
                "model_options": config.model,
                "optimization": config.optimization,
                "backend": config.backend,
                # the tokenizer as given, even with --mock-data (the export copies it from here)
                "data": config.data,
                "checkpoint": config.checkpoint,
                "logging": config.logging,
                "training": config.training,
            }
        )

    def save(self, iteration: int, skipped: int) -> None:
        directory = self.backend.save(
            self.run_config.checkpoint.save, iteration, self.extra_state(iteration, skipped)
        )
        print_rank_last(f" saved checkpoint at iteration {iteration} to {directory}")

    def check_checkpoint_compatible(self, extra: dict) -> None:
        """Refuses a checkpoint whose architecture differs from this run's, naming the fields."""
        ours = {
            "model_size": dataclasses.asdict(self.size),
            "model_config": dataclasses.asdict(self.model_config),
            "loop_config": dataclasses.asdict(self.loop_config),
        }
        differences = [
            f"{field}: checkpoint {extra[group][field]!r}, this run {ours[group][field]!r}"
            for group, fields in _WEIGHT_SHAPING_FIELDS.items()
            if group in extra
            for field in fields
            if extra[group].get(field) != ours[group][field]
        ]
        if differences:
            raise ValueError(
                f"--load {self.run_config.checkpoint.load} holds a different model "
                f"({'; '.join(differences)}). "
                "Pass the flags it was trained with (or its --model-size), and the tokenizer "
                "it was trained with."
            )

    def _prepare_resume(self, saved: dict, weights_only: bool):
        """Checks a checkpoint's saved state against this run before its optimizer state is
        used; returns what to do once it is loaded (put the flags' LR bounds back)."""
        self.check_checkpoint_compatible(saved)
        if weights_only or "scheduler" not in saved:
            return lambda: None
        optimization = self.run_config.optimization
        check_schedule(
            optimization,
            self.run_config.checkpoint.load,
            saved["scheduler"],
            self.scheduler.state_dict(),
        )
        restore = match_param_group_lrs(self.optimizer, saved["scheduler"])
        return restore if optimization.override_opt_param_scheduler else (lambda: None)

    def load(self) -> tuple[int, int]:
        """Loads `--load`; returns (iteration, skipped iterations) to continue from."""
        checkpoint, backend = self.run_config.checkpoint, self.backend
        load = checkpoint.load
        check_checkpoint_format(load, deepspeed=backend.uses_deepspeed_format)
        chosen = backend.find_checkpoint(load, checkpoint.iteration)
        if chosen is None:
            if load == checkpoint.save:
                return 0, 0  # a fresh run that will save where it would resume from
            raise FileNotFoundError(backend.no_checkpoint_message(load))
        weights_only = checkpoint.finetune or checkpoint.no_load_optim
        iteration, extra = backend.load(
            load,
            chosen,
            weights_only,
            partial(self._prepare_resume, weights_only=weights_only),
        )
        if checkpoint.finetune:
            print_rank_last(
                f" loaded weights from {load} (iteration {iteration}) for "
                "fine-tuning; starting at iteration 0"
            )
            return 0, 0
        if not weights_only and "scheduler" in extra:
            self.scheduler.load_state_dict(extra["scheduler"])
            if self.run_config.optimization.override_opt_param_scheduler:
                backend.after_schedule_override(
                    self.scheduler.get_lr(self.optimizer.param_groups[0])
                )
        print_rank_last(f" resumed from {load} at iteration {iteration}")
        return iteration, extra.get("skipped_iterations", 0)

    def evaluate(self, loader_iter, num_loops: int) -> Optional[float]:
        """Validation NELBO per token on the fixed t-grid (`diffusion.noise.validation_grid`).

        The same definition as `evaluation.nelbo.nelbo_per_loops` (`tools/evaluate.py nelbo`).
        """
        batches = [
            self.micro_batches(loader_iter) for _ in range(self.run_config.logging.eval_iters)
        ]
        totals = torch.zeros(2)
        for t, stream in validation_grid():
            forward_step = make_forward_step(
                self.diffusion, self.run_config.training.seed, num_loops, fixed_t=t, stream=stream
            )
            for micro in batches:
                reports = self.backend.eval_step(forward_step, micro)
                if reports:
                    totals += torch.stack([r["nelbo"].cpu() for r in reports]).sum(0)
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return None
        torch.distributed.all_reduce(
            totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
        return (totals[0] / totals[1]).item()
