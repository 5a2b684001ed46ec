"""The pre-training run: set-up from parsed arguments, the training loop, validation, saving.

`pretrain(args)` is what `pretrain_loopmdm.py` calls after parsing; everything else takes
explicit objects.
"""

import dataclasses
import math
import os
import signal
from functools import partial
from typing import Optional

import megatron_loopmdm.training.checkpointing as ckpt
from megatron_loopmdm.data.mock import MockDiffusionDataset
from megatron_loopmdm.data.sampler import build_data_loader
from megatron_loopmdm.diffusion.config import DiffusionConfig
from megatron_loopmdm.diffusion.noise import VALIDATION_T_GRID, validation_grid
from megatron_loopmdm.distributed.parallel import (
    any_rank,
    destroy_distributed,
    initialize_distributed,
    set_seed,
)
from megatron_loopmdm.models.attention_masks import anneal_progress
from megatron_loopmdm.models.builder import replace_size, transformer_config
from megatron_loopmdm.models.config import LoopConfig, LoopMDMModelConfig
from megatron_loopmdm.models.flops import flops_per_token
from megatron_loopmdm.models.loop_sampling import draw_num_loops
from megatron_loopmdm.models.pipeline_layout import resolve_pipeline_layout
from megatron_loopmdm.models.sizes import ModelSize, get_model_size
from megatron_loopmdm.training.arguments import parallel_config, use_transformer_engine
from megatron_loopmdm.training.backend import Backend, build_training
from megatron_loopmdm.training.logging import TrainingLogger, print_rank_last
from megatron_loopmdm.training.resume import (
    STOP_SIGNALS,
    acquire_save_lock,
    check_checkpoint_format,
    check_mask_token_id,
    check_schedule,
    match_param_group_lrs,
    save_unless_diverging,
)
from megatron_loopmdm.training.run_config import run_config_json
from megatron_loopmdm.training.setup import default_optimizer_config
from megatron_loopmdm.training.step import make_forward_step

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

EVAL_T_GRID = VALIDATION_T_GRID  # the validation quadrature: `diffusion.noise.validation_grid`


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many non-finite steps); the message says why."""


def model_size_from_args(args) -> ModelSize:
    """The named size with command-line overrides applied."""
    base = get_model_size(args.model_size) if args.model_size else get_model_size("debug")
    changes = {
        name: getattr(args, name)
        for name in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "seq_length",
            "normalization",
            "swiglu",
        )
        if getattr(args, name) is not None
    }
    if args.loop_layers is not None:
        changes["loop_layers"] = tuple(args.loop_layers)
    if args.max_loops is not None:
        changes["max_loops"] = args.max_loops
    changes.update(_ar_architecture_changes(args))
    if "hidden_size" in changes and "ffn_hidden_size" not in changes:
        changes["ffn_hidden_size"] = 4 * changes["hidden_size"]
    return replace_size(base, **changes)


def _ar_architecture_changes(args) -> dict:
    """ModelSize fields of imported AR models (--kv-channels, --norm-epsilon, ...)."""
    changes = {}
    if getattr(args, "kv_channels", None) is not None:
        changes["kv_channels"] = args.kv_channels
    if getattr(args, "norm_epsilon", None) is not None:
        changes["layernorm_epsilon"] = args.norm_epsilon
    for name in ("qk_layernorm", "add_qkv_bias"):
        if getattr(args, name, False):
            changes[name] = True
    return changes


def _vocab_and_tokenizer(args):
    if args.mock_data:
        mask_token_id = args.vocab_size - 1 if args.mask_token_id is None else args.mask_token_id
        return None, args.vocab_size, mask_token_id
    from megatron_loopmdm.data import build_tokenizer

    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                                args.merge_file, eod_token=args.eod_token)  # fmt: skip
    mask_token_id = tokenizer.mask if args.mask_token_id is None else args.mask_token_id
    check_mask_token_id(mask_token_id, tokenizer.vocab_size, "the tokenizer's vocabulary")
    return tokenizer, tokenizer.vocab_size, mask_token_id


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """The vocabulary padded to a multiple of `divisible_by`, and of the TP size.

    Megatron-LM pads to a multiple of `divisible_by x tensor_parallel`, so the model (and its
    loss curve and checkpoints) change with the TP size. Padding to a multiple of
    `divisible_by` that TP also divides keeps one padded size across layouts whenever possible.
    """
    padded = math.ceil(vocab_size / divisible_by) * divisible_by
    if padded % tensor_parallel:
        multiple = divisible_by * tensor_parallel
        padded = math.ceil(vocab_size / multiple) * multiple
    return int(padded)


def _datasets(args, tokenizer, seq_length, vocab_size):
    num_train = args.train_iters * args.global_batch_size
    num_valid = 0
    if args.eval_interval:
        evals = args.train_iters // args.eval_interval + 1
        num_valid = evals * args.eval_iters * args.global_batch_size
    if args.mock_data:
        train = MockDiffusionDataset(num_train, seq_length, vocab_size, args.seed)
        valid = MockDiffusionDataset(max(num_valid, 1), seq_length, vocab_size, args.seed + 1)
        return train, valid
    if args.sft:
        from megatron_loopmdm.data.sft import SFTConfig, build_sft_datasets

        sft_config = SFTConfig(
            seq_length, args.data_path, args.split, args.train_data_path, args.valid_data_path,
            args.seed, args.sft_packing, args.sft_eos_in_loss,
        )  # fmt: skip
        return build_sft_datasets(sft_config, tokenizer, [num_train, num_valid])
    from megatron_loopmdm.data import DataConfig, build_train_valid_test_datasets

    data_config = DataConfig(
        seq_length=seq_length,
        data_path=args.data_path,
        split=args.split,
        train_data_path=args.train_data_path,
        valid_data_path=args.valid_data_path,
        test_data_path=args.test_data_path,
        seed=args.seed,
        path_to_cache=args.data_cache_path,
        per_document_attention=args.per_document_attention,
    )
    train, valid, _ = build_train_valid_test_datasets(
        data_config, tokenizer, [num_train, num_valid or None, None]
    )
    return train, valid


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
        self.tokenizer, vocab, mask_token_id = _vocab_and_tokenizer(args)
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
        self.train_data, self.valid_data = _datasets(args, self.tokenizer, size.seq_length, vocab)

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
        from megatron_loopmdm.training import deepspeed_backend as ds

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


def train(run: Run) -> None:
    """The training loop, from a fresh start or a resumed checkpoint."""
    args = run.args
    iteration, skipped = run.load() if args.load else (0, 0)
    consecutive_skipped = 0
    logger = TrainingLogger(
        args.train_iters,
        args.log_interval,
        run.parallel.world_size,
        args.tensorboard_dir,
        args.wandb_project,
        args.metrics_file,
    )
    if iteration >= args.train_iters:
        print_rank_last(
            f" the checkpoint is at iteration {iteration}, already at --train-iters "
            f"{args.train_iters}: nothing to train. Raise --train-iters to continue."
        )
        logger.close()
        return
    train_iter = run.loader(run.train_data, iteration * args.global_batch_size)
    eval_loops = args.eval_num_loops or run.loop_config.max_loops
    tokens_per_step = args.global_batch_size * run.size.seq_length
    stop = {"signal": None}

    def _on_signal(signum, _frame):
        stop["signal"] = signum

    if args.save:
        ckpt.start_writer_helper()  # before any signal can arrive: see its docstring
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _on_signal)
    while iteration < args.train_iters and not any_rank(stop["signal"] is not None):
        num_loops = draw_num_loops(run.loop_config, args.seed, iteration)
        for chunk in run.chunks:
            chunk.train()
        result = run.step(num_loops, run.micro_batches(train_iter), iteration)
        iteration += 1
        if result.update_successful:
            run.scheduler.step(increment=1)
            consecutive_skipped = 0
        else:
            skipped += 1
            consecutive_skipped += 1
        logger.record(
            iteration,
            result,
            num_loops,
            tokens_per_step,
            run.flops(num_loops, tokens_per_step),
            run.learning_rate,
        )
        logger.maybe_log(iteration, run.learning_rate, args.global_batch_size)
        if consecutive_skipped >= args.max_skipped_iterations:
            logger.close()
            raise TrainingError(
                f"{consecutive_skipped} consecutive iterations had a non-finite loss or "
                f"gradients (last at iteration {iteration}); stopping. Lower --lr, raise "
                "--lr-warmup-iters or check the data, then resume from the last checkpoint."
            )
        if args.eval_interval and iteration % args.eval_interval == 0:
            for chunk in run.chunks:
                chunk.eval()
            with torch.no_grad():
                # The same validation batches every time: evaluations compare across iterations.
                nelbo = run.evaluate(run.loader(run.valid_data, 0), eval_loops)
            if nelbo is not None:
                logger.log_validation(iteration, nelbo, eval_loops)
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save_unless_diverging(run, iteration, skipped, consecutive_skipped)
    stopped = iteration < args.train_iters
    # (A stop at a multiple of --save-interval has just been saved by the periodic save.)
    if args.save and (not args.save_interval or iteration % args.save_interval):
        save_unless_diverging(run, iteration, skipped, consecutive_skipped)
    logger.close()
    if stopped:
        name = signal.Signals(stop["signal"]).name if stop["signal"] else "a signal on another rank"
        print_rank_last(f" stopped by {name} at iteration {iteration}")


def pretrain(args) -> None:
    """Builds the run from parsed arguments and trains it."""
    run = Run(args)
    lock = None
    try:
        if args.save:
            lock = acquire_save_lock(args.save)
        train(run)
    finally:
        if lock is not None:
            lock.release()
        destroy_distributed()
