"""Distributed checkpoints (megatron `torch_dist` format) of the model and optimizer.

Layout on disk, as in Megatron-LM:

    SAVE_DIR/iter_0000100/                    one dist checkpoint, loadable at any TP/PP/DP
    SAVE_DIR/latest_checkpointed_iteration.txt

A save writes into `iter_XXXXXXX.tmp` and renames it when every rank has finished, then
replaces the `latest` marker, so a crash during a save never corrupts the last good checkpoint.
A load checks the checkpoint first (`safe_load.check_dist_checkpoint`: the `.metadata` parsed
by an allow-listing unpickler, every shard present and long enough); an incomplete newest
checkpoint is reported and skipped for the newest complete one.
"""

import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Optional

from megatron_loopmdm.checkpointing.optimizer_fixes import prepare_for_loading
from megatron_loopmdm.checkpointing.safe_load import UnsafeCheckpointError, check_dist_checkpoint

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async
from torch.distributed.checkpoint.api import CheckpointException

LATEST_FILE = "latest_checkpointed_iteration.txt"
DEEPSPEED_LATEST_FILE = "latest"  # DeepSpeed's own marker of its newest checkpoint's tag
RUN_CONFIG_FILE = "run_config.json"  # `checkpointing.run_config`, readable without this package
LOCK_FILE = ".save.lock"
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or loaded; the message names the file and the fix."""


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


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _detach_from_process_group() -> None:
    # Runs in the writer's helper process: its own session, so a signal to the trainer's process
    # group (torchrun, SLURM, `kill -TERM -PGID`) leaves it alive for the stop-save. It starts
    # with the signals blocked (inherited from the trainer) and unblocks them once detached.
    os.setsid()
    if sys.platform.startswith("linux"):
        # Outside the trainer's group, a `kill -9` of the trainer would leave it orphaned: die
        # with the trainer instead (PR_SET_PDEATHSIG).
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def start_writer_helper() -> None:
    """Starts megatron's checkpoint-writer helper (a multiprocessing Manager) in its own session.

    megatron starts it lazily at the first save, in the trainer's process group; a SIGTERM to
    that group then kills it, and the stop-save fails with `BrokenPipeError`. Started here first,
    megatron reuses it. Idempotent.
    """
    if filesystem_async._results_queue is not None:
        return
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    # Blocked while it starts, so a signal arriving now cannot kill it before it detaches;
    # the trainer gets any pending signal when they are unblocked.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        manager.start(initializer=_detach_from_process_group)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    filesystem_async._results_queue = manager.Queue()
    filesystem_async._loopmdm_manager = manager  # keeps it alive; shut down at exit


def save_checkpoint(root, iteration: int, chunks: list, optimizer=None, extra=None) -> Path:
    """Saves model (and optimizer) state at `iteration` under `root`; returns its directory.

    `extra` holds plain Python state saved once (e.g. the LR scheduler, consumed samples and the
    run's arguments).
    """
    final = checkpoint_dir(root, iteration)
    staging = final.with_name(final.name + ".tmp")
    start_writer_helper()
    if _is_rank0():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    state = _sharded_state(chunks, optimizer, iteration, is_loading=False, extra=extra)
    try:
        dist_checkpointing.save(state, str(staging))
        _barrier()
        if _is_rank0():
            if extra and "run_config" in extra:  # the run configuration as a plain JSON file too
                (staging / RUN_CONFIG_FILE).write_text(extra["run_config"] + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            marker = Path(root) / LATEST_FILE
            marker_tmp = marker.with_suffix(".tmp")
            marker_tmp.write_text(f"{iteration}\n")
            os.replace(marker_tmp, marker)
    except (OSError, CheckpointException) as error:
        # torch's checkpoint writer reports a full disk as a CheckpointException (a
        # BaseException) around a RuntimeError that has lost the errno: say what the disk holds.
        raise _write_failure(root, staging, error) from None
    _barrier()
    return final


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def _root_cause(error: BaseException) -> str:
    """The OSError's reason (e.g. "No space left on device") if one is in the chain, else the
    last line of what the writer reported."""
    found = [error]
    if isinstance(error, CheckpointException):
        found = [exc for exc, _trace in error.failures.values()]
    for exc in found:
        while exc is not None:
            if isinstance(exc, OSError) and exc.strerror:
                return exc.strerror
            exc = exc.__cause__ or exc.__context__
    lines = str(found[0]).strip().splitlines() or [type(found[0]).__name__]
    return lines[-1][:200]


def _write_failure(root, staging: Path, error: BaseException) -> CheckpointError:
    """A one-line error naming the disk and its free space; removes the partial `.tmp` save
    (rank 0) so the space it took is given back. `latest` was not touched."""
    usage = shutil.disk_usage(staging.parent)
    marked = latest_iteration(root) if (Path(root) / LATEST_FILE).is_file() else None
    if _is_rank0():
        shutil.rmtree(staging, ignore_errors=True)
    kept = (
        f"{LATEST_FILE} still names the intact iteration {marked}"
        if marked is not None
        else "there is no earlier checkpoint"
    )
    return CheckpointError(
        f"could not write the checkpoint {staging} ({_root_cause(error)}): the disk holding "
        f"--save ({_mount_point(staging.parent)}) has {usage.free / 2**20:.1f} MiB free of "
        f"{usage.total / 2**20:.1f} MiB. Free space or point --save elsewhere; the partial "
        f"{staging.name} was removed and {kept}."
    )


def latest_iteration(root) -> Optional[int]:
    """The iteration the `latest` marker names, or None when there is no checkpoint."""
    marker = Path(root) / LATEST_FILE
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{marker} is corrupt: expected an iteration number, found {text!r}.")
    return int(text)


def saved_iterations(root) -> list[int]:
    """Iterations of the finished (renamed) checkpoint directories under `root`, ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = (_ITER_DIR.match(entry.name) for entry in root.iterdir() if entry.is_dir())
    return sorted(int(match.group(1)) for match in found if match)


def saved_checkpoint_dir(root, iteration: int) -> Path:
    """The directory of `--iteration` under `root` (megatron or DeepSpeed format alike).

    Raises:
        CheckpointError: it does not exist (the message lists the saved iterations).
    """
    directory = checkpoint_dir(root, iteration)
    if not directory.is_dir():
        have = ", ".join(map(str, saved_iterations(root))) or "none"
        raise CheckpointError(
            f"--iteration {iteration}: {directory} does not exist (saved iterations: {have})."
        )
    return directory


def _warn(message: str) -> None:
    if _is_rank0():
        print(f"WARNING: {message}", flush=True)


def select_checkpoint(root, iteration: Optional[int] = None) -> Optional[int]:
    """The checkpoint to load: `iteration` if given, else the newest complete one.

    A newest checkpoint that is incomplete (deleted or truncated shard or `.metadata`, a
    missing directory named by `latest`) is reported in one line and skipped. Returns None when
    `root` holds no checkpoint at all.

    Raises:
        CheckpointError: `iteration` is missing or broken, or every checkpoint is broken.
        UnsafeCheckpointError: a `.metadata` names code (never skipped: it is tampering).
    """
    if iteration is not None:
        _check_or_raise(saved_checkpoint_dir(root, iteration))
        return iteration
    candidates = saved_iterations(root)
    marked = latest_iteration(root)
    if marked is not None and marked not in candidates:
        _warn(f"{LATEST_FILE} names iteration {marked}, but {checkpoint_dir(root, marked)} is "
              "missing; looking for an earlier checkpoint.")  # fmt: skip
    if not candidates:
        if marked is None:
            return None
        raise CheckpointError(f"{root}: no checkpoint directory left; start without --load.")
    problems = []
    for candidate in reversed(candidates):
        try:
            check_dist_checkpoint(checkpoint_dir(root, candidate))
            return candidate
        except UnsafeCheckpointError:
            raise
        except (ValueError, FileNotFoundError) as error:
            problems.append(str(error))
            _warn(f"skipping incomplete checkpoint: {error}")
    raise CheckpointError(f"{root}: every checkpoint is incomplete (newest: {problems[0]}).")


def _check_or_raise(directory) -> None:
    try:
        check_dist_checkpoint(directory)
    except UnsafeCheckpointError:
        raise
    except (ValueError, FileNotFoundError) as error:
        raise CheckpointError(f"{error} Choose another --iteration.") from None


def prune_checkpoints(root, keep_last: int) -> list[int]:
    """Deletes all but the newest `keep_last` finished checkpoints; returns those deleted.

    Rank 0 only; call after a save has finished (every rank past its barrier).
    """
    if not _is_rank0() or keep_last <= 0:
        return []
    old = saved_iterations(root)[:-keep_last]
    for iteration in old:
        shutil.rmtree(checkpoint_dir(root, iteration), ignore_errors=True)
    return old


class SaveLock:
    """A lock file in `--save` naming the host and process of the one run writing there.

    A lock left by a process that no longer runs on this host (a killed run) is stale and taken
    over; a lock from another host cannot be checked and must be removed by hand.
    """

    def __init__(self, root):
        self.path = Path(root) / LOCK_FILE
        self.owned = False

    def acquire(self) -> None:
        """Raises CheckpointError naming the owner when another live run holds the lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    raise CheckpointError(self._held_message()) from None
                _warn(f"removing the stale lock {self.path} ({self._owner()}: not running).")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as file:
                file.write(mine)
            self.owned = True
            return
        raise CheckpointError(self._held_message())

    def _owner(self) -> str:
        try:
            return self.path.read_text().strip() or "an unknown process"
        except FileNotFoundError:
            return "nobody"

    def _stale(self) -> bool:
        parts = self._owner().split()
        if len(parts) != 2 or not parts[1].isdigit():
            return False
        host, pid = parts[0], int(parts[1])
        if host != socket.gethostname():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _held_message(self) -> str:
        host_pid = self._owner().split()
        who = f"pid {host_pid[1]} on host {host_pid[0]}" if len(host_pid) == 2 else self._owner()
        return (
            f"--save {self.path.parent} is in use by another run ({who}; lock file {self.path}). "
            "Wait for it, choose another --save, or delete the lock file if that run is gone."
        )

    def release(self) -> None:
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.owned = False


def read_extra_state(root, iteration: int) -> dict:
    """The `extra` state of a checkpoint, read without loading any tensor."""
    check_dist_checkpoint(checkpoint_dir(root, iteration))
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
        iteration = select_checkpoint(root)
        if iteration is None:
            raise FileNotFoundError(f"No checkpoint under {root}: {LATEST_FILE} is missing.")
    directory = checkpoint_dir(root, iteration)
    if not directory.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {directory} does not exist.")
    check_dist_checkpoint(directory)  # never unpickle code: megatron reads .metadata next
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
