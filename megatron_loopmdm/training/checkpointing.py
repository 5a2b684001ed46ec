"""Distributed checkpoints (megatron `torch_dist` format) of the model and optimizer.

Layout on disk, as in Megatron-LM:

    SAVE_DIR/iter_0000100/                    one dist checkpoint, loadable at any TP/PP/DP
    SAVE_DIR/latest_checkpointed_iteration.txt

A save writes into `iter_XXXXXXX.tmp` and renames it when every rank has finished, then
replaces the `latest` marker, so a crash during a save never corrupts the last good checkpoint.
"""

import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from megatron_loopmdm.training.optimizer_fixes import prepare_for_loading

import torch
from megatron.core import dist_checkpointing

LATEST_FILE = "latest_checkpointed_iteration.txt"


class _DropAsyncDeprecation(logging.Filter):
    # Synchronous saves run through megatron's async machinery, which then warns that its
    # *async* mode is deprecated; the message is about a feature we do not use.
    def filter(self, record: logging.LogRecord) -> bool:
        return "async save is deprecated" not in record.getMessage()


logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").addFilter(
    _DropAsyncDeprecation()
)
OPTIMIZER_SHARDING = "fully_reshardable"  # megatron's default fails on torch Adam (flattened_range)


def checkpoint_dir(root, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _unwrap(chunk):
    # Checkpoint keys are the bare model's, whatever wrapper (DDP) holds it.
    return getattr(chunk, "module", chunk)


def _model_state(chunks: list) -> dict:
    if len(chunks) == 1:
        return {"model": _unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def _sharded_state(chunks, optimizer, iteration, is_loading: bool, extra=None) -> dict:
    state = _model_state(chunks)
    if optimizer is not None:
        # The optimizer finds each parameter's sharding in the model state (any nesting).
        state["optimizer"] = optimizer.sharded_state_dict(
            state,
            is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING},
        )
    state["iteration"] = iteration
    state["extra"] = extra or {}
    return state


def _barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def save_checkpoint(root, iteration: int, chunks: list, optimizer=None, extra=None) -> Path:
    """Saves model (and optimizer) state at `iteration` under `root`; returns its directory.

    `extra` holds plain Python state saved once (e.g. the LR scheduler, consumed samples and the
    run's arguments).
    """
    final = checkpoint_dir(root, iteration)
    staging = final.with_name(final.name + ".tmp")
    if _is_rank0():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    state = _sharded_state(chunks, optimizer, iteration, is_loading=False, extra=extra)
    dist_checkpointing.save(state, str(staging))
    _barrier()
    if _is_rank0():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        marker = Path(root) / LATEST_FILE
        marker_tmp = marker.with_suffix(".tmp")
        marker_tmp.write_text(f"{iteration}\n")
        os.replace(marker_tmp, marker)
    _barrier()
    return final


def latest_iteration(root) -> Optional[int]:
    """The iteration the `latest` marker names, or None when there is no checkpoint."""
    marker = Path(root) / LATEST_FILE
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{marker} is corrupt: expected an iteration number, found {text!r}.")
    return int(text)


def read_extra_state(root, iteration: int) -> dict:
    """The `extra` state of a checkpoint, read without loading any tensor."""
    return dist_checkpointing.load_common_state_dict(str(checkpoint_dir(root, iteration))).get(
        "extra", {}
    )


def load_checkpoint(
    root, chunks: list, optimizer=None, iteration: Optional[int] = None
) -> tuple[int, dict]:
    """Loads a checkpoint into `chunks` (and `optimizer` unless None); returns its iteration and
    the `extra` state saved with it.

    Raises:
        FileNotFoundError: with the directory searched, when no checkpoint is there.
    """
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise FileNotFoundError(f"No checkpoint under {root}: {LATEST_FILE} is missing.")
    directory = checkpoint_dir(root, iteration)
    if not directory.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {directory} does not exist.")
    if optimizer is not None:
        prepare_for_loading(optimizer)
    state = _sharded_state(chunks, optimizer, iteration, is_loading=True)
    loaded = dist_checkpointing.load(state, str(directory))
    if len(chunks) == 1:
        _unwrap(chunks[0]).load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(chunks):
            _unwrap(chunk).load_state_dict(loaded[f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return int(loaded["iteration"]), loaded.get("extra", {})
