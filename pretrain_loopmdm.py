"""Pre-train a looped masked diffusion language model (LoopMDM).

Launch with torchrun, as Megatron-LM:

    torchrun --nproc_per_node 8 pretrain_loopmdm.py --model-size smdm-170m \\
        --tensor-model-parallel-size 2 --micro-batch-size 8 --global-batch-size 256 \\
        --train-iters 100000 --lr 3e-4 --data-path 1.0 data/corpus_text_document ...

`python pretrain_loopmdm.py --help` lists every flag. On a machine without CUDA (or with
--device cpu) it runs on the CPU with gloo.
"""

import sys

from megatron_loopmdm.training.arguments import parse_args, run_config_from_args


def main(argv=None) -> int:
    args = parse_args(argv)  # exits with status 2 and the problems listed on bad flags
    from megatron_loopmdm.data.indexed import IndexedDatasetError
    from megatron_loopmdm.training.loop import TrainingError, pretrain

    try:
        pretrain(run_config_from_args(args))
    except (ValueError, FileNotFoundError, TrainingError, IndexedDatasetError) as error:
        print(f"pretrain_loopmdm.py: error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
