"""The command line of `pretrain_loopmdm.py`, shaped like Megatron-LM's.

Flags keep Megatron-LM's names and meanings; LoopMDM adds the loop and diffusion flags.
`parse_args` parses and validates the command line once; every incompatible combination is
rejected here, before any process group starts, with a message that says what to change.
`run_config_from_args` turns the namespace into the typed `training.config.RunConfig` that the
library takes: no other module of the package reads the namespace.
"""

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional

from megatron_loopmdm.distributed.parallel import ParallelConfig, virtual_pipeline_size
from megatron_loopmdm.models.builder import replace_size
from megatron_loopmdm.models.config import INPUT_INJECTIONS, LOOP_SAMPLINGS, LoopConfig
from megatron_loopmdm.models.sizes import MODEL_SIZES, ModelSize, get_model_size
from megatron_loopmdm.training.config import (
    BackendConfig,
    CheckpointConfig,
    DataSourceConfig,
    DiffusionOptions,
    LoggingConfig,
    ModelOptions,
    OptimizationConfig,
    RunConfig,
    TrainingConfig,
)


def _model_args(parser):
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model-size",
        choices=sorted(MODEL_SIZES),
        default=None,
        help="a named size; the flags below override its fields",
    )
    group.add_argument("--num-layers", type=int)
    group.add_argument("--hidden-size", type=int)
    group.add_argument("--ffn-hidden-size", type=int)
    group.add_argument("--num-attention-heads", type=int)
    group.add_argument("--num-query-groups", type=int)
    group.add_argument("--seq-length", type=int)
    group.add_argument("--max-position-embeddings", type=int)
    group.add_argument(
        "--position-embedding-type", choices=["rope", "learned_absolute"], default="rope"
    )
    group.add_argument("--rotary-base", type=int, default=10000)
    group.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"])
    group.add_argument("--swiglu", action="store_true", default=None)
    group.add_argument("--no-swiglu", dest="swiglu", action="store_false")
    group.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    group.add_argument("--hidden-dropout", type=float, default=0.0)
    group.add_argument("--attention-dropout", type=float, default=0.0)
    group.add_argument(
        "--transformer-impl",
        choices=["local", "transformer_engine"],
        default=None,
        help="layer spec: local (torch, any device) or transformer_engine (needs it installed); "
        "default: transformer_engine when installed on GPU, else local",
    )


def _parallel_args(parser):
    group = parser.add_argument_group("parallelism")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    group.add_argument("--num-layers-per-virtual-pipeline-stage", type=int)
    group.add_argument("--decoder-first-pipeline-num-layers", type=int)
    group.add_argument("--decoder-last-pipeline-num-layers", type=int)
    group.add_argument(
        "--pipeline-model-parallel-layout",
        default=None,
        help='megatron layout string, e.g. "Et*3|t*5L", or "auto" (balanced by '
        "expected compute, keeping the loop block in one stage)",
    )
    group.add_argument("--sequence-parallel", action="store_true")
    group.add_argument("--use-distributed-optimizer", action="store_true")
    group.add_argument("--overlap-grad-reduce", action="store_true")
    group.add_argument("--recompute-granularity", choices=["full", "selective"])
    group.add_argument("--deepspeed", action="store_true", help="DeepSpeed ZeRO backend")
    group.add_argument("--deepspeed-config", help="DeepSpeed JSON config (ZeRO stage 1, 2, 3)")
    group.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available"
    )


def _training_args(parser):
    group = parser.add_argument_group("training")
    group.add_argument("--micro-batch-size", type=int, required=True)
    group.add_argument("--global-batch-size", type=int)
    group.add_argument("--train-iters", type=int, required=True)
    group.add_argument("--lr", type=float, required=True)
    group.add_argument("--min-lr", type=float, default=0.0)
    group.add_argument(
        "--lr-decay-style", choices=["constant", "linear", "cosine", "WSD"], default="cosine"
    )
    group.add_argument("--lr-warmup-iters", type=int, default=0)
    group.add_argument("--lr-decay-iters", type=int)
    group.add_argument("--lr-wsd-decay-iters", type=int)
    group.add_argument(
        "--lr-wsd-decay-style",
        choices=["linear", "cosine", "exponential", "minus_sqrt"],
        default="linear",
    )
    group.add_argument("--weight-decay", type=float, default=0.1)
    group.add_argument("--adam-beta1", type=float, default=0.9)
    group.add_argument("--adam-beta2", type=float, default=0.95)
    group.add_argument("--adam-eps", type=float, default=1e-8)
    group.add_argument("--clip-grad", type=float, default=1.0)
    group.add_argument("--bf16", action="store_true")
    group.add_argument("--fp16", action="store_true")
    group.add_argument("--seed", type=int, default=1234)
    group.add_argument(
        "--max-skipped-iterations",
        type=int,
        default=10,
        help="stop after this many consecutive steps with non-finite loss/grads",
    )


def _data_args(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--data-path", nargs="+", help="[weight] prefix [[weight] prefix ...]")
    group.add_argument("--split", default="969,30,1")
    group.add_argument("--train-data-path", nargs="+")
    group.add_argument("--valid-data-path", nargs="+")
    group.add_argument("--test-data-path", nargs="+")
    group.add_argument("--data-cache-path")
    group.add_argument("--tokenizer-type", default="HuggingFaceTokenizer")
    group.add_argument("--tokenizer-model")
    group.add_argument("--vocab-file")
    group.add_argument("--merge-file")
    group.add_argument(
        "--eod-token",
        help="end-of-document token for a tokenizer without EOS or SEP (as given to "
        "tools/preprocess_data.py --eod-token)",
    )
    group.add_argument(
        "--mock-data",
        action="store_true",
        help="synthetic, learnable token sequences (no files needed)",
    )
    group.add_argument(
        "--vocab-size",
        type=int,
        default=1024,
        help="vocabulary of --mock-data ([MASK] is its last id)",
    )
    group.add_argument("--per-document-attention", action="store_true")
    group = parser.add_argument_group("supervised fine-tuning")
    group.add_argument(
        "--sft",
        action="store_true",
        help="SFT on tools/preprocess_sft.py data: the prompt is never masked nor scored",
    )
    group.add_argument(
        "--sft-packing",
        choices=["pad", "pack"],
        default="pad",
        help="one example per sample padded with EOD, or whole examples packed with "
        "per-example attention",
    )
    group.add_argument(
        "--sft-eos-in-loss",
        action="store_true",
        help="padding EOD tokens are attended, masked and scored as response (LLaDA)",
    )


def _checkpoint_args(parser):
    group = parser.add_argument_group("checkpointing")
    group.add_argument("--save")
    group.add_argument("--load")
    group.add_argument("--save-interval", type=int)
    group.add_argument("--finetune", action="store_true", help="load weights only")
    group.add_argument("--no-load-optim", action="store_true")
    group.add_argument(
        "--no-load-rng",
        action="store_true",
        help="accepted for Megatron-LM command lines, no effect: checkpoints hold no RNG state "
        "(t, masks and loop counts are functions of --seed, the sample and the iteration)",
    )


def _resilience_args(parser):
    group = parser.add_argument_group("checkpoint resilience")
    group.add_argument(
        "--iteration", type=int, help="with --load: this saved iteration (default: newest complete)"
    )
    group.add_argument(
        "--keep-last", type=int, help="after each save, delete all but the newest K checkpoints"
    )
    group.add_argument(
        "--override-opt-param-scheduler",
        action="store_true",
        help="on resume, take the LR schedule from the flags, not from the checkpoint",
    )
    group.add_argument(
        "--use-checkpoint-opt-param-scheduler",
        action="store_true",
        help="on resume, take the LR schedule from the checkpoint, not from the flags",
    )


def _logging_args(parser):
    group = parser.add_argument_group("logging")
    group.add_argument("--log-interval", type=int, default=10)
    group.add_argument("--tensorboard-dir")
    group.add_argument("--eval-interval", type=int)
    group.add_argument("--eval-iters", type=int, default=10)
    group.add_argument("--eval-num-loops", type=int, help="loops for validation (default S_max)")
    group.add_argument("--wandb-project")
    group.add_argument("--metrics-file", help="also append each iteration's metrics as JSON lines")


def _loop_and_diffusion_args(parser):
    group = parser.add_argument_group("LoopMDM")
    group.add_argument(
        "--loop-layers",
        type=int,
        nargs=2,
        metavar=("START", "END"),
        help="looped span, 0-based, end exclusive (default: the size's)",
    )
    group.add_argument("--max-loops", type=int, help="S_max (default: the size's)")
    group.add_argument("--loop-sampling", choices=LOOP_SAMPLINGS, default="uniform")
    group.add_argument("--loop-input-injection", choices=INPUT_INJECTIONS, default="none")
    group.add_argument("--loop-embedding", action="store_true")
    group.add_argument("--loop-backprop-depth", type=int)
    group.add_argument(
        "--loop-state-noise",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="training only: Gaussian noise (std SIGMA) on the loop block's input state",
    )
    group.add_argument(
        "--intermediate-loop-loss-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="training only: add W x the mean NELBO of the outputs after loops 1..S-1 to the "
        "loss (0: off; needs --pipeline-model-parallel-size 1)",
    )
    group = parser.add_argument_group("diffusion")
    group.add_argument("--mask-token-id", type=int, help="default: the tokenizer's mask token")
    group.add_argument("--time-eps", type=float, default=1e-3)
    group.add_argument("--time-sampling", choices=["uniform", "antithetic"], default="uniform")
    group.add_argument("--random-length-prob", type=float, default=0.0)


def _ar_adaptation_args(parser):
    group = parser.add_argument_group(
        "from a pretrained AR model",
        "architecture fields of imported models (tools/convert_hf_to_checkpoint.py --from-ar "
        "writes the flags to SAVE/pretrain_flags.txt) and the AR-to-diffusion adaptation",
    )
    group.add_argument("--kv-channels", type=int, help="per-head width (default hidden/heads)")
    group.add_argument("--norm-epsilon", type=float, help="the norms' epsilon (default 1e-5)")
    group.add_argument("--qk-layernorm", action="store_true", help="per-head q/k norm (Qwen3)")
    group.add_argument("--add-qkv-bias", action="store_true", help="q/k/v biases (Qwen2)")
    group.add_argument(
        "--rope-scaling", type=json.loads, help='HF-style JSON, e.g. \'{"rope_type": "linear", '
        '"factor": 4}\' or llama3 scaling',
    )  # fmt: skip
    group.add_argument(
        "--padded-vocab-size", type=int, help="embedding rows, when the model has more rows "
        "than the tokenizer has tokens (default: the tokenizer's size, padded)",
    )  # fmt: skip
    group.add_argument(
        "--shift-logits", action="store_true",
        help="position i predicts token i from position i - 1's output (reuses an AR head)",
    )  # fmt: skip
    group.add_argument(
        "--attention-mask-anneal-iters", type=int, default=0,
        help="start causal and open the future gradually, bidirectional from this iteration "
        "(DiffuLLaMA); 0: bidirectional throughout",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_loopmdm.py",
        description="Pre-train a looped masked diffusion LM (run under torchrun).",
    )
    for add in (
        _model_args,
        _parallel_args,
        _training_args,
        _data_args,
        _checkpoint_args,
        _logging_args,
        _loop_and_diffusion_args,
        _ar_adaptation_args,
        _resilience_args,
    ):
        add(parser)
    return parser


def _check_transformer_impl(args, errors: list) -> None:
    if args.transformer_impl != "transformer_engine":
        return
    import importlib.util

    _check(
        importlib.util.find_spec("transformer_engine") is not None,
        "--transformer-impl transformer_engine needs Transformer Engine, which is not "
        "installed; install it (pip install transformer_engine[pytorch]) or pass "
        "--transformer-impl local.",
        errors,
    )
    _check(
        args.device != "cpu",
        "--transformer-impl transformer_engine runs on GPU only; drop --device cpu or pass "
        "--transformer-impl local.",
        errors,
    )


def _check(condition: bool, message: str, errors: list) -> None:
    if not condition:
        errors.append(message)


def _check_builds(build, args, errors: list) -> None:
    """Adds the ValueError a config section raises on construction to `errors`."""
    try:
        build(args)
    except ValueError as error:
        errors.append(str(error))


def _check_parallel(args, world_size: int, errors: list) -> int:
    """Adds the layout's problems to `errors`; returns the data-parallel size (1 if invalid)."""
    try:
        parallel = parallel_config(args, world_size)
    except ValueError as error:
        errors.append(str(error))
        return 1
    if args.deepspeed:
        from megatron_loopmdm.training.deepspeed_config import check_deepspeed_layout

        try:
            check_deepspeed_layout(parallel)
        except ValueError as error:
            errors.append(str(error))
    return parallel.data_parallel_size()


def _check_loop_layout(args, errors: list) -> None:
    """Adds what the loop options refuse under the pipeline layout (`LoopConfig.validate_for`)."""
    try:
        size = model_size_from_args(args)
        loop = loop_config_from_args(args, size)
        loop.validate_for(size.num_layers, args.pipeline_model_parallel_size)
    except ValueError as error:
        errors.append(str(error))


def _check_across_sections(args, errors: list) -> None:
    """The rules that join flags of two config sections, or the file system."""
    _check(not (args.bf16 and args.fp16), "Choose one of --bf16 and --fp16.", errors)
    _check(
        args.load is None or os.path.isdir(args.load) or args.load == args.save,
        f"--load {args.load}: no such directory.",
        errors,
    )
    _check(
        args.lr_warmup_iters <= args.train_iters,
        "--lr-warmup-iters must not exceed --train-iters.",
        errors,
    )
    _check(
        args.model_size is not None
        or all(
            getattr(args, name) is not None
            for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
        ),
        "Give --model-size NAME, or --num-layers, --hidden-size, --num-attention-heads and "
        "--seq-length.",
        errors,
    )
    _check_loop_layout(args, errors)
    _check(
        not args.sft or args.random_length_prob == 0,
        "--random-length-prob would cut SFT responses; drop it with --sft.",
        errors,
    )
    tp = args.tensor_model_parallel_size
    _check(
        args.padded_vocab_size is None or args.padded_vocab_size % tp == 0,
        f"--padded-vocab-size {args.padded_vocab_size} must be a multiple of "
        f"--tensor-model-parallel-size {tp}.",
        errors,
    )
    # An imported AR model may add [MASK] as a new embedding row past the data's ids
    # (--padded-vocab-size); otherwise it must be one of the vocabulary's ids.
    rows = args.padded_vocab_size or args.vocab_size
    _check(
        not args.mock_data or args.mask_token_id is None or 0 <= args.mask_token_id < rows,
        f"--mask-token-id {args.mask_token_id} is outside the vocabulary (--vocab-size "
        f"{args.vocab_size}, --padded-vocab-size {args.padded_vocab_size}); use an id below "
        f"{rows}.",
        errors,
    )


def validate_args(args, world_size: int) -> list[str]:
    """Every incompatible combination, as messages that say what to change (empty if fine).

    Fills in the default --global-batch-size (micro-batch size x data-parallel size).
    """
    errors = []
    dp = _check_parallel(args, world_size, errors)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    _check(
        args.global_batch_size % (args.micro_batch_size * dp) == 0,
        f"--global-batch-size {args.global_batch_size} must be a multiple of "
        f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}.",
        errors,
    )
    for build in _SECTIONS.values():
        _check_builds(build, args, errors)
    _check_across_sections(args, errors)
    _check_transformer_impl(args, errors)
    return errors


def parse_args(argv: Optional[list] = None, world_size: Optional[int] = None):
    """Parses and validates; exits with status 2 and every problem listed on bad input."""
    parser = build_parser()
    if int(os.environ.get("RANK", "0")) != 0:
        # Every rank parses the same command line; only rank 0 prints the usage and problems.
        parser.error = lambda message: sys.exit(2)
    args = parser.parse_args(argv)
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    errors = validate_args(args, world_size)
    if errors:
        parser.error("\n  " + "\n  ".join(errors))
    return args


# From the parsed (and validated) namespace to the run's typed configuration. The builders read
# flags by their config field's name; `tests/training/test_run_flags.py` holds every flag to a
# change of the config.


def _section(cls, **computed):
    """A builder of the config section `cls` from the flags named like its fields; `computed`
    maps the other fields to functions of the namespace."""

    def build(args):
        names = [f.name for f in dataclasses.fields(cls) if f.name not in computed]
        values = {name: compute(args) for name, compute in computed.items()}
        return cls(**{name: getattr(args, name) for name in names}, **values)

    return build


# RunConfig's sections besides the model size, loop block and layout.
_SECTIONS = {
    "model": _section(
        ModelOptions,
        share_embeddings_and_output_weights=lambda a: not a.untie_embeddings_and_output_weights,
    ),
    "diffusion": _section(DiffusionOptions),
    "optimization": _section(OptimizationConfig),
    "backend": _section(BackendConfig),
    "data": _section(DataSourceConfig),
    "checkpoint": _section(CheckpointConfig),
    "logging": _section(LoggingConfig),
    "training": _section(
        TrainingConfig,
        params_dtype=lambda a: "bfloat16" if a.bf16 else "float16" if a.fp16 else "float32",
    ),
}


def model_size_from_args(args) -> ModelSize:
    """The named size (default `debug`) with the command line's overrides applied."""
    base = get_model_size(args.model_size or "debug")
    names = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
             "num_query_groups", "seq_length", "normalization", "swiglu", "max_loops",
             "kv_channels")  # fmt: skip
    changes = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.loop_layers is not None:
        changes["loop_layers"] = tuple(args.loop_layers)
    if args.norm_epsilon is not None:
        changes["layernorm_epsilon"] = args.norm_epsilon
    for name in ("qk_layernorm", "add_qkv_bias"):
        if getattr(args, name):
            changes[name] = True
    if "hidden_size" in changes and "ffn_hidden_size" not in changes:
        changes["ffn_hidden_size"] = 4 * changes["hidden_size"]
    return replace_size(base, **changes)


def loop_config_from_args(args, size: ModelSize) -> LoopConfig:
    """The loop block of `size` with the loop flags applied."""
    return LoopConfig(
        loop_layers=size.loop_layers,
        max_loops=size.max_loops,
        loop_sampling=args.loop_sampling,
        input_injection=args.loop_input_injection,
        loop_embedding=args.loop_embedding,
        backprop_depth=args.loop_backprop_depth,
        state_noise=args.loop_state_noise,
        intermediate_loss_weight=args.intermediate_loop_loss_weight,
    )


def parallel_config(args, world_size: int) -> ParallelConfig:
    """The run's validated `ParallelConfig` (raises a ValueError saying what to change).

    The stage layout is as given: `--pipeline-model-parallel-layout auto` is resolved by the run,
    which knows the loop block.
    """
    pp = args.pipeline_model_parallel_size
    num_layers = args.num_layers or get_model_size(args.model_size or "debug").num_layers
    return ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(
            num_layers, pp, args.num_layers_per_virtual_pipeline_stage
        ),
        sequence_parallel=args.sequence_parallel,
        world_size=world_size,
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
        pipeline_model_parallel_layout=args.pipeline_model_parallel_layout,
    )


def run_config_from_args(args, world_size: Optional[int] = None) -> RunConfig:
    """The typed configuration of a run from `parse_args`'s namespace (the library's input).

    Raises:
        ValueError: a value a config section refuses (e.g. a loop span outside the model).
    """
    size = model_size_from_args(args)
    return RunConfig(
        model_size=size,
        loop=loop_config_from_args(args, size),
        parallel=parallel_config(args, world_size or int(os.environ.get("WORLD_SIZE", "1"))),
        **{name: build(args) for name, build in _SECTIONS.items()},
    )
