"""Train-step time and memory of the looped model over its unrolled equivalent.

For each loop count S, the looped model (prelude, loop block run S times, coda) and an unrolled
model with the same effective depth and the same FLOPs (prelude, S copies of the loop layers,
coda) run the same training steps: forward, backward and an AdamW step. The ratio of median
step times is the overhead of looping; the target is <= 1.03.

Memory: on GPU the peak allocated memory of a step; on CPU the bytes autograd saves for the
backward pass (the activation memory, measured exactly with saved-tensor hooks).

    python bench/loop_overhead.py [--hidden-size 256 --seq-length 128 --loops 1 2 4 8]

The last line is `loop_overhead_ratio=<worst ratio over S>`.
"""

import argparse
import os
import statistics
import time

import megatron_loopmdm  # noqa: F401  (before megatron)
from megatron_loopmdm.distributed.parallel import (
    ParallelConfig,
    destroy_distributed,
    initialize_distributed,
    set_seed,
)
from megatron_loopmdm.models.builder import build_model, replace_size, transformer_config
from megatron_loopmdm.models.config import LoopConfig, LoopMDMModelConfig
from megatron_loopmdm.models.flops import flops_per_token
from megatron_loopmdm.models.sizes import get_model_size

import torch


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-size", default="debug")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--ffn-hidden-size", type=int, default=1024)
    parser.add_argument("--num-attention-heads", type=int, default=4)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--loop-layers", type=int, nargs=2, default=[1, 2])
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--loops", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    return parser.parse_args()


class SavedActivationBytes:
    """Counts the bytes autograd saves for backward inside the context."""

    def __init__(self):
        self.bytes = 0
        self._seen = set()

    def _pack(self, tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
        if key not in self._seen:  # count each storage once (views share it)
            self._seen.add(key)
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def build(args, size, loop_config, num_layers, device, dtype):
    config = transformer_config(size, ParallelConfig(), params_dtype=dtype, num_layers=num_layers)
    model_config = LoopMDMModelConfig(args.vocab_size, args.seq_length, args.vocab_size - 1)
    return build_model(config, loop_config, model_config, init_seed=0).to(device)


def train_step(model, optimizer, num_loops, batch):
    loss = model(batch, num_loops=num_loops, labels=batch).float().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def paired_step_times(looped, unrolled, num_loops, batch, device, args):
    """Median step times and the median of per-pair ratios, the two models alternating.

    Alternating cancels slow drifts of the machine (other processes, clocks) that would bias
    two separate timing runs.
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    runs = [
        (looped, torch.optim.AdamW(looped.parameters(), lr=1e-4), num_loops),
        (unrolled, torch.optim.AdamW(unrolled.parameters(), lr=1e-4), 1),
    ]
    times = ([], [])
    for i in range(args.warmup + args.iters):
        for k, (model, optimizer, loops) in enumerate(runs):
            sync()
            start = time.perf_counter()
            train_step(model, optimizer, loops, batch)
            sync()
            if i >= args.warmup:
                times[k].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(*times)]
    return statistics.median(times[0]), statistics.median(times[1]), statistics.median(ratios)


def memory(model, num_loops, batch, device):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        model(batch, num_loops=num_loops, labels=batch).float().mean().backward()
        model.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated()
    with SavedActivationBytes() as saved:
        loss = model(batch, num_loops=num_loops, labels=batch).float().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return saved.bytes


def main():
    args = parse_args()
    os.environ.setdefault("MASTER_PORT", "29731")
    device = initialize_distributed(ParallelConfig(), args.device)
    set_seed(0)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    size = replace_size(
        get_model_size(args.model_size),
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=None,
    )
    loop_config = LoopConfig(loop_layers=tuple(args.loop_layers), max_loops=max(args.loops))
    looped = build(args, size, loop_config, args.num_layers, device, dtype)
    batch = torch.randint(
        0, args.vocab_size - 1, (args.micro_batch_size, args.seq_length), device=device
    )
    print(
        f"device={device} dtype={dtype} hidden={args.hidden_size} layers={args.num_layers} "
        f"loop={tuple(args.loop_layers)} seq={args.seq_length} batch={args.micro_batch_size} "
        f"threads={torch.get_num_threads()}"
    )
    print(
        f"{'S':>3} {'looped ms':>10} {'unrolled ms':>12} {'ratio':>7} {'GFLOP/s':>8} "
        f"{'looped mem MB':>14} {'unrolled mem MB':>16}"
    )
    worst = 0.0
    for num_loops in args.loops:
        depth = len(loop_config.unrolled_layer_indices(args.num_layers, num_loops))
        unrolled = build(args, size, LoopConfig((0, 1), max_loops=1), depth, device, dtype)
        t_loop, t_unrolled, ratio = paired_step_times(
            looped, unrolled, num_loops, batch, device, args
        )
        tokens = args.micro_batch_size * args.seq_length
        flops = (
            flops_per_token(looped.config, loop_config, args.vocab_size, args.seq_length, num_loops)
            * tokens
        )
        m_loop = memory(looped, num_loops, batch, device) / 2**20
        m_unrolled = memory(unrolled, 1, batch, device) / 2**20
        worst = max(worst, ratio)
        print(
            f"{num_loops:>3} {t_loop * 1e3:>10.1f} {t_unrolled * 1e3:>12.1f} {ratio:>7.3f} "
            f"{flops / t_loop / 1e9:>8.1f} {m_loop:>14.1f} {m_unrolled:>16.1f}"
        )
        del unrolled
    destroy_distributed()
    print(f"loop_overhead_ratio={worst:.3f}")


if __name__ == "__main__":
    main()
