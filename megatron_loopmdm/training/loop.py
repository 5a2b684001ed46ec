"""The pre-training loop: `train(run)` steps, validates and saves a `training.run.Run`.

`pretrain(args)` is what `pretrain_loopmdm.py` calls after parsing.
"""

import signal

import megatron_loopmdm.training.checkpointing as ckpt
from megatron_loopmdm.distributed.parallel import any_rank, destroy_distributed
from megatron_loopmdm.models.loop_sampling import draw_num_loops
from megatron_loopmdm.training.logging import TrainingLogger, print_rank_last
from megatron_loopmdm.training.resume import STOP_SIGNALS, acquire_save_lock, save_unless_diverging
from megatron_loopmdm.training.run import Run

import torch


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. too many non-finite steps); the message says why."""


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
