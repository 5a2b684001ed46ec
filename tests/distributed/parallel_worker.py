"""A few real training steps of the debug model under one parallel layout (run by torchrun).

The tests launch this script with different tensor / pipeline / data-parallel layouts and
compare what it writes: per step, the loop count S drawn, the global per-token loss and the
gradient norm. Every layout starts from the same weights (layout-independent init) and sees
the same global batches and the same diffusion noise, so all must agree.

`--case NAME=FLAGS` (repeatable) trains several configurations one after another in the same
processes (megatron's model-parallel groups are rebuilt for each; torch.distributed stays up),
which spares a launch, and its ~10 CPU-s of imports per process, for each; the output is then
`{"cases": {NAME: result}}`.
"""

import argparse
import json
import os
import shlex

import megatron_loopmdm  # noqa: F401  (registers the triton stand-in before megatron)
from megatron_loopmdm.checkpointing.dist_checkpoint import load_checkpoint, save_checkpoint
from megatron_loopmdm.diffusion.config import DiffusionConfig
from megatron_loopmdm.distributed.parallel import (
    ParallelConfig,
    destroy_distributed,
    initialize_distributed,
    set_seed,
)
from megatron_loopmdm.models.builder import loop_config_for, transformer_config
from megatron_loopmdm.models.config import LoopMDMModelConfig
from megatron_loopmdm.models.loop_sampling import draw_num_loops
from megatron_loopmdm.models.sizes import get_model_size
from megatron_loopmdm.training.backend import build_training
from megatron_loopmdm.training.setup import default_optimizer_config
from megatron_loopmdm.training.step import make_forward_step

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig

VOCAB = 128
MASK_ID = 127
SEQ = 32


def global_batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch: tokens [size, SEQ] and their global sample indices."""
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, MASK_ID, (size, SEQ), generator=generator)
    return tokens, torch.arange(step * size, (step + 1) * size)


def case_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--loop-layers", type=int, nargs=2, default=[1, 2])
    parser.add_argument("--max-loops", type=int, default=3)
    parser.add_argument("--input-injection", default="none")
    parser.add_argument("--loop-embedding", action="store_true")
    parser.add_argument("--intermediate-loop-loss-weight", type=float, default=0.0)
    parser.add_argument("--overlap-grad-reduce", action="store_true")
    parser.add_argument("--use-distributed-optimizer", action="store_true")
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--save", help="checkpoint directory to save into")
    parser.add_argument("--save-at", type=int, help="save after this many steps, then stop")
    parser.add_argument("--load", help="resume from the latest checkpoint here")
    return parser


def train(args) -> dict:
    """Trains one configuration; its steps, the last rank's parameter count, the world size."""
    parallel = ParallelConfig(args.tp, args.pp, args.vpp, args.sequence_parallel)
    parallel_state.destroy_model_parallel()  # the previous case's layout, if any
    initialize_distributed(parallel, "cpu")
    set_seed(1234)
    size = get_model_size("debug")
    recompute = (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        if args.recompute
        else {}
    )
    config = transformer_config(
        size, parallel, num_layers=args.num_layers, calculate_per_token_loss=True, **recompute
    )
    loop_config = loop_config_for(
        size,
        loop_layers=tuple(args.loop_layers),
        max_loops=args.max_loops,
        input_injection=args.input_injection,
        loop_embedding=args.loop_embedding,
        intermediate_loss_weight=args.intermediate_loop_loss_weight,
    )
    model_config = LoopMDMModelConfig(VOCAB, SEQ, MASK_ID)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel.data_parallel_size(torch.distributed.get_world_size())
    local = args.global_batch // dp_size
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
        bucket_size=2000 if args.overlap_grad_reduce else None,
    )
    backend = build_training(
        config,
        loop_config,
        model_config,
        parallel,
        default_optimizer_config(lr=1e-2, use_distributed_optimizer=args.use_distributed_optimizer),
        init_seed=7,
        ddp_config=ddp_config,
        num_microbatches=local // args.micro_batch,
        seq_length=SEQ,
        micro_batch_size=args.micro_batch,
    )
    chunks, optimizer = backend.chunks, backend.optimizer
    diffusion = DiffusionConfig(mask_token_id=MASK_ID)
    records = []
    first_step = 0
    if args.load:
        first_step, _ = load_checkpoint(args.load, chunks, optimizer)
    for step in range(first_step, args.steps):
        if args.save_at is not None and step == args.save_at:
            save_checkpoint(args.save, step, chunks, optimizer)
            break
        num_loops = draw_num_loops(loop_config, seed=1234, iteration=step)
        tokens, index = global_batch(step, args.global_batch)
        mine = slice(dp_rank * local, (dp_rank + 1) * local)
        micro = [
            {"tokens": t, "sample_index": i}
            for t, i in zip(
                tokens[mine].split(args.micro_batch), index[mine].split(args.micro_batch)
            )
        ]
        result = backend.train_step(
            make_forward_step(diffusion, seed=1234, num_loops=num_loops), micro
        )
        records.append(
            {
                "step": step,
                "num_loops": num_loops,
                "loss": result.loss,
                "grad_norm": float(result.grad_norm),
                "intermediate_loss": result.intermediate_loss,
            }
        )
    params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    return {
        "steps": records,
        "local_params_last_rank": params,
        "world_size": int(os.environ["WORLD_SIZE"]),
    }


def main():
    top = argparse.ArgumentParser()
    top.add_argument("--out", required=True)
    top.add_argument("--case", action="append", metavar="NAME=FLAGS",
                     help="a named configuration (repeatable)")  # fmt: skip
    args, flags = top.parse_known_args()
    if args.case:
        if flags:
            top.error(f"flags outside --case: {flags}")
        cases = dict(case.split("=", 1) for case in args.case)
        result = {"cases": {name: train(case_parser().parse_args(shlex.split(case_flags)))
                            for name, case_flags in cases.items()}}  # fmt: skip
    else:
        result = train(case_parser().parse_args(flags))
    # The last rank holds the last pipeline stage (and the loss) in every layout.
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        with open(args.out, "w") as f:
            json.dump(result, f)
    destroy_distributed()


if __name__ == "__main__":
    main()
