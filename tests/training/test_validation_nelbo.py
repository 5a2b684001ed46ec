"""The trainer's validation NELBO equals `tools/evaluate.py nelbo` on the same checkpoint and data.

Both use `diffusion.noise.validation_grid` (the t-quadrature and its mask streams) and
`masking_probability`; here a real pre-training run validates and saves, and the evaluation tool
reads the saved megatron checkpoint back (through the Hugging Face model) and the same split.
"""

import csv

import pytest

from tests.inference.tiny_model import write_hf_model_with_data
from tests.utils import REPO, run_script, run_torchrun


def test_trainer_validation_equals_the_evaluation_tool(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    paths = write_hf_model_with_data(tmp_path)  # its tokenizer and indexed dataset
    data = ["--data-path", paths["data"], "--tokenizer-model", paths["tokenizer"],
            "--split", "80,20,0", "--seed", 5]  # fmt: skip
    eval_iters, global_batch, seq_length = 2, 4, 32
    train = [
        "--model-size", "debug", "--seq-length", seq_length, "--micro-batch-size", 2,
        "--global-batch-size", global_batch, "--train-iters", 2, "--lr", 1e-2,
        "--eval-interval", 2, "--eval-iters", eval_iters, "--eval-num-loops", 2,
        "--save", tmp_path / "ckpt", "--tensorboard-dir", tmp_path / "tb", *data,
    ]  # fmt: skip
    result = run_torchrun(REPO / "pretrain_loopmdm.py", 1, train, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    [trainer] = [e.value for e in events.Scalars("validation-loss")]

    evaluate = [
        "nelbo", "--load", tmp_path / "ckpt",
        "--split-name", "valid", "--num-samples", eval_iters * global_batch,
        "--seq-length", seq_length, "--num-loops", 2, "--output-dir", tmp_path / "out", *data,
    ]  # fmt: skip
    result = run_script(REPO / "tools" / "evaluate.py", evaluate)
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = list(csv.DictReader(open(tmp_path / "out" / "nelbo_vs_loops.csv")))
    assert int(row["tokens"]) == eval_iters * global_batch * seq_length * 8  # 8 grid points
    # The tool runs the Hugging Face model (same logits up to float rounding), the trainer
    # megatron's; TensorBoard keeps float32.
    assert float(row["nelbo"]) == pytest.approx(trainer, rel=2e-6)
