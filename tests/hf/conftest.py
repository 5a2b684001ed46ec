"""Session fixtures for the Hugging Face tests: checkpoints made by the real trainer.

The three training runs (TP=2, PP=2, and the architecture variants at TP=2) start together, so
their process start-ups overlap.
"""

import os
import subprocess
import sys

import pytest

from tests.utils import REPO, free_port

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


def torchrun_command(nproc: int, script, args) -> list:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
        *map(str, args),
    ]  # fmt: skip


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """{layout name: checkpoint root}, each trained for 2 iterations by pretrain_loopmdm.py."""
    root = tmp_path_factory.mktemp("hf_ckpts")
    runs = {}
    for name, flags in LAYOUTS.items():
        save = root / name
        cmd = torchrun_command(2, REPO / "pretrain_loopmdm.py", [*TRAIN, *flags, "--save", save])
        runs[name] = (save, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(),
            cwd=REPO,
        ))  # fmt: skip
    for name, (save, process) in runs.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}:\n{output[-4000:]}"
    return {name: save for name, (save, _) in runs.items()}
