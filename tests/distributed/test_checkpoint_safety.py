"""Tampered, broken and mismatched checkpoints are refused in one line; nothing in them runs.

One real dist checkpoint (a 1-process pretrain_loopmdm.py run, saved at iterations 1 and 2) is
copied and damaged per test; the checks are called in-process.
"""

import os
import pickle
import shutil
import socket
import subprocess
import sys

import megatron_loopmdm  # noqa: F401  (megatron import shims)
import megatron_loopmdm.checkpointing.dist_checkpoint as ckpt
from megatron_loopmdm.checkpointing.safe_load import UnsafeCheckpointError, safe_torch_load
from megatron_loopmdm.training.resume import check_checkpoint_format, schedule_differences

import pytest

from tests.utils import REPO, run_torchrun


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved") / "ckpt"
    result = run_torchrun(REPO / "pretrain_loopmdm.py", 1, [str(a) for a in (
        "--model-size", "debug", "--mock-data", "--vocab-size", 64, "--micro-batch-size", 4,
        "--lr", 1e-2, "--train-iters", 2, "--save", root, "--save-interval", 1)])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture
def copy(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "ckpt")
    return tmp_path / "ckpt"


class _Payload:
    """Unpickling this runs `touch MARKER` (what a crafted checkpoint file would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_code_payload_in_the_metadata_is_refused_and_never_runs(copy, tmp_path):
    marker = tmp_path / "pwned"
    metadata = ckpt.checkpoint_dir(copy, 2) / ".metadata"
    metadata.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata refers to posix\.system"):
        ckpt.select_checkpoint(copy)  # tampering is never skipped for an older checkpoint
    with pytest.raises(UnsafeCheckpointError):
        ckpt.read_extra_state(copy, 2)  # what --load, conversion and generate read first
    assert not marker.exists()


def test_a_code_payload_in_a_deepspeed_file_is_refused_and_never_runs(tmp_path):
    import torch

    marker, path = tmp_path / "pwned", tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "evil": _Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="mp_rank_00_model_states.pt"):
        safe_torch_load(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["delete_shard", "truncate_shard", "delete_metadata"])
def test_a_broken_newest_checkpoint_is_reported_and_skipped(copy, capsys, damage):
    newest = ckpt.checkpoint_dir(copy, 2)
    shard = newest / "__0_0.distcp"
    if damage == "delete_shard":
        shard.unlink()
    elif damage == "truncate_shard":
        shard.write_bytes(shard.read_bytes()[:1000])
    else:
        (newest / ".metadata").unlink()
    assert ckpt.select_checkpoint(copy) == 1
    warning = capsys.readouterr().out
    assert "skipping incomplete checkpoint" in warning and str(newest) in warning
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint.*--iteration"):
        ckpt.select_checkpoint(copy, iteration=2)


def test_iteration_selects_an_earlier_save_and_a_missing_one_lists_what_exists(copy):
    assert ckpt.select_checkpoint(copy, iteration=1) == 1
    with pytest.raises(ckpt.CheckpointError, match=r"saved iterations: 1, 2"):
        ckpt.select_checkpoint(copy, iteration=7)


def test_a_deleted_latest_directory_falls_back_with_a_message(copy, capsys):
    shutil.rmtree(ckpt.checkpoint_dir(copy, 2))
    assert ckpt.select_checkpoint(copy) == 1
    assert "names iteration 2, but" in capsys.readouterr().out


def test_keep_last_prunes_the_oldest(copy):
    assert ckpt.prune_checkpoints(copy, 1) == [1]
    assert ckpt.saved_iterations(copy) == [2]


def test_deepspeed_and_megatron_checkpoints_are_told_apart(copy, tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "latest").write_text("iter_0000002")
    with pytest.raises(ValueError, match="holds a DeepSpeed checkpoint; add --deepspeed"):
        check_checkpoint_format(ds, deepspeed=False)
    with pytest.raises(ValueError, match="holds a megatron checkpoint; drop --deepspeed"):
        check_checkpoint_format(copy, deepspeed=True)
    check_checkpoint_format(copy, deepspeed=False)


def test_save_lock_refuses_a_live_owner_and_takes_over_a_stale_one(tmp_path):
    held = ckpt.SaveLock(tmp_path)
    held.acquire()
    assert (tmp_path / ckpt.LOCK_FILE).read_text().split() == [socket.gethostname(),
                                                                str(os.getpid())]  # fmt: skip
    with pytest.raises(ckpt.CheckpointError, match=f"in use by another run \\(pid {os.getpid()}"):
        ckpt.SaveLock(tmp_path).acquire()
    held.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ckpt.LOCK_FILE).write_text(f"{socket.gethostname()} {dead.pid}\n")
    taker = ckpt.SaveLock(tmp_path)
    taker.acquire()  # the owner is gone: stale
    assert taker.owned
    taker.release()
    (tmp_path / ckpt.LOCK_FILE).write_text("another-host 1\n")
    with pytest.raises(ckpt.CheckpointError, match="on host another-host"):
        ckpt.SaveLock(tmp_path).acquire()


def test_schedule_differences_name_the_flags():
    saved = {"max_lr": 0.01, "min_lr": 0.0, "lr_warmup_steps": 0, "lr_decay_steps": 4,
             "lr_decay_style": "cosine", "start_wd": 0.1, "end_wd": 0.1}  # fmt: skip
    assert schedule_differences(saved, dict(saved)) == []
    changed = dict(saved, max_lr=0.005, lr_decay_steps=8)
    assert schedule_differences(saved, changed) == [
        "--lr: checkpoint 0.01, flags 0.005",
        "--lr-decay-iters (default --train-iters): checkpoint 4, flags 8",
    ]
    constant = dict(saved, lr_decay_style="constant")
    assert schedule_differences(constant, dict(constant, lr_decay_steps=8)) == []
