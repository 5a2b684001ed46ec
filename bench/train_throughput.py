"""Training throughput through the real training path (megatron DDP, optimizer, schedules).

For each size: tokens/s and model TFLOP/s (effective-depth FLOPs from
`models.flops.flops_per_token`) of the looped model at S = S_max, and its step time over the
unrolled equivalent's (same effective depth and FLOPs; target <= 1.03). The two models alternate
step by step so drifts of a shared machine cancel. On GPU pass --bf16; with --peak-tflops the
model FLOP utilisation (MFU) is printed too.

    python bench/train_throughput.py [--sizes debug smdm-113m] [--seq-length 256]

The last line is `train_loop_vs_unrolled_ratio=<worst ratio>`.
"""

import argparse
import os
import statistics
import time

import megatron_loopmdm  # noqa: F401  (before megatron)
from megatron_loopmdm.diffusion.config import DiffusionConfig
from megatron_loopmdm.distributed.parallel import (
    ParallelConfig,
    destroy_distributed,
    initialize_distributed,
    set_seed,
)
from megatron_loopmdm.models.builder import replace_size, transformer_config
from megatron_loopmdm.models.config import LoopConfig, LoopMDMModelConfig
from megatron_loopmdm.models.flops import flops_per_token
from megatron_loopmdm.models.sizes import get_model_size
from megatron_loopmdm.training.backend import build_training
from megatron_loopmdm.training.setup import default_optimizer_config
from megatron_loopmdm.training.step import make_forward_step

import torch


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["debug", "smdm-113m"])
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU")
    parser.add_argument("--device", choices=["cpu", "cuda"])
    return parser.parse_args()


class Trainer:
    """One model on the real training path, stepping on fixed random tokens."""

    def __init__(self, size, loop_config, args, device, dtype, num_loops):
        config = transformer_config(
            size, ParallelConfig(), params_dtype=dtype, calculate_per_token_loss=True
        )
        model_config = LoopMDMModelConfig(args.vocab_size, size.seq_length, args.vocab_size - 1)
        self.backend = build_training(
            config,
            loop_config,
            model_config,
            ParallelConfig(),
            default_optimizer_config(params_dtype=dtype),
            init_seed=0,
            device=device,
            num_microbatches=1,
            seq_length=size.seq_length,
            micro_batch_size=args.micro_batch_size,
        )
        self.chunks = self.backend.chunks
        self.forward_step = make_forward_step(DiffusionConfig(args.vocab_size - 1), 0, num_loops)
        tokens = torch.randint(0, args.vocab_size - 1, (args.micro_batch_size, size.seq_length))
        self.batch = {
            "tokens": tokens.to(device),
            "sample_index": torch.arange(args.micro_batch_size),
        }
        self.args, self.size = args, size

    def step(self):
        self.backend.train_step(self.forward_step, [self.batch])


def timed(trainer, sync):
    sync()
    start = time.perf_counter()
    trainer.step()
    sync()
    return time.perf_counter() - start


def main():
    args = parse_args()
    os.environ.setdefault("MASTER_PORT", "29733")
    device = initialize_distributed(ParallelConfig(), args.device)
    set_seed(0)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    print(
        f"device={device} dtype={dtype} seq={args.seq_length} batch={args.micro_batch_size} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"{'size':>10} {'S':>2} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'ratio':>6}")
    worst = 0.0
    for name in args.sizes:
        size = replace_size(get_model_size(name), seq_length=args.seq_length)
        loop = LoopConfig(size.loop_layers, size.max_loops)
        looped = Trainer(size, loop, args, device, dtype, num_loops=size.max_loops)
        depth = len(loop.unrolled_layer_indices(size.num_layers, size.max_loops))
        unrolled = Trainer(
            replace_size(size, num_layers=depth),
            LoopConfig((0, 1), 1),
            args,
            device,
            dtype,
            num_loops=1,
        )
        times = ([], [])
        for i in range(args.warmup + args.iters):
            for k, trainer in enumerate((looped, unrolled)):
                elapsed = timed(trainer, sync)
                if i >= args.warmup:
                    times[k].append(elapsed)
        ratio = statistics.median(a / b for a, b in zip(*times))
        worst = max(worst, ratio)
        step = statistics.median(times[0])
        tokens = args.micro_batch_size * args.seq_length
        flops = (
            flops_per_token(
                looped.chunks[0].module.config,
                loop,
                args.vocab_size,
                args.seq_length,
                size.max_loops,
            )
            * tokens
        )
        tflops = flops / step / 1e12
        mfu = f"{tflops / args.peak_tflops:.1%}" if args.peak_tflops else "-"
        print(
            f"{name:>10} {size.max_loops:>2} {tokens / step:>9.1f} {tflops:>8.4f} {mfu:>6} "
            f"{ratio:>6.3f}"
        )
        del looped, unrolled
    destroy_distributed()
    print(f"train_loop_vs_unrolled_ratio={worst:.3f}")


if __name__ == "__main__":
    main()
