"""Megatron-style training log lines and TensorBoard scalars.

The line is printed by the last rank (which holds the loss, as in Megatron-LM's
`print_rank_last`); TensorBoard is written by the same rank.
"""

import datetime
import json
import time
from dataclasses import dataclass, field
from typing import Optional

import torch


def is_last_rank() -> bool:
    if not torch.distributed.is_initialized():
        return True
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def print_rank_last(message: str) -> None:
    if is_last_rank():
        print(message, flush=True)


def _format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


@dataclass
class IntervalStats:
    """What accumulates between two log lines."""

    losses: list = field(default_factory=list)
    loops: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    intermediate_losses: list = field(default_factory=list)
    by_t: Optional[torch.Tensor] = None
    tokens: int = 0
    flops: float = 0.0
    skipped: int = 0
    start: float = field(default_factory=time.perf_counter)


class TrainingLogger:
    """Collects per-step results; writes a log line and TensorBoard scalars every interval."""

    def __init__(
        self,
        train_iters: int,
        log_interval: int,
        world_size: int,
        tensorboard_dir: Optional[str] = None,
        wandb_project: Optional[str] = None,
        metrics_file: Optional[str] = None,
    ):
        self.train_iters = train_iters
        self.log_interval = log_interval
        self.world_size = world_size
        self.stats = IntervalStats()
        self.run_start = time.perf_counter()
        self.iterations_timed = 0
        self.writer = None
        self.wandb = None
        self.metrics = open(metrics_file, "a") if metrics_file and is_last_rank() else None
        if tensorboard_dir and is_last_rank():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        if wandb_project and is_last_rank():
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError("--wandb-project needs wandb: pip install wandb") from e
            self.wandb = wandb.init(project=wandb_project)

    def record(
        self,
        iteration: int,
        result,
        num_loops: int,
        tokens: int,
        flops: float,
        learning_rate: float,
    ) -> None:
        """Adds one step's results (`result` is a `training.step.StepResult`)."""
        stats = self.stats
        by_t = result.loss_by_t
        intermediate = result.intermediate_loss  # with --intermediate-loop-loss-weight only
        if self.metrics is not None:
            grad_norm = None if result.grad_norm is None else float(result.grad_norm)
            line = {
                "iteration": iteration,
                "loss": result.loss,
                "grad_norm": grad_norm,
                "num_loops": num_loops,
                "learning_rate": learning_rate,
                "skipped": not result.update_successful,
            }
            if intermediate is not None:
                line["intermediate_loss"] = intermediate
            self.metrics.write(json.dumps(line) + "\n")
            self.metrics.flush()
        if not result.update_successful:
            stats.skipped += 1
        elif result.loss is not None:
            stats.losses.append(result.loss)
            if intermediate is not None:
                stats.intermediate_losses.append(intermediate)
        stats.loops.append(num_loops)
        if result.grad_norm is not None and result.update_successful:
            stats.grad_norms.append(float(result.grad_norm))
        if by_t is not None:
            stats.by_t = by_t if stats.by_t is None else stats.by_t + by_t
        stats.tokens += tokens
        stats.flops += flops

    def scalar(self, name: str, value: float, iteration: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, iteration)
        if self.wandb is not None:
            self.wandb.log({name: value}, step=iteration)

    def maybe_log(self, iteration: int, learning_rate: float, global_batch_size: int) -> None:
        if iteration % self.log_interval and iteration != self.train_iters:
            return
        stats, now = self.stats, time.perf_counter()
        steps = len(stats.loops)
        elapsed = now - stats.start
        per_iter = elapsed / max(steps, 1)
        self.iterations_timed += steps
        eta = per_iter * (self.train_iters - iteration)
        loss = sum(stats.losses) / len(stats.losses) if stats.losses else float("nan")
        grad_norm = sum(stats.grad_norms) / len(stats.grad_norms) if stats.grad_norms else 0.0
        intermediate = None  # the term --intermediate-loop-loss-weight adds to the trained loss
        if stats.intermediate_losses:
            intermediate = sum(stats.intermediate_losses) / len(stats.intermediate_losses)
        tokens_per_s = stats.tokens / elapsed
        tflops = stats.flops / elapsed / self.world_size / 1e12
        line = (
            f" [{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] iteration {iteration:>8d}/"
            f"{self.train_iters:>8d} | consumed samples: {iteration * global_batch_size:>10d} | "
            f"elapsed time per iteration (ms): {per_iter * 1e3:.1f} | "
            f"learning rate: {learning_rate:.6E} | global batch size: {global_batch_size:>4d} | "
            f"loss: {loss:.6E} | "
            + ("" if intermediate is None else f"intermediate-loop term: {intermediate:.6E} | ")
            + f"loops: {','.join(map(str, stats.loops))} | "
            f"grad norm: {grad_norm:.3f} | tokens/s: {tokens_per_s:.1f} | "
            f"TFLOP/s/device: {tflops:.4f} | number of skipped iterations: {stats.skipped:>3d} | "
            # Steps are skipped only for non-finite losses or gradients: the two counts agree.
            f"number of nan iterations: {stats.skipped:>3d} | elapsed: "
            f"{_format_eta(now - self.run_start)} | ETA: {_format_eta(eta)} |"
        )
        print_rank_last(line)
        if stats.losses:
            self.scalar("lm-loss", loss, iteration)
        if intermediate is not None:
            self.scalar("intermediate-loop-loss", intermediate, iteration)
        self.scalar("learning-rate", learning_rate, iteration)
        self.scalar("grad-norm", grad_norm, iteration)
        self.scalar("num-loops", sum(stats.loops) / max(steps, 1), iteration)
        self.scalar("tokens-per-sec", tokens_per_s, iteration)
        self.scalar("tflops-per-device", tflops, iteration)
        self.scalar("skipped-iterations", stats.skipped, iteration)
        if stats.by_t is not None:
            for k in range(stats.by_t.size(1)):
                if stats.by_t[1, k] > 0:
                    self.scalar(
                        f"lm-loss-by-t/bucket{k}",
                        (stats.by_t[0, k] / stats.by_t[1, k]).item(),
                        iteration,
                    )
        if torch.cuda.is_available():
            self.scalar(
                "mem-max-allocated-GB", torch.cuda.max_memory_allocated() / 2**30, iteration
            )
        if self.writer is not None:
            self.writer.flush()
        self.stats = IntervalStats()

    def log_validation(self, iteration: int, nelbo: float, num_loops: int) -> None:
        print_rank_last(
            f" validation at iteration {iteration} | loops: {num_loops} | "
            f"nelbo: {nelbo:.6E} | ppl bound: {torch.tensor(nelbo).exp().item():.3f}"
        )
        self.scalar("validation-loss", nelbo, iteration)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
