"""Every flag of `pretrain_loopmdm.py --help` changes the run's typed configuration, or is
documented as accepted only for Megatron-LM compatibility; `--transformer-impl` picks the layer
spec."""

import subprocess
import sys

from megatron_loopmdm.training import arguments, config

import pytest

from tests.utils import REPO

# Flags that Megatron-LM command lines carry and that change nothing here, with the reason
# (each also says so in its --help).
ACCEPTED_FOR_COMPATIBILITY = {
    "--no-load-rng": "checkpoints hold no RNG state: t, masks and loop counts follow the seed",
}
WORLD_SIZE = 4
BASE = ["--model-size", "debug", "--micro-batch-size", "1", "--train-iters", "10", "--lr", "1e-3"]
REAL_DATA = ["--tokenizer-model", "tok", "--data-path", "corpus"]
TRAIN_DATA = ["--tokenizer-model", "tok", "--train-data-path", "t"]
DEEPSPEED = ["--deepspeed", "--deepspeed-config", "ds.json"]

# Each flag as a user would give it: (the flags it needs beside it, the flag and its value). A
# switch needs no entry; neither does a choice (another of its choices is taken) nor a number
# with a default (its double is taken).
USES = {
    "--model-size": ([], ["--model-size", "mdlm-small"]),
    "--num-layers": ([], ["--num-layers", "6"]),
    "--hidden-size": ([], ["--hidden-size", "128"]),
    "--ffn-hidden-size": ([], ["--ffn-hidden-size", "256"]),
    "--num-attention-heads": ([], ["--num-attention-heads", "8"]),
    "--num-query-groups": ([], ["--num-query-groups", "4"]),
    "--seq-length": ([], ["--seq-length", "32"]),
    "--max-position-embeddings": ([], ["--max-position-embeddings", "128"]),
    "--normalization": ([], ["--normalization", "LayerNorm"]),
    "--swiglu": (["--no-swiglu"], ["--swiglu"]),
    "--hidden-dropout": ([], ["--hidden-dropout", "0.1"]),
    "--attention-dropout": ([], ["--attention-dropout", "0.1"]),
    "--transformer-impl": ([], ["--transformer-impl", "local"]),
    "--num-layers-per-virtual-pipeline-stage": (
        ["--pipeline-model-parallel-size", "2"],
        ["--num-layers-per-virtual-pipeline-stage", "1"],
    ),
    "--decoder-first-pipeline-num-layers": (
        ["--pipeline-model-parallel-size", "2"],
        ["--decoder-first-pipeline-num-layers", "1"],
    ),
    "--decoder-last-pipeline-num-layers": (
        ["--pipeline-model-parallel-size", "2"],
        ["--decoder-last-pipeline-num-layers", "1"],
    ),
    "--pipeline-model-parallel-layout": (
        ["--pipeline-model-parallel-size", "2"],
        ["--pipeline-model-parallel-layout", "auto"],
    ),
    "--sequence-parallel": (["--tensor-model-parallel-size", "2"], ["--sequence-parallel"]),
    "--deepspeed": ([], DEEPSPEED),  # the two only go together
    "--deepspeed-config": ([], DEEPSPEED),
    "--device": ([], ["--device", "cpu"]),
    "--micro-batch-size": ([], ["--micro-batch-size", "2"]),
    "--global-batch-size": ([], ["--global-batch-size", "8"]),
    "--train-iters": ([], ["--train-iters", "20"]),
    "--lr": ([], ["--lr", "2e-3"]),
    "--adam-beta1": ([], ["--adam-beta1", "0.8"]),
    "--adam-beta2": ([], ["--adam-beta2", "0.99"]),
    "--min-lr": ([], ["--min-lr", "1e-4"]),
    "--lr-decay-style": ([], ["--lr-decay-style", "linear"]),
    "--lr-decay-iters": ([], ["--lr-decay-iters", "5"]),
    "--lr-wsd-decay-iters": ([], ["--lr-wsd-decay-iters", "5"]),
    "--data-path": (["--tokenizer-model", "tok"], ["--data-path", "corpus"]),
    "--split": (REAL_DATA, ["--split", "90,10,0"]),
    "--train-data-path": (["--tokenizer-model", "tok"], ["--train-data-path", "train"]),
    "--valid-data-path": (TRAIN_DATA, ["--valid-data-path", "v"]),
    "--test-data-path": (TRAIN_DATA, ["--test-data-path", "x"]),
    "--data-cache-path": ([], ["--data-cache-path", "cache"]),
    "--tokenizer-type": ([], ["--tokenizer-type", "GPT2BPETokenizer"]),
    "--tokenizer-model": ([], ["--tokenizer-model", "tok"]),
    "--vocab-file": ([], ["--vocab-file", "vocab.json"]),
    "--merge-file": ([], ["--merge-file", "merges.txt"]),
    "--eod-token": ([], ["--eod-token", "[EOD]"]),
    "--mock-data": (REAL_DATA, ["--mock-data"]),  # instead of the context: see _config
    "--sft": (REAL_DATA, ["--sft"]),
    "--sft-packing": ([*REAL_DATA, "--sft"], ["--sft-packing", "pack"]),
    "--sft-eos-in-loss": ([*REAL_DATA, "--sft"], ["--sft-eos-in-loss"]),
    "--save": ([], ["--save", "ckpt"]),
    "--load": (["--save", "ckpt"], ["--load", "ckpt"]),  # resumes where it saves: no dir needed
    "--save-interval": (["--save", "ckpt"], ["--save-interval", "5"]),
    "--finetune": (["--save", "ckpt", "--load", "ckpt"], ["--finetune"]),
    "--iteration": (["--save", "ckpt", "--load", "ckpt"], ["--iteration", "5"]),
    "--keep-last": (["--save", "ckpt"], ["--keep-last", "2"]),
    "--tensorboard-dir": ([], ["--tensorboard-dir", "tb"]),
    "--eval-interval": ([], ["--eval-interval", "5"]),
    "--eval-num-loops": ([], ["--eval-num-loops", "2"]),
    "--wandb-project": ([], ["--wandb-project", "p"]),
    "--metrics-file": ([], ["--metrics-file", "m.jsonl"]),
    "--loop-layers": ([], ["--loop-layers", "1", "3"]),
    "--max-loops": ([], ["--max-loops", "2"]),
    "--loop-backprop-depth": ([], ["--loop-backprop-depth", "1"]),
    "--loop-state-noise": ([], ["--loop-state-noise", "0.1"]),
    "--mask-token-id": ([], ["--mask-token-id", "5"]),
    "--random-length-prob": ([], ["--random-length-prob", "0.1"]),
    "--kv-channels": ([], ["--kv-channels", "32"]),
    "--norm-epsilon": ([], ["--norm-epsilon", "1e-6"]),
    "--rope-scaling": ([], ["--rope-scaling", '{"rope_type": "linear", "factor": 2}']),
    "--padded-vocab-size": ([], ["--padded-vocab-size", "2048"]),
}


def _use(action, option: str) -> tuple[list, list]:
    if option in USES:
        return USES[option]
    if action.nargs == 0:
        return [], [option]
    if action.choices:
        return [], [option, next(str(c) for c in action.choices if c != action.default)]
    assert isinstance(action.default, (int, float)), f"add {option} to USES"
    return [], [option, str(action.default * 2 or 1)]


def _config(argv: list):
    """The typed config of BASE + `argv`, on mock data unless `argv` names data."""
    if not {"--data-path", "--train-data-path", "--mock-data"} & set(argv):
        argv = [*argv, "--mock-data"]
    args = arguments.parse_args([*BASE, *argv], world_size=WORLD_SIZE)
    return arguments.run_config_from_args(args, world_size=WORLD_SIZE)


def _options():
    return [
        (action, option)
        for action in arguments.build_parser()._actions
        for option in action.option_strings
        if option not in ("-h", "--help")
    ]


@pytest.mark.parametrize("option", [option for _, option in _options()])
def test_every_flag_changes_the_run_config_or_is_listed_as_accepted(option):
    action = dict((o, a) for a, o in _options())[option]
    context, use = _use(action, option)
    if option in ACCEPTED_FOR_COMPATIBILITY:
        assert _config([*context, *use]) == _config(context)
        assert "accepted for Megatron-LM command lines, no effect" in action.help
        return
    if option == "--mock-data":  # it replaces the context's data
        assert _config(use) != _config(context)
        return
    assert _config([*context, *use]) != _config(context), f"{option} changes nothing"


def test_the_help_says_which_flags_are_accepted_for_compatibility():
    help_text = subprocess.run(
        [sys.executable, str(REPO / "pretrain_loopmdm.py"), "--help"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    ).stdout  # fmt: skip
    assert "accepted for Megatron-LM command lines, no effect" in help_text


def test_transformer_impl_sets_the_layer_spec():
    assert config.use_transformer_engine(None) is None
    assert config.use_transformer_engine("local") is False  # forces local even with TE
    assert config.use_transformer_engine("transformer_engine") is True


def test_transformer_impl_reaches_the_layer_spec(megatron_single_process):
    """`local` builds the local spec; `transformer_engine` asks for TE, refused without it."""
    import importlib.util

    from megatron_loopmdm.distributed.parallel import ParallelConfig
    from megatron_loopmdm.models.builder import loop_config_for, transformer_config
    from megatron_loopmdm.models.config import LoopMDMModelConfig
    from megatron_loopmdm.models.sizes import get_model_size
    from megatron_loopmdm.training.setup import build_model_chunks

    size = get_model_size("debug")
    parts = (transformer_config(size, ParallelConfig()), loop_config_for(size))
    model_config = LoopMDMModelConfig(vocab_size=64, max_sequence_length=64, mask_token_id=63)
    (chunk,) = build_model_chunks(*parts, model_config, use_te=False)
    modules = {type(m).__module__ for m in chunk.modules()}
    assert not any("transformer_engine" in name for name in modules)
    if importlib.util.find_spec("transformer_engine") is None:
        with pytest.raises(RuntimeError, match="transformer_engine is not installed"):
            build_model_chunks(*parts, model_config, use_te=True)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformer_engine") is not None,
    reason="Transformer Engine is installed here",
)
def test_transformer_engine_without_it_is_refused_at_parse_time():
    flags = ["--mock-data", "--micro-batch-size", 1, "--train-iters", 1, "--lr", 1e-3,
             "--transformer-impl", "transformer_engine"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(REPO / "pretrain_loopmdm.py"), *map(str, flags)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert "needs Transformer Engine, which is not installed" in result.stderr
    assert "--transformer-impl local" in result.stderr and "Traceback" not in result.stderr
