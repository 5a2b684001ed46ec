"""One pre-training run's parts: configs, model, backend, schedule and data, and what the
training loop (`training.loop.train`) asks of them: a step, a validation, a save, a load."""

import dataclasses
import os
from functools import partial
from typing import Optional

from megatron_loopmdm.data.sampler import build_data_loader
from megatron_loopmdm.diffusion.config import DiffusionConfig
from megatron_loopmdm.diffusion.noise import validation_grid
from megatron_loopmdm.distributed.parallel import initialize_distributed, set_seed
from megatron_loopmdm.models.attention_masks import anneal_progress
from megatron_loopmdm.models.builder import transformer_config
from megatron_loopmdm.models.config import LoopConfig, LoopMDMModelConfig
from megatron_loopmdm.models.flops import flops_per_token
from megatron_loopmdm.models.pipeline_layout import resolve_pipeline_layout
from megatron_loopmdm.training.arguments import parallel_config, use_transformer_engine
from megatron_loopmdm.training.backend import Backend, build_training
from megatron_loopmdm.training.inputs import (
    datasets,
    model_size_from_args,
    padded_vocab_size,
    vocab_and_tokenizer,
)
from megatron_loopmdm.training.logging import print_rank_last
from megatron_loopmdm.training.resume import (
    check_checkpoint_format,
    check_schedule,
    match_param_group_lrs,
)
from megatron_loopmdm.training.run_config import run_config_json
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
    """Everything one pre-training run holds: configs, model, backend, schedule and data."""

    def __init__(self, args):
        self.args = args
        parallel = parallel_config(args, int(os.environ.get("WORLD_SIZE", "1")))
        self.size = size = model_size_from_args(args)
        self.loop_config = LoopConfig(
            loop_layers=size.loop_layers,
            max_loops=size.max_loops,
            loop_sampling=args.loop_sampling,
            input_injection=args.loop_input_injection,
            loop_embedding=args.loop_embedding,
            backprop_depth=args.loop_backprop_depth,
            state_noise=args.loop_state_noise,
        )
        self.device = initialize_distributed(parallel, args.device)
        set_seed(args.seed)
        self.tokenizer, vocab, mask_token_id = vocab_and_tokenizer(args)
        self.dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
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
            time_eps=args.time_eps,
            time_sampling=args.time_sampling,
            global_batch_size=args.global_batch_size,
            random_length_prob=args.random_length_prob,
        )
        self.dp_size = self.parallel.data_parallel_size()
        self.num_microbatches = args.global_batch_size // (args.micro_batch_size * self.dp_size)
        self.backend = self._backend()
        self.scheduler = self._scheduler()
        self.train_data, self.valid_data = datasets(args, self.tokenizer, size.seq_length, vocab)

    def _transformer_config(self):
        args = self.args
        recompute = {}
        if args.recompute_granularity == "full":
            recompute = dict(
                recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
            )
        elif args.recompute_granularity == "selective":
            recompute = dict(recompute_granularity="selective")
        return transformer_config(
            self.size,
            self.parallel,
            params_dtype=self.dtype,
            calculate_per_token_loss=True,
            hidden_dropout=args.hidden_dropout,
            attention_dropout=args.attention_dropout,
            **recompute,
        )

    def _model_config(self, vocab: int, mask_token_id: int) -> LoopMDMModelConfig:
        args = self.args
        return LoopMDMModelConfig(
            vocab_size=args.padded_vocab_size
            or padded_vocab_size(
                vocab, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
            ),
            max_sequence_length=args.max_position_embeddings or self.size.seq_length,
            mask_token_id=mask_token_id,
            position_embedding_type=args.position_embedding_type,
            rotary_base=args.rotary_base,
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            rope_scaling=args.rope_scaling,
            shift_logits=args.shift_logits,
        )

    def _optimizer_config(self):
        args = self.args
        return default_optimizer_config(
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            params_dtype=self.dtype,
            use_distributed_optimizer=args.use_distributed_optimizer,
        )

    def _deepspeed_config(self) -> Optional[dict]:
        """The prepared DeepSpeed config with --deepspeed, else None (the megatron backend)."""
        args = self.args
        if not args.deepspeed:
            return None
        from megatron_loopmdm.training import deepspeed_config as ds

        return ds.prepare_deepspeed_config(
            ds.load_deepspeed_config(args.deepspeed_config),
            self.parallel,
            micro_batch_size=args.micro_batch_size,
            global_batch_size=args.global_batch_size,
            data_parallel_size=self.dp_size,
            params_dtype=self.dtype,
            clip_grad=args.clip_grad,
        )

    def _backend(self) -> Backend:
        args = self.args
        return build_training(
            self.config,
            self.loop_config,
            self.model_config,
            self.parallel,
            self._optimizer_config(),
            init_seed=args.seed,
            device=self.device,
            use_te=use_transformer_engine(args.transformer_impl),
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=args.overlap_grad_reduce,
                use_distributed_optimizer=args.use_distributed_optimizer,
            ),
            deepspeed_config=self._deepspeed_config(),
            diffusion=self.diffusion,
            seed=args.seed,
            num_microbatches=self.num_microbatches,
            seq_length=self.size.seq_length,
            micro_batch_size=args.micro_batch_size,
        )

    def _scheduler(self) -> OptimizerParamScheduler:
        args = self.args
        decay_iters = args.lr_decay_iters or args.train_iters
        override = getattr(args, "override_opt_param_scheduler", False)
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=args.lr,
            min_lr=args.min_lr,
            lr_warmup_steps=args.lr_warmup_iters,
            lr_decay_steps=decay_iters,
            lr_decay_style=args.lr_decay_style,
            start_wd=args.weight_decay,
            end_wd=args.weight_decay,
            wd_incr_steps=decay_iters,
            wd_incr_style="constant",
            wsd_decay_steps=args.lr_wsd_decay_iters,
            lr_wsd_decay_style=args.lr_wsd_decay_style,
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
            self.args.seed,
            num_loops,
            anneal_progress=anneal_progress(iteration, self.args.attention_mask_anneal_iters),
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
                self.args.micro_batch_size,
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
        return {
            "args": vars(self.args),
            "consumed_samples": iteration * self.args.global_batch_size,
            "scheduler": self.scheduler.state_dict(),
            "skipped_iterations": skipped,
            "loop_config": dataclasses.asdict(self.loop_config),
            "model_config": dataclasses.asdict(self.model_config),
            "model_size": dataclasses.asdict(self.size),
            "run_config": run_config_json(
                {
                    "model_size": self.size,
                    "model_config": self.model_config,
                    "loop_config": self.loop_config,
                    "parallel": self.parallel,
                    "diffusion": self.diffusion,
                },
                str(self.dtype).removeprefix("torch."),
                # as given, even with --mock-data (the export copies the tokenizer from it)
                self.args.tokenizer_type,
                self.args.tokenizer_model,
            ),
        }

    def save(self, iteration: int, skipped: int) -> None:
        directory = self.backend.save(
            self.args.save, iteration, self.extra_state(iteration, skipped)
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
                f"--load {self.args.load} holds a different model ({'; '.join(differences)}). "
                "Pass the flags it was trained with (or its --model-size), and the tokenizer "
                "it was trained with."
            )

    def _prepare_resume(self, saved: dict, weights_only: bool):
        """Checks a checkpoint's saved state against this run before its optimizer state is
        used; returns what to do once it is loaded (put the flags' LR bounds back)."""
        self.check_checkpoint_compatible(saved)
        if weights_only or "scheduler" not in saved:
            return lambda: None
        check_schedule(self.args, saved["scheduler"], self.scheduler.state_dict())
        restore = match_param_group_lrs(self.optimizer, saved["scheduler"])
        return restore if self.args.override_opt_param_scheduler else (lambda: None)

    def load(self) -> tuple[int, int]:
        """Loads `--load`; returns (iteration, skipped iterations) to continue from."""
        args, backend = self.args, self.backend
        check_checkpoint_format(args.load, deepspeed=backend.uses_deepspeed_format)
        chosen = backend.find_checkpoint(args.load, getattr(args, "iteration", None))
        if chosen is None:
            if args.load == args.save:
                return 0, 0  # a fresh run that will save where it would resume from
            raise FileNotFoundError(backend.no_checkpoint_message(args.load))
        weights_only = args.finetune or args.no_load_optim
        iteration, extra = backend.load(
            args.load,
            chosen,
            weights_only,
            partial(self._prepare_resume, weights_only=weights_only),
        )
        if args.finetune:
            print_rank_last(
                f" loaded weights from {args.load} (iteration {iteration}) for "
                "fine-tuning; starting at iteration 0"
            )
            return 0, 0
        if not weights_only and "scheduler" in extra:
            self.scheduler.load_state_dict(extra["scheduler"])
            if args.override_opt_param_scheduler:
                backend.after_schedule_override(
                    self.scheduler.get_lr(self.optimizer.param_groups[0])
                )
        print_rank_last(f" resumed from {args.load} at iteration {iteration}")
        return iteration, extra.get("skipped_iterations", 0)

    def evaluate(self, loader_iter, num_loops: int) -> Optional[float]:
        """Validation NELBO per token on the fixed t-grid (`diffusion.noise.validation_grid`).

        The same definition as `evaluation.nelbo.nelbo_per_loops` (`tools/evaluate.py nelbo`).
        """
        batches = [self.micro_batches(loader_iter) for _ in range(self.args.eval_iters)]
        totals = torch.zeros(2)
        for t, stream in validation_grid():
            forward_step = make_forward_step(
                self.diffusion, self.args.seed, num_loops, fixed_t=t, stream=stream
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
