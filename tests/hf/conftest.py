"""Session fixtures for the Hugging Face tests: checkpoints made by the real trainer.

The three training runs (TP=2, PP=2, and the architecture variants at TP=2) start together, so
their process start-ups overlap.
"""

import os

import pytest

from tests.utils import REPO, finish, start_torchrun

VOCAB = 64
TRAIN = [
    "--model-size", "debug", "--mock-data", "--vocab-size", VOCAB, "--micro-batch-size", 4,
    "--global-batch-size", 8, "--train-iters", 2, "--lr", 1e-2, "--lr-decay-style", "constant",
]  # fmt: skip
VARIANT_FLAGS = [
    "--untie-embeddings-and-output-weights", "--normalization", "LayerNorm", "--no-swiglu",
    "--position-embedding-type", "learned_absolute", "--loop-input-injection", "concat",
    "--loop-embedding",
]  # fmt: skip
LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", 2],
    "pp2": ["--pipeline-model-parallel-size", 2],
    "variants": ["--tensor-model-parallel-size", 2, *VARIANT_FLAGS],
}


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """{layout name: checkpoint root}, each trained for 2 iterations by pretrain_loopmdm.py."""
    root = tmp_path_factory.mktemp("hf_ckpts")
    runs = {name: start_torchrun(REPO / "pretrain_loopmdm.py", 2, [*TRAIN, *flags, "--save",
                                                                    root / name])
            for name, flags in LAYOUTS.items()}  # fmt: skip
    for name, process in runs.items():
        result = finish(process)
        assert result.returncode == 0, f"{name}:\n{result.stdout[-2000:]}{result.stderr[-4000:]}"
    return {name: root / name for name in runs}
