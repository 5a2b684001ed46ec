"""Loads an imported AR checkpoint at TP=2 (run by torchrun) and saves its causal logits."""

import argparse

import megatron_loopmdm  # noqa: F401  (registers the triton stand-in before megatron)
from megatron_loopmdm.checkpointing.dist_checkpoint import load_checkpoint
from megatron_loopmdm.distributed.parallel import (
    ParallelConfig,
    destroy_distributed,
    initialize_distributed,
)
from megatron_loopmdm.hf.checkpoint import read_checkpoint_extra
from megatron_loopmdm.models.attention_masks import causal_attention_mask
from megatron_loopmdm.models.builder import build_model, transformer_config
from megatron_loopmdm.models.config import LoopConfig, LoopMDMModelConfig
from megatron_loopmdm.models.sizes import ModelSize

import torch
from megatron.core import parallel_state


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", required=True)
    parser.add_argument("--ids", required=True, help="a torch.save'd [b, s] int64 tensor")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    initialize_distributed(ParallelConfig(tensor_model_parallel_size=2), "cpu")
    _, extra = read_checkpoint_extra(args.load)
    size = dict(extra["model_size"], loop_layers=tuple(extra["model_size"]["loop_layers"]))
    config = transformer_config(ModelSize(**size), ParallelConfig(tensor_model_parallel_size=2))
    model = build_model(
        config, LoopConfig(**extra["loop_config"]), LoopMDMModelConfig(**extra["model_config"])
    )
    load_checkpoint(args.load, [model])
    ids = torch.load(args.ids)
    with torch.no_grad():
        logits = model.eval()(
            ids,
            position_ids=torch.arange(ids.size(1)).expand_as(ids),
            attention_mask=causal_attention_mask(ids.size(1)),
            num_loops=1,
        )  # [b, s, v / 2] on each rank
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(group.size())]
    torch.distributed.all_gather(parts, logits.contiguous(), group=group)
    if torch.distributed.get_rank() == 0:
        torch.save(torch.cat(parts, dim=-1), args.out)
    destroy_distributed()


if __name__ == "__main__":
    main()
