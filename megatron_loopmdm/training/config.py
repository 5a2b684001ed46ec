"""A pre-training run's settings as one tree of typed, validated dataclasses (`RunConfig`).

`training.arguments.run_config_from_args` builds the tree from the command line once; the
library (`training.run.Run`, `training.loop.train`) reads only the tree. Each section checks its
own values on construction and says which flag to change; rules that join two sections (the
global batch against the data-parallel size, `--sft` against `--random-length-prob`) are the
argument module's. The tree is JSON-able (`dataclasses.asdict`): checkpoints store it.

What the tokenizer decides ([MASK] id, vocabulary size) is resolved by the run, so the model and
diffusion sections here hold the flags' options, and the run builds megatron-loopmdm's
`LoopMDMModelConfig` and `DiffusionConfig` from them.
"""

from dataclasses import dataclass
from typing import Optional

from megatron_loopmdm.distributed.parallel import ParallelConfig
from megatron_loopmdm.models.config import LoopConfig
from megatron_loopmdm.models.sizes import ModelSize

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def use_transformer_engine(transformer_impl: Optional[str]) -> Optional[bool]:
    """`--transformer-impl` as `build_model`'s `use_te` (None: TE when installed on GPU)."""
    return {None: None, "local": False, "transformer_engine": True}[transformer_impl]


def _refuse(condition: bool, message: str) -> None:
    if condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelOptions:
    """The model's options beyond its size and loop block (the vocabulary is the run's)."""

    padded_vocab_size: Optional[int] = None
    """Embedding rows; None: the tokenizer's size padded (`inputs.padded_vocab_size`)."""

    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: Optional[int] = None
    """None: the sequence length."""

    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    share_embeddings_and_output_weights: bool = True
    rope_scaling: Optional[dict] = None
    shift_logits: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    recompute_granularity: Optional[str] = None
    """None, "full" (every layer, uniform) or "selective"."""

    transformer_impl: Optional[str] = None
    """"local", "transformer_engine", or None (TE when installed on GPU)."""

    def __post_init__(self):
        _refuse(
            self.rope_scaling is not None and not isinstance(self.rope_scaling, dict),
            '--rope-scaling takes a JSON object, e.g. \'{"rope_type": "linear", "factor": 4}\'.',
        )

    @property
    def use_te(self) -> Optional[bool]:
        """`build_model`'s `use_te` (None: TE when installed on GPU)."""
        return use_transformer_engine(self.transformer_impl)


@dataclass(frozen=True)
class DiffusionOptions:
    """The masked-diffusion objective's options (the run adds the tokenizer's [MASK] id)."""

    time_eps: float = 1e-3
    time_sampling: str = "uniform"
    random_length_prob: float = 0.0

    def __post_init__(self):
        _refuse(
            not 0.0 <= self.random_length_prob <= 1.0,
            "--random-length-prob must be in [0, 1].",
        )


@dataclass(frozen=True)
class OptimizationConfig:
    """AdamW and its learning-rate schedule (Megatron-LM's flags)."""

    lr: float
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    """None: the run's --train-iters."""

    lr_wsd_decay_iters: Optional[int] = None
    lr_wsd_decay_style: str = "linear"
    override_opt_param_scheduler: bool = False
    """On resume, the schedule from these settings, not the checkpoint's."""

    use_checkpoint_opt_param_scheduler: bool = False
    """On resume, the checkpoint's schedule, not these settings'."""

    def __post_init__(self):
        _refuse(
            self.lr_decay_style == "WSD" and not self.lr_wsd_decay_iters,
            "--lr-decay-style WSD needs --lr-wsd-decay-iters (the length of the final decay).",
        )
        _refuse(self.min_lr > self.lr, "--min-lr must not exceed --lr.")
        _refuse(
            self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler,
            "Choose one of --override-opt-param-scheduler and "
            "--use-checkpoint-opt-param-scheduler.",
        )


@dataclass(frozen=True)
class BackendConfig:
    """What wraps and steps the model: megatron DDP and optimizer, or a DeepSpeed engine."""

    deepspeed: bool = False
    deepspeed_config: Optional[str] = None
    """The DeepSpeed JSON config's path (with `deepspeed`)."""

    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    device: Optional[str] = None
    """"cpu", "cuda", or None (cuda when available)."""

    def __post_init__(self):
        _refuse(
            self.overlap_grad_reduce and self.deepspeed,
            "--overlap-grad-reduce is a megatron-DDP option; DeepSpeed overlaps by its config "
            "(overlap_comm). Drop --overlap-grad-reduce with --deepspeed.",
        )
        _refuse(
            self.use_distributed_optimizer and self.deepspeed,
            "--use-distributed-optimizer and --deepspeed are two ZeRO backends; choose one.",
        )
        _refuse(
            self.deepspeed and not self.deepspeed_config,
            "--deepspeed needs --deepspeed-config ds.json (see examples/deepspeed/).",
        )
        _refuse(
            bool(self.deepspeed_config) and not self.deepspeed,
            "--deepspeed-config is only read with --deepspeed.",
        )


@dataclass(frozen=True)
class DataSourceConfig:
    """Where the training and validation samples come from, and their tokenizer."""

    mock_data: bool = False
    vocab_size: int = 1024
    """The vocabulary of mock data ([MASK] is its last id)."""

    mask_token_id: Optional[int] = None
    """None: the tokenizer's mask token (mock data: the last id)."""

    data_path: Optional[list] = None
    split: str = "969,30,1"
    train_data_path: Optional[list] = None
    valid_data_path: Optional[list] = None
    test_data_path: Optional[list] = None
    data_cache_path: Optional[str] = None
    tokenizer_type: str = "HuggingFaceTokenizer"
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    eod_token: Optional[str] = None
    per_document_attention: bool = False
    sft: bool = False
    sft_packing: str = "pad"
    sft_eos_in_loss: bool = False

    def __post_init__(self):
        real = bool(self.data_path or self.train_data_path)
        _refuse(
            not (self.mock_data or real),
            "No training data: give --data-path (or --train-data-path), or --mock-data.",
        )
        _refuse(
            self.mock_data and real,
            "--mock-data replaces --data-path/--train-data-path; give one of them.",
        )
        _refuse(
            bool(self.data_path and self.train_data_path),
            "Give --data-path with --split, or per-split --train/valid/test-data-path, not both.",
        )
        _refuse(
            real and not (self.tokenizer_model or self.vocab_file),
            "Real data needs its tokenizer: --tokenizer-type and --tokenizer-model (or "
            "--vocab-file/--merge-file).",
        )
        self._check_sft()

    def _check_sft(self) -> None:
        if not self.sft:
            _refuse(
                self.sft_packing != "pad" or self.sft_eos_in_loss,
                "--sft-packing/--sft-eos-in-loss are read only with --sft.",
            )
            return
        _refuse(self.mock_data, "--sft trains on SFT data; drop --mock-data.")
        _refuse(
            self.per_document_attention,
            "--sft attends per example by itself (--sft-packing pack); drop "
            "--per-document-attention.",
        )
        _refuse(bool(self.test_data_path), "--sft has no test split; drop --test-data-path.")


@dataclass(frozen=True)
class CheckpointConfig:
    """Where the run saves and what it loads."""

    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    finetune: bool = False
    """Load the weights only and start at iteration 0."""

    no_load_optim: bool = False
    iteration: Optional[int] = None
    """With `load`: this saved iteration (None: the newest complete one)."""

    keep_last: Optional[int] = None
    """After each save, delete all but the newest K checkpoints."""

    def __post_init__(self):
        _refuse(
            self.save_interval is not None and not self.save, "--save-interval needs --save DIR."
        )
        _refuse(self.finetune and not self.load, "--finetune needs --load DIR.")
        _refuse(self.iteration is not None and not self.load, "--iteration needs --load DIR.")
        _refuse(self.keep_last is not None and not self.save, "--keep-last needs --save DIR.")
        _refuse(self.keep_last is not None and self.keep_last < 1, "--keep-last must be >= 1.")


@dataclass(frozen=True)
class LoggingConfig:
    """What the run logs, where, and how often it validates."""

    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    metrics_file: Optional[str] = None
    eval_interval: Optional[int] = None
    """Validate every this many iterations (None: never)."""

    eval_iters: int = 10
    """Global batches per validation."""

    eval_num_loops: Optional[int] = None
    """Loops for validation (None: S_max)."""

    def __post_init__(self):
        _refuse(
            self.eval_interval is not None and self.eval_interval <= 0,
            "--eval-interval must be positive.",
        )


@dataclass(frozen=True)
class TrainingConfig:
    """How long the run trains, in which batches and precision, from which seed."""

    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    seed: int = 1234
    params_dtype: str = "float32"
    """One of `DTYPES` ("float32", "bfloat16", "float16")."""

    max_skipped_iterations: int = 10
    """Stop after this many consecutive steps with a non-finite loss or gradients."""

    attention_mask_anneal_iters: int = 0
    """Causal at first, bidirectional from this iteration (0: bidirectional throughout)."""

    def __post_init__(self):
        assert self.params_dtype in DTYPES, self.params_dtype
        _refuse(self.attention_mask_anneal_iters < 0, "--attention-mask-anneal-iters must be >= 0.")

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.params_dtype]


@dataclass(frozen=True)
class RunConfig:
    """Everything a pre-training run is configured by (see the module docstring)."""

    model_size: ModelSize
    loop: LoopConfig
    parallel: ParallelConfig
    """The layout as given (the run resolves `--pipeline-model-parallel-layout auto`)."""

    model: ModelOptions
    diffusion: DiffusionOptions
    optimization: OptimizationConfig
    backend: BackendConfig
    data: DataSourceConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    training: TrainingConfig
