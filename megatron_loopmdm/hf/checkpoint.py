"""Conversion between megatron dist checkpoints and Hugging Face directories, in one process.

A checkpoint of any TP/PP layout is loaded into a TP=1/PP=1 `LoopMDMModel` (dist checkpointing
reshards) inside a one-process gloo group, then renamed by `hf.mapping`. The reverse builds
the same model from an HF directory and saves a dist checkpoint that any layout loads.
"""

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

from megatron_loopmdm.checkpointing import dist_checkpoint as ckpt
from megatron_loopmdm.checkpointing.run_config import (
    conversion_run_config_json,
    read_run_config,
)
from megatron_loopmdm.distributed.parallel import ParallelConfig, single_process_group
from megatron_loopmdm.hf import mapping
from megatron_loopmdm.hf.configuration_loopmdm import LoopMDMConfig
from megatron_loopmdm.hf.modeling_loopmdm import LoopMDMForMaskedDiffusion
from megatron_loopmdm.models.builder import build_model, transformer_config
from megatron_loopmdm.models.config import LoopConfig, LoopMDMModelConfig
from megatron_loopmdm.models.loopmdm_model import LoopMDMModel
from megatron_loopmdm.models.sizes import ModelSize

import torch
from megatron.core import dist_checkpointing
from transformers import GenerationConfig

HF_DIR = Path(__file__).resolve().parent
MODEL_FILES = (
    "cache_loopmdm.py",
    "configuration_loopmdm.py",
    "generation_loopmdm.py",
    "loop_policy_loopmdm.py",
    "modeling_loopmdm.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_loopmdm.LoopMDMConfig",
    "AutoModel": "modeling_loopmdm.LoopMDMForMaskedDiffusion",
    "AutoModelForMaskedLM": "modeling_loopmdm.LoopMDMForMaskedDiffusion",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
)
EXTRA_KEYS = ("model_size", "loop_config", "model_config")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConversionError(ValueError):
    """A checkpoint or directory that cannot be converted; the message says why."""


def checkpoint_dtype(extra: dict) -> torch.dtype:
    """The parameter dtype the run trained in (its run configuration, or older saved flags)."""
    return getattr(torch, read_run_config(extra)["training"]["params_dtype"])


def read_checkpoint_extra(root, iteration: Optional[int] = None) -> tuple[int, dict]:
    """The iteration and `extra` state of a LoopMDM checkpoint, without loading weights.

    Raises:
        FileNotFoundError: no such directory, or no checkpoint in it.
        ConversionError: an incomplete checkpoint, another format, or another model type.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory.")
    if iteration is None:
        if (root / ckpt.DEEPSPEED_LATEST_FILE).is_file() and not (
            root / ckpt.LATEST_FILE
        ).is_file():
            raise ConversionError(
                f"{root} holds a DeepSpeed checkpoint; only megatron dist checkpoints convert."
            )
        try:
            iteration = ckpt.latest_iteration(root)
        except ValueError as e:
            raise ConversionError(str(e)) from e
        if iteration is None:
            raise FileNotFoundError(
                f"No checkpoint under {root}: {ckpt.LATEST_FILE} is missing (pass the directory "
                "given to --save, or name one with --iteration)."
            )
    directory = ckpt.checkpoint_dir(root, iteration)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Checkpoint directory {directory} does not exist (an interrupted save leaves "
            f"{directory.name}.tmp; use an earlier --iteration)."
        )
    if not (directory / "metadata.json").is_file():
        raise ConversionError(
            f"{directory} is incomplete: metadata.json is missing (an interrupted copy or save)."
        )
    try:
        with warnings.catch_warnings():
            # It warns that no process group exists: reading the common state needs none.
            warnings.simplefilter("ignore", UserWarning)
            common = dist_checkpointing.load_common_state_dict(str(directory))
    except Exception as e:  # dist checkpointing raises many types for unreadable files
        raise ConversionError(f"{directory} cannot be read as a dist checkpoint: {e}") from e
    extra = common.get("extra") or {}
    missing = [key for key in EXTRA_KEYS if key not in extra]
    if missing:
        raise ConversionError(
            f"{directory} is not a LoopMDM checkpoint: its extra state lacks {', '.join(missing)} "
            "(was it written by pretrain_loopmdm.py?)."
        )
    return iteration, extra


def build_megatron_model(extra: dict, params_dtype: torch.dtype = torch.float32) -> LoopMDMModel:
    """The TP=1/PP=1 LoopMDMModel (local spec) of a checkpoint's `extra` state."""
    size_fields = dict(extra["model_size"], loop_layers=tuple(extra["model_size"]["loop_layers"]))
    size = ModelSize(**size_fields)
    loop_config = LoopConfig(**extra["loop_config"])
    model_config = LoopMDMModelConfig(**extra["model_config"])
    config = transformer_config(size, ParallelConfig(), params_dtype=params_dtype)
    return build_model(config, loop_config, model_config, use_te=False).eval()


def load_megatron_state(root, iteration: Optional[int] = None) -> tuple[int, dict, dict]:
    """(iteration, extra, TP=1/PP=1 state dict of tensors) of a checkpoint of any layout."""
    iteration, extra = read_checkpoint_extra(root, iteration)
    with single_process_group(ConversionError):
        model = build_megatron_model(extra, checkpoint_dtype(extra))
        ckpt.load_checkpoint(root, [model], optimizer=None, iteration=iteration)
        state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return iteration, extra, state


def hf_model_from_state(config: LoopMDMConfig, hf_state: dict) -> LoopMDMForMaskedDiffusion:
    model = LoopMDMForMaskedDiffusion(config)
    model.load_state_dict(hf_state, strict=True)
    return model.eval()


def _tokenizer_source(tokenizer: Optional[str], extra: dict) -> Optional[Path]:
    if tokenizer:
        if not Path(tokenizer).is_dir():
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no such directory.")
        if not any((Path(tokenizer) / n).is_file() for n in TOKENIZER_FILES):
            # Checked before anything is written: no half-made export.
            raise ConversionError(f"{tokenizer} holds no tokenizer files ({TOKENIZER_FILES}).")
        return Path(tokenizer)
    saved = read_run_config(extra)["data"]["tokenizer_model"]
    return Path(saved) if saved and Path(saved).is_dir() else None


def write_hf_directory(model: LoopMDMForMaskedDiffusion, save_dir, tokenizer_dir=None) -> None:
    """save_pretrained (sharded safetensors) plus the model code, auto_map and tokenizer.

    Written into a fresh temporary directory next to `save_dir` and renamed into place, so an
    interrupted conversion leaves no half-made export, and files of an earlier export (e.g. its
    tokenizer) never mix in. An existing `save_dir` is replaced only if it is an earlier export.
    Files are readable by others (safetensors writes 0600).
    """
    final = Path(save_dir)
    if final.exists() and any(final.iterdir()) and not _is_export(final):
        raise ConversionError(
            f"{final} exists and is not a LoopMDM export; choose a new --save directory."
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        _write_hf_files(model, staging, tokenizer_dir)
        _make_readable(staging)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _is_export(directory: Path) -> bool:
    try:
        return json.loads((directory / "config.json").read_text()).get("auto_map") == AUTO_MAP
    except (OSError, ValueError):
        return False


def _make_readable(directory: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for path in directory.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _name_tokenizer_class(save_dir: Path) -> None:
    # Without `tokenizer_class`, AutoTokenizer falls back to config.json's auto_map and asks
    # interactively whether to run remote code: a script without a terminal hangs.
    path = save_dir / "tokenizer_config.json"
    if not (save_dir / "tokenizer.json").is_file():
        return
    config = json.loads(path.read_text()) if path.is_file() else {}
    if not config.get("tokenizer_class"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2) + "\n")


def _write_hf_files(model: LoopMDMForMaskedDiffusion, save_dir: Path, tokenizer_dir) -> None:
    model.config.auto_map = dict(AUTO_MAP)
    model.config.architectures = ["LoopMDMForMaskedDiffusion"]
    model.save_pretrained(save_dir, max_shard_size="5GB")
    for name in MODEL_FILES:
        shutil.copyfile(HF_DIR / name, save_dir / name)
    # HF's autoregressive generate() does not apply; `diffusion_generate` samples.
    GenerationConfig(mask_token_id=model.config.mask_token_id).save_pretrained(save_dir)
    if tokenizer_dir is not None:
        copied = [n for n in TOKENIZER_FILES if (Path(tokenizer_dir) / n).is_file()]
        for name in copied:
            shutil.copyfile(Path(tokenizer_dir) / name, save_dir / name)
        if not copied:
            raise ConversionError(f"{tokenizer_dir} holds no tokenizer files ({TOKENIZER_FILES}).")
        _name_tokenizer_class(save_dir)


def convert_checkpoint_to_hf(
    load, save, iteration: Optional[int] = None, dtype: str = "fp32", tokenizer=None
) -> Path:
    """Writes the HF directory `save` from the megatron checkpoint under `load`; returns it."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}.")
    iteration, extra, state = load_megatron_state(load, iteration)
    tokenizer_dir = _tokenizer_source(tokenizer, extra)
    config = mapping.hf_config_from_extra(extra)
    model = hf_model_from_state(config, mapping.megatron_to_hf(state, config))
    write_hf_directory(model.to(DTYPES[dtype]), save, tokenizer_dir)
    return Path(save)


def read_hf_config(hf_dir) -> LoopMDMConfig:
    """The LoopMDM config of an HF directory, with clear errors for anything else."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir}: no such directory.")
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{hf_dir} is not a Hugging Face model directory: no config.json.")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != LoopMDMConfig.model_type:
        raise ConversionError(
            f"{hf_dir} holds a {model_type!r} model; only {LoopMDMConfig.model_type!r} converts."
        )
    return LoopMDMConfig.from_pretrained(hf_dir)


def load_hf_model(hf_dir, dtype: Optional[torch.dtype] = None) -> LoopMDMForMaskedDiffusion:
    """The HF model of a LoopMDM directory (this package's classes; no remote code needed)."""
    config = read_hf_config(hf_dir)
    try:
        model = LoopMDMForMaskedDiffusion.from_pretrained(hf_dir, config=config, dtype=dtype)
    except OSError as e:
        raise ConversionError(f"{hf_dir}: the weights cannot be read: {e}") from e
    return model.eval()


def convert_hf_to_checkpoint(load, save, iteration: int = 0) -> Path:
    """Writes a megatron dist checkpoint at `iteration` under `save` from the HF directory
    `load`; any TP/PP layout loads it (`pretrain_loopmdm.py --load SAVE --finetune`)."""
    hf_model = load_hf_model(load)
    config = hf_model.config
    extra = mapping.extra_from_hf_config(config)
    dtype = next(hf_model.parameters()).dtype
    tokenizer = any((Path(load) / n).is_file() for n in TOKENIZER_FILES)
    extra["run_config"] = conversion_run_config_json(
        str(dtype).removeprefix("torch."),
        "HuggingFaceTokenizer" if tokenizer else None,
        str(Path(load).resolve()) if tokenizer else None,
        {"converted_from": str(Path(load).resolve()), "mask_token_id": config.mask_token_id},
    )
    tensors = mapping.hf_to_megatron(hf_model.state_dict(), config)
    return save_weights_as_checkpoint(extra, tensors, save, iteration, dtype)


def save_weights_as_checkpoint(
    extra: dict, tensors: dict, save, iteration: int, dtype: torch.dtype = torch.float32
) -> Path:
    """Builds the TP=1/PP=1 model of `extra`, fills it with `tensors` (every tensor of its state
    dict must be given) and saves it as a dist checkpoint; -> the iteration directory."""
    with single_process_group(ConversionError):
        model = build_megatron_model(extra, dtype)
        state = model.state_dict()
        unknown = [k for k, v in state.items() if isinstance(v, torch.Tensor) and k not in tensors]
        assert not unknown, f"no source weight maps to {unknown}"
        state.update(tensors)
        model.load_state_dict(state, strict=True)
        return ckpt.save_checkpoint(save, iteration, [model], optimizer=None, extra=extra)


def load_for_inference(
    path,
    device: str = "cpu",
    dtype: Optional[torch.dtype] = None,
    iteration: Optional[int] = None,
) -> LoopMDMForMaskedDiffusion:
    """See `megatron_loopmdm.hf.load_for_inference`."""
    if (Path(path) / "config.json").is_file():
        model = load_hf_model(path, dtype)
    else:
        _, extra, state = load_megatron_state(path, iteration)
        config = mapping.hf_config_from_extra(extra)
        model = hf_model_from_state(config, mapping.megatron_to_hf(state, config))
        if dtype is not None:
            model = model.to(dtype)
    return model.to(device).eval()


__all__ = [
    "ConversionError",
    "convert_checkpoint_to_hf",
    "convert_hf_to_checkpoint",
    "load_for_inference",
    "read_checkpoint_extra",
]
