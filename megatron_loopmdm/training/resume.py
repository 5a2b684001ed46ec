"""Resuming safely: the save lock, the checkpoint format check, the LR-schedule rule.

Library functions called by `training.loop` and `training.run`; each raises a one-line error
naming what to change.
"""

import os
import signal

import megatron_loopmdm.checkpointing.dist_checkpoint as ckpt
from megatron_loopmdm.training.logging import print_rank_last

import torch

# SIGTERM: scancel, preemption, `kill -TERM -PGID`; SIGINT: Ctrl-C; SIGUSR1: SLURM's --signal.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def save_unless_diverging(run, iteration: int, skipped: int, consecutive: int) -> None:
    """Saves, except during a streak of non-finite steps: `latest` keeps finite weights."""
    if consecutive:
        print_rank_last(
            f" not saving at iteration {iteration}: the last {consecutive} steps were "
            "non-finite; the previous checkpoint stays the latest"
        )
        return
    run.save(iteration, skipped)
    checkpoint = run.run_config.checkpoint
    if checkpoint.keep_last:
        ckpt.prune_checkpoints(checkpoint.save, checkpoint.keep_last)


def check_mask_token_id(mask_token_id, vocab_size: int, what: str) -> None:
    """Refuses a [MASK] id outside the real (unpadded) vocabulary: padding ids never occur."""
    if mask_token_id is None or not 0 <= mask_token_id < vocab_size:
        raise ValueError(
            f"--mask-token-id {mask_token_id} is outside {what} ({vocab_size} ids); give an id "
            f"below {vocab_size}, or a tokenizer with a mask token."
        )


def acquire_save_lock(root):
    """Takes `root`'s save lock on rank 0; every rank raises the same error if it is held."""
    lock, message = ckpt.SaveLock(root), [None]
    if torch.distributed.get_rank() == 0:
        try:
            lock.acquire()
        except ckpt.CheckpointError as error:
            message[0] = str(error)
    torch.distributed.broadcast_object_list(message, src=0)
    if message[0]:
        raise ckpt.CheckpointError(message[0])
    return lock


def check_checkpoint_format(root, deepspeed: bool) -> None:
    """Refuses a DeepSpeed checkpoint without --deepspeed, and a megatron one with it."""
    has_ds = os.path.isfile(os.path.join(root, ckpt.DEEPSPEED_LATEST_FILE))
    has_megatron = os.path.isfile(os.path.join(root, ckpt.LATEST_FILE))
    if has_ds and not has_megatron and not deepspeed:
        raise ValueError(
            f"--load {root} holds a DeepSpeed checkpoint; add --deepspeed --deepspeed-config "
            "with the config it was trained with."
        )
    if has_megatron and not has_ds and deepspeed:
        raise ValueError(
            f"--load {root} holds a megatron checkpoint; drop --deepspeed to resume it."
        )


# The schedule fields compared on resume (those that shape the LR and weight decay).
_SCHEDULE_FIELDS = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-iters",
    "lr_decay_steps": "--lr-decay-iters (default --train-iters)",
    "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay",
    "end_wd": "--weight-decay",
}


def schedule_differences(saved: dict, ours: dict) -> list[str]:
    """The LR-schedule fields where the checkpoint and the flags disagree, as readable lines."""
    fields = dict(_SCHEDULE_FIELDS)
    if saved.get("lr_decay_style") == ours["lr_decay_style"] == "constant":
        del fields["lr_decay_steps"]  # a constant LR does not depend on the decay length
    return [
        f"{flag}: checkpoint {saved[name]!r}, flags {ours[name]!r}"
        for name, flag in fields.items()
        if name in saved and saved[name] != ours[name]
    ]


def check_schedule(optimization, load, saved: dict, ours: dict) -> None:
    """Megatron-LM's rule: a changed schedule on resume must be chosen explicitly.

    Args:
        optimization: the run's `training.config.OptimizationConfig`.
        load: the checkpoint directory, for the message.
        saved, ours: the checkpoint's and this run's `OptimizerParamScheduler.state_dict()`.
    """
    if optimization.override_opt_param_scheduler or optimization.use_checkpoint_opt_param_scheduler:
        return
    differences = schedule_differences(saved, ours)
    if differences:
        raise ValueError(
            f"--load {load}: the flags' learning-rate schedule differs from the "
            f"checkpoint's ({'; '.join(differences)}). Pass --override-opt-param-scheduler to "
            "take the flags, or --use-checkpoint-opt-param-scheduler to take the checkpoint's."
        )


def match_param_group_lrs(optimizer, saved: dict):
    """Sets the groups' max/min LR to the checkpoint's (megatron matches saved groups by them);
    returns a function that puts the flags' values back after loading."""
    groups = getattr(optimizer, "param_groups", [])
    ours = [(group.get("max_lr"), group.get("min_lr")) for group in groups]
    for group in groups:
        if "max_lr" in group:
            group["max_lr"], group["min_lr"] = saved["max_lr"], saved["min_lr"]

    def restore():
        for group, (max_lr, min_lr) in zip(optimizer.param_groups, ours):
            if max_lr is not None:
                group["max_lr"], group["min_lr"] = max_lr, min_lr

    return restore
