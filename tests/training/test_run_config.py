"""Checkpoints store the run configuration as versioned JSON; older checkpoints still read."""

import json

from megatron_loopmdm.checkpointing.run_config import (
    RUN_CONFIG_VERSION,
    read_run_config,
    run_config_json,
)
from megatron_loopmdm.diffusion.config import DiffusionConfig
from megatron_loopmdm.distributed.parallel import ParallelConfig
from megatron_loopmdm.hf.checkpoint import _tokenizer_source, checkpoint_dtype
from megatron_loopmdm.models.builder import loop_config_for
from megatron_loopmdm.models.config import LoopMDMModelConfig
from megatron_loopmdm.models.sizes import get_model_size
from megatron_loopmdm.training.config import DataSourceConfig, TrainingConfig

import pytest
import torch

from tests.utils import REPO, run_torchrun


def _configs():
    size = get_model_size("debug")
    return {
        "model_size": size,
        "loop_config": loop_config_for(size),
        "model_config": LoopMDMModelConfig(vocab_size=128, max_sequence_length=64, mask_token_id=5),
        "parallel": ParallelConfig(tensor_model_parallel_size=2, world_size=4),
        "diffusion": DiffusionConfig(mask_token_id=5, time_sampling="antithetic"),
    }


def test_the_json_holds_every_config_and_reads_back(tmp_path):
    training = TrainingConfig(micro_batch_size=1, global_batch_size=1, train_iters=1,
                              params_dtype="bfloat16")  # fmt: skip
    data = DataSourceConfig(data_path=["corpus"], tokenizer_model=str(tmp_path))
    text = run_config_json({**_configs(), "training": training, "data": data})
    tree = json.loads(text)  # plain JSON: no class of this package needed
    assert tree["version"] == RUN_CONFIG_VERSION
    assert tree["model_size"]["loop_layers"] == [1, 2]
    assert tree["parallel"]["tensor_model_parallel_size"] == 2
    assert tree["parallel"]["world_size"] == 4
    assert tree["diffusion"]["time_sampling"] == "antithetic"
    assert tree["model_config"]["mask_token_id"] == 5
    extra = {"run_config": text}
    assert read_run_config(extra) == tree
    assert checkpoint_dtype(extra) == torch.bfloat16
    assert _tokenizer_source(None, extra) == tmp_path


def test_older_checkpoints_with_saved_flags_still_read(tmp_path):
    """The format before `run_config`: `vars(args)` of the run, or the converters' subset."""
    trained = {"args": {"bf16": False, "fp16": True, "tokenizer_model": str(tmp_path)}}
    assert checkpoint_dtype(trained) == torch.float16
    assert _tokenizer_source(None, trained) == tmp_path
    converted = {"args": {"converted_from": "/x", "tokenizer_model": None, "mask_token_id": 3}}
    assert checkpoint_dtype(converted) == torch.float32
    assert _tokenizer_source(None, converted) is None
    assert checkpoint_dtype({}) == torch.float32


def test_a_newer_version_is_refused_with_what_to_do():
    extra = {"run_config": json.dumps({"version": RUN_CONFIG_VERSION + 1})}
    with pytest.raises(ValueError, match="upgrade megatron-loopmdm"):
        read_run_config(extra)


def test_a_saved_checkpoint_holds_the_run_config_as_a_plain_json_file(tmp_path):
    flags = ["--model-size", "debug", "--mock-data", "--vocab-size", 64, "--micro-batch-size", 2,
             "--train-iters", 1, "--lr", 1e-3, "--save", tmp_path / "ckpt"]  # fmt: skip
    result = run_torchrun(REPO / "pretrain_loopmdm.py", 1, flags)
    assert result.returncode == 0, result.stderr[-3000:]
    directory = tmp_path / "ckpt" / "iter_0000001"
    tree = json.loads((directory / "run_config.json").read_text())  # json alone reads it
    assert tree["version"] == RUN_CONFIG_VERSION
    assert tree["training"]["params_dtype"] == "float32"
    assert tree["model_size"]["num_layers"] == 4 and tree["parallel"]["world_size"] == 1
    assert tree["data"]["tokenizer_model"] is None  # mock data
    # The same JSON is in the checkpoint's own state, where converters read it.
    from megatron_loopmdm.checkpointing.dist_checkpoint import read_extra_state

    assert json.loads(read_extra_state(tmp_path / "ckpt", 1)["run_config"]) == tree
