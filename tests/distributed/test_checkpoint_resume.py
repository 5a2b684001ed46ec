"""Distributed checkpoints: exact resume with the distributed optimizer, and resharding.

These exercise megatron-core's distributed optimizer on the torch-Adam path, including the
three bugs that `megatron_loopmdm.checkpointing.optimizer_fixes` works around: without fix 2 the
load fails (KeyError 'step'); without fix 3 the resumed losses drift (shared Adam step).
"""

import pytest

from tests.utils import REPO, run_json_worker

WORKER = REPO / "tests" / "distributed" / "parallel_worker.py"
STEPS = ["--steps", "4"]


def run_worker(tmp_path, name, nproc, *args):
    return run_json_worker(WORKER, nproc, [*STEPS, *args], tmp_path / f"{name}.json")["steps"]


def test_resume_with_distributed_optimizer_at_dp2_is_bit_identical(tmp_path):
    opt = ["--use-distributed-optimizer"]
    full = run_worker(tmp_path, "full", 2, *opt)
    ckpt = tmp_path / "ckpt"
    first = run_worker(tmp_path, "first", 2, *opt, "--save", ckpt, "--save-at", "2")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / "iter_0000002").is_dir()
    assert not list(ckpt.glob("*.tmp"))
    resumed = run_worker(tmp_path, "resumed", 2, *opt, "--load", ckpt)
    assert first == full[:2]
    assert [s["step"] for s in resumed] == [2, 3]
    assert resumed == full[2:]  # to the bit: losses, grad norms and loop counts


def test_checkpoint_saved_at_tp2_resumes_at_pp2(tmp_path):
    full = run_worker(tmp_path, "full", 1)
    ckpt = tmp_path / "ckpt"
    run_worker(tmp_path, "tp2", 2, "--tp", "2", "--save", ckpt, "--save-at", "2")
    resumed = run_worker(tmp_path, "pp2", 2, "--pp", "2", "--load", ckpt)
    for got, want in zip(resumed, full[2:]):
        assert got["num_loops"] == want["num_loops"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
