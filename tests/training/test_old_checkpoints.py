"""A checkpoint written before the typed run configuration (run_config version 1, with the saved
flags `args` in its extra state) still resumes, converts to Hugging Face and reads back.

`data/checkpoint_v1` was saved by `pretrain_loopmdm.py` at commit 414f48c (before #11's typed
configuration) with `FLAGS` and `--train-iters 2 --save DIR`: a 3-layer, 16-wide model, 280 KB
with its optimizer state.
"""

import json
import shutil

import megatron_loopmdm.checkpointing.dist_checkpoint as ckpt
from megatron_loopmdm.checkpointing.run_config import RUN_CONFIG_VERSION, read_run_config
from megatron_loopmdm.hf import load_for_inference
from megatron_loopmdm.hf.checkpoint import (
    checkpoint_dtype,
    convert_checkpoint_to_hf,
    load_hf_model,
    read_checkpoint_extra,
)

import torch

from tests.utils import REPO, run_torchrun

OLD = REPO / "tests" / "training" / "data" / "checkpoint_v1"
FLAGS = [
    "--num-layers", 3, "--hidden-size", 16, "--ffn-hidden-size", 32, "--num-attention-heads", 2,
    "--seq-length", 16, "--loop-layers", 1, 2, "--max-loops", 2, "--mock-data", "--vocab-size",
    32, "--make-vocab-size-divisible-by", 8, "--micro-batch-size", 2, "--global-batch-size", 2,
    "--lr", 1e-3, "--lr-warmup-iters", 1, "--seed", 3,
]  # fmt: skip


def test_the_old_checkpoint_is_in_the_old_format():
    iteration, extra = read_checkpoint_extra(OLD)
    assert iteration == 2
    assert extra["args"]["train_iters"] == 2  # the saved command line of that time
    assert json.loads(extra["run_config"])["version"] == 1
    tree = read_run_config(extra)
    assert tree["training"] == {"params_dtype": "float32"}
    assert tree["data"] == {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": None}
    assert checkpoint_dtype(extra) == torch.float32


def test_an_old_checkpoint_resumes_and_saves_in_the_new_format(tmp_path):
    load = tmp_path / "old"
    shutil.copytree(OLD, load)  # the run may not write next to the test data
    save = tmp_path / "new"
    # --lr-decay-iters: the saved schedule decays over its 2 iterations (resume keeps schedules)
    flags = [*FLAGS, "--train-iters", 3, "--lr-decay-iters", 2, "--load", load, "--save", save]
    result = run_torchrun(REPO / "pretrain_loopmdm.py", 1, flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {load} at iteration 2" in result.stdout
    iteration, extra = read_checkpoint_extra(save)
    assert iteration == 3 and "args" not in extra
    tree = read_run_config(extra)
    assert tree["version"] == RUN_CONFIG_VERSION == 2
    assert tree["training"]["train_iters"] == 3 and tree["checkpoint"]["load"] == str(load)
    assert tree["model_size"] == json.loads(extra["run_config"])["model_size"]
    assert ckpt.latest_iteration(load) == 2  # the old checkpoint is left as it was


def test_an_old_checkpoint_converts_to_hugging_face(tmp_path):
    hf = load_hf_model(convert_checkpoint_to_hf(OLD, tmp_path / "hf"))
    direct = load_for_inference(OLD)
    ids = torch.randint(0, 31, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[:, ::3] = 31  # the [MASK] id of a mock vocabulary of 32
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, direct(ids).logits)
    assert hf.config.vocab_size == 32 and hf.config.num_hidden_layers == 3
