"""The DeepSpeed JSON config: read, validated against the run, and prepared for the engine.

Plain dict checks (DeepSpeed itself is not imported here): sections the backend owns
(optimizer, scheduler, pipeline) are refused, as are ZeRO stage 0, ZeRO-Offload, DeepSpeed's
activation checkpointing and Ulysses; batch sizes and clipping are filled from the run, and
ZeRO-3 prefetching is turned off because the loop count changes the module order every step
(`training.deepspeed_backend` explains each rule's reason in its docstring).
"""

import copy
import json
from pathlib import Path
from typing import Optional

from megatron_loopmdm.distributed.parallel import ParallelConfig

import torch

_SUPPORTED_STAGES = (1, 2, 3)

# Sections this backend sets itself: a config that holds them is refused.
_OWNED_SECTIONS = {
    "optimizer": "the optimizer is torch AdamW built from --lr, --adam-beta1/2, --adam-eps and "
    "--weight-decay",
    "scheduler": "the learning rate follows the run's own schedule (--lr-decay-style, ...)",
    "pipeline": "pipeline parallelism with DeepSpeed is not supported",
}


def load_deepspeed_config(path) -> dict:
    """Reads a DeepSpeed JSON config, with a clear error for a missing or invalid file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"--deepspeed-config {path}: no such file. Pass a DeepSpeed JSON config, e.g. "
            "examples/deepspeed/zero2.json."
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--deepspeed-config {path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"--deepspeed-config {path} must hold a JSON object, not {config!r}.")
    return config


def zero_stage(ds_config: dict) -> int:
    """The config's ZeRO stage (0 when it has no `zero_optimization` section)."""
    return ds_config.get("zero_optimization", {}).get("stage", 0)


def _enabled(ds_config: dict, section: str) -> bool:
    return bool(ds_config.get(section, {}).get("enabled", False))


def check_deepspeed_layout(parallel: ParallelConfig) -> None:
    """Refuses layouts this backend cannot train (pipeline parallelism); degrees themselves are
    `ParallelConfig`'s to check."""
    if parallel.pipeline_model_parallel_size > 1:
        raise ValueError(
            f"--pipeline-model-parallel-size {parallel.pipeline_model_parallel_size} with "
            "--deepspeed is not supported: DeepSpeed's pipeline engine needs its own "
            "PipelineModule and supports only ZeRO-1. For pipeline parallelism train on the "
            "megatron backend (drop --deepspeed) and add --use-distributed-optimizer for "
            "ZeRO-1-style sharded optimizer state."
        )


def validate_deepspeed_config(
    ds_config: dict,
    parallel: ParallelConfig,
    params_dtype: torch.dtype = torch.float32,
    clip_grad: Optional[float] = None,
) -> None:
    """Refuses DeepSpeed configs and layouts this backend cannot train correctly.

    Args:
        ds_config: the DeepSpeed config (before `prepare_deepspeed_config`).
        parallel: the run's parallel layout.
        params_dtype: the run's parameter dtype (fp32, bf16 or fp16).
        clip_grad: the run's gradient clipping (`--clip-grad`); None skips the check.

    Raises:
        ValueError: with what to change.
    """
    check_deepspeed_layout(parallel)
    for section, why in _OWNED_SECTIONS.items():
        if section in ds_config:
            raise ValueError(f"Remove the {section!r} section from the DeepSpeed config: {why}.")
    stage = zero_stage(ds_config)
    if stage == 0:
        raise ValueError(
            "zero_optimization.stage=0 (or no zero_optimization section) is not supported: "
            "without ZeRO, torch AdamW skips parameters that got no gradient this step (the "
            "injection adapter when S=1), unlike the megatron optimizer. Use stage 1, 2 or 3, "
            "or the megatron backend (drop --deepspeed) for plain data parallelism."
        )
    if stage not in _SUPPORTED_STAGES:
        raise ValueError(f"zero_optimization.stage={stage!r} is not a ZeRO stage; use 1, 2 or 3.")
    _validate_precision(ds_config, params_dtype)
    _validate_zero_options(ds_config.get("zero_optimization", {}), stage)
    if "activation_checkpointing" in ds_config:
        raise ValueError(
            "Remove the 'activation_checkpointing' section from the DeepSpeed config: DeepSpeed's "
            "checkpointing is reentrant, which breaks ZeRO-2 when the loop block reuses a layer "
            "in one step, and the model never calls it. Use --recompute-granularity full: the "
            "model's own recompute is non-reentrant and safe with loops at every ZeRO stage."
        )
    if ds_config.get("sequence_parallel_size", 1) != 1:
        raise ValueError(
            "sequence_parallel_size in the DeepSpeed config is DeepSpeed-Ulysses, which this "
            "model does not implement; remove it and use --sequence-parallel (megatron's, with "
            "--tensor-model-parallel-size > 1)."
        )
    configured_clip = ds_config.get("gradient_clipping")
    if clip_grad is not None and configured_clip is not None and configured_clip != clip_grad:
        raise ValueError(
            f"The DeepSpeed config's gradient_clipping={configured_clip} contradicts "
            f"--clip-grad {clip_grad}; remove gradient_clipping from the config or make them "
            "equal."
        )


def _validate_precision(ds_config: dict, params_dtype: torch.dtype) -> None:
    fp16, bf16 = _enabled(ds_config, "fp16"), _enabled(ds_config, "bf16")
    if fp16 and bf16:
        raise ValueError("The DeepSpeed config enables both fp16 and bf16; enable at most one.")
    configured = torch.float16 if fp16 else torch.bfloat16 if bf16 else torch.float32
    if configured != params_dtype:
        flag = {torch.float16: "--fp16", torch.bfloat16: "--bf16", torch.float32: "neither"}
        raise ValueError(
            f"The DeepSpeed config trains in {configured} but the run's parameters are "
            f'{params_dtype}: set "enabled" of the config\'s fp16/bf16 sections to match, or '
            f"pass {flag[configured]} (of --fp16/--bf16) to the run."
        )


def _validate_zero_options(zero: dict, stage: int) -> None:
    for offload in ("offload_optimizer", "offload_param"):
        device = zero.get(offload, {}).get("device", "none")
        if device not in (None, "none"):
            raise ValueError(
                f"zero_optimization.{offload}.device={device!r} is not supported: ZeRO-Offload "
                "needs DeepSpeed's compiled CPU Adam, and this backend trains with torch AdamW. "
                f'Remove {offload} (or set its device to "none").'
            )
    if stage == 3:
        for key in ("stage3_prefetch_bucket_size", "stage3_max_reuse_distance"):
            if zero.get(key, 0) not in (0, "auto"):
                raise ValueError(
                    f"zero_optimization.{key}={zero[key]} turns on ZeRO-3 parameter prefetching, "
                    "which replays the module order recorded on an earlier step; the loop count "
                    "S changes every step (a looped layer runs S times), so that order changes. "
                    f"Set {key} to 0 (examples/deepspeed/zero3.json)."
                )


def fill_batch_sizes(
    ds_config: dict, micro_batch_size: int, global_batch_size: int, data_parallel_size: int
) -> dict:
    """A copy of `ds_config` with DeepSpeed's three batch sizes set from the run's.

    `train_micro_batch_size_per_gpu` = --micro-batch-size, `train_batch_size` =
    --global-batch-size, `gradient_accumulation_steps` = global / (micro x data parallel).
    Values already in the config ("auto" aside) must agree.

    Raises:
        ValueError: when the global batch does not split evenly, or the config disagrees.
    """
    per_step = micro_batch_size * data_parallel_size
    if micro_batch_size < 1 or global_batch_size % per_step:
        raise ValueError(
            f"--global-batch-size {global_batch_size} must be a positive multiple of "
            f"--micro-batch-size {micro_batch_size} x data-parallel size {data_parallel_size} "
            f"= {per_step}."
        )
    sizes = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": global_batch_size // per_step,
        "train_batch_size": global_batch_size,
    }
    config = copy.deepcopy(ds_config)
    for key, value in sizes.items():
        configured = config.get(key, "auto")
        if configured not in ("auto", value):
            raise ValueError(
                f"The DeepSpeed config's {key}={configured} contradicts the run's "
                f"{value} (from --micro-batch-size {micro_batch_size}, --global-batch-size "
                f"{global_batch_size}, data-parallel size {data_parallel_size}); remove {key} "
                'from the config or set it to "auto".'
            )
        config[key] = value
    return config


def prepare_deepspeed_config(
    ds_config: dict,
    parallel: ParallelConfig,
    micro_batch_size: int,
    global_batch_size: int,
    data_parallel_size: int,
    params_dtype: torch.dtype = torch.float32,
    clip_grad: float = 1.0,
) -> dict:
    """Validates `ds_config` and returns the config handed to `deepspeed.initialize`.

    Fills in batch sizes and gradient clipping, allows torch AdamW under ZeRO, and (stage 3)
    turns off parameter prefetching, whose recorded module order a varying loop count breaks.
    """
    validate_deepspeed_config(ds_config, parallel, params_dtype, clip_grad)
    config = fill_batch_sizes(ds_config, micro_batch_size, global_batch_size, data_parallel_size)
    config["gradient_clipping"] = clip_grad
    config["zero_allow_untested_optimizer"] = True
    config.setdefault("steps_per_print", 2**31 - 1)  # the run logs; DeepSpeed stays quiet
    zero = config["zero_optimization"]
    if zero_stage(config) == 3:
        zero["stage3_prefetch_bucket_size"] = 0
        zero["stage3_max_reuse_distance"] = 0
    return config
