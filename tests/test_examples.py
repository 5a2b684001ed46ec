"""The launch scripts in examples/: valid shell, valid flags, and a real CPU launch."""

import json
import os
import subprocess
import sys

from megatron_loopmdm.training.arguments import parse_args

import pytest

from tests.utils import REPO, free_port

SCRIPTS = sorted(
    str(p.relative_to(REPO))
    for p in (REPO / "examples").rglob("*")
    if p.suffix in (".sh", ".sbatch")
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash(script):
    assert subprocess.run(["bash", "-n", REPO / script]).returncode == 0


@pytest.mark.parametrize("size", ["mdlm-small", "smdm-113m", "smdm-170m", "1b"])
def test_size_recipes_pass_argument_validation(tmp_path, size):
    # Expand the recipe exactly as the size script does, then validate it for 8 GPUs.
    env = dict(
        os.environ,
        MODEL_SIZE=size,
        DATA_PATH="data/corpus_text_document",
        TOKENIZER="tok",
        SAVE=str(tmp_path),
    )
    shell = (
        f"source {REPO}/examples/sizes/common.sh; "
        f'[ "{size}" = 1b ] && TP=2; printf "%s\\0" "${{RECIPE[@]}}"'
    )
    out = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    args = parse_args(out.stdout.split("\0")[:-1], world_size=8)
    assert args.model_size == size and args.bf16 and args.use_distributed_optimizer
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.clip_grad) == (
        0.9,
        0.95,
        0.1,
        1.0,
    )
    assert args.lr_decay_style == "cosine" and args.lr_warmup_iters > 0


def test_cpu_debug_script_trains_saves_and_logs(tmp_path):
    env = dict(
        os.environ,
        OUT=str(tmp_path),
        TRAIN_ITERS="4",
        WARMUP="1",
        MASTER_PORT=str(free_port()),
        OMP_NUM_THREADS="1",
        PYTHON=sys.executable,
    )
    result = subprocess.run(
        [
            "bash",
            REPO / "examples" / "pretrain_cpu_debug.sh",
            "--log-interval",
            "2",
            "--metrics-file",
            str(tmp_path / "m.jsonl"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iteration        4/       4" in result.stdout
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "4\n"
    assert len([json.loads(line) for line in open(tmp_path / "m.jsonl")]) == 4
    assert list((tmp_path / "tensorboard").iterdir())
