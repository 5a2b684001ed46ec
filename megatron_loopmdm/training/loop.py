"""The pre-training loop: `train(run)` steps, validates and saves a `training.run.Run`.

`pretrain(config)` is what `pretrain_loopmdm.py` calls with the typed configuration
(`training.arguments.run_config_from_args`).
"""

import signal

import megatron_loopmdm.checkpointing.dist_checkpoint as ckpt
from megatron_loopmdm.distributed.parallel import any_rank, destroy_distributed
from megatron_loopmdm.models.loop_sampling import draw_num_loops
from megatron_loopmdm.training.config import RunConfig
from megatron_loopmdm.training.logging import TrainingLogger, print_rank_last
from megatron_loopmdm.training.resume import STOP_SIGNALS, acquire_save_lock, save_unless_diverging
from megatron_loopmdm.training.run import Run

import torch


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many non-finite steps); the message says why."""


def _validate(run: Run, logger: TrainingLogger, iteration: int, num_loops: int) -> None:
    for chunk in run.chunks:
        chunk.eval()
    with torch.no_grad():
        # The same validation batches every time: evaluations compare across iterations.
        nelbo = run.evaluate(run.loader(run.valid_data, 0), num_loops)
    if nelbo is not None:
        logger.log_validation(iteration, nelbo, num_loops)


def train(run: Run) -> None:
    """The training loop, from a fresh start or a resumed checkpoint."""
    config = run.run_config
    training, logs = config.training, config.logging
    save, every = config.checkpoint.save, config.checkpoint.save_interval
    iteration, skipped = run.load() if config.checkpoint.load else (0, 0)
    consecutive_skipped = 0
    logger = TrainingLogger(
        training.train_iters,
        logs.log_interval,
        run.parallel.world_size,
        logs.tensorboard_dir,
        logs.wandb_project,
        logs.metrics_file,
    )
    if iteration >= training.train_iters:
        print_rank_last(
            f" the checkpoint is at iteration {iteration}, already at --train-iters "
            f"{training.train_iters}: nothing to train. Raise --train-iters to continue."
        )
        logger.close()
        return
    train_iter = run.loader(run.train_data, iteration * training.global_batch_size)
    eval_loops = logs.eval_num_loops or run.loop_config.max_loops
    tokens_per_step = training.global_batch_size * run.size.seq_length
    stop = {"signal": None}

    def _on_signal(signum, _frame):
        stop["signal"] = signum

    if save:
        ckpt.start_writer_helper()  # before any signal can arrive: see its docstring
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, _on_signal)
    while iteration < training.train_iters and not any_rank(stop["signal"] is not None):
        num_loops = draw_num_loops(run.loop_config, training.seed, iteration)
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
        logger.maybe_log(iteration, run.learning_rate, training.global_batch_size)
        if consecutive_skipped >= training.max_skipped_iterations:
            logger.close()
            raise TrainingError(
                f"{consecutive_skipped} consecutive iterations had a non-finite loss or "
                f"gradients (last at iteration {iteration}); stopping. Lower --lr, raise "
                "--lr-warmup-iters or check the data, then resume from the last checkpoint."
            )
        if logs.eval_interval and iteration % logs.eval_interval == 0:
            _validate(run, logger, iteration, eval_loops)
        if save and every and iteration % every == 0:
            save_unless_diverging(run, iteration, skipped, consecutive_skipped)
    stopped = iteration < training.train_iters
    # (A stop at a multiple of --save-interval has just been saved by the periodic save.)
    if save and (not every or iteration % every):
        save_unless_diverging(run, iteration, skipped, consecutive_skipped)
    logger.close()
    if stopped:
        name = signal.Signals(stop["signal"]).name if stop["signal"] else "a signal on another rank"
        print_rank_last(f" stopped by {name} at iteration {iteration}")


def pretrain(config: RunConfig) -> None:
    """Builds the run from its configuration and trains it."""
    run = Run(config)
    lock = None
    try:
        if config.checkpoint.save:
            lock = acquire_save_lock(config.checkpoint.save)
        train(run)
    finally:
        if lock is not None:
            lock.release()
        destroy_distributed()
