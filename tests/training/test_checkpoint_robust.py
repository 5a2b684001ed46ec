"""Preemption, kill -9 at random moments, broken and tampered checkpoints, resume rules.

Real torchrun processes on CPU. One uninterrupted reference run per data-parallel size is shared
by the preemption and chaos tests: every interrupted-and-resumed iteration must equal it to the
bit (loss, grad norm, loops, learning rate).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.utils import REPO, finish, free_port, run_torchrun, start_torchrun

SCRIPT = REPO / "pretrain_loopmdm.py"
ITERS = 16
BASE = [
    "--model-size", "debug", "--mock-data", "--vocab-size", 64, "--micro-batch-size", 4,
    "--global-batch-size", 8, "--lr", 1e-2, "--lr-decay-style", "constant", "--log-interval", 1,
    "--train-iters", ITERS,
]  # fmt: skip


def pretrain(nproc, *args, ok=True):
    result = run_torchrun(SCRIPT, nproc, [str(a) for a in (*BASE, *args)])
    if ok:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def metrics(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


# torchrun forwards only the signals it handles (default SIGTERM,SIGINT,SIGHUP,SIGQUIT) and dies
# of SIGUSR1, leaving its workers training on: docs/checkpoints.md tells users to add it.
TORCHRUN_SIGNALS = ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]


def launch(nproc, args, log):
    """torchrun in its own session, so the test can signal its whole process group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           *TORCHRUN_SIGNALS, "--master_port", str(free_port()), str(SCRIPT),
           *map(str, (*BASE, *args))]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
    )


def wait_for(predicate, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def kill_tree(process):
    """SIGKILL torchrun, its workers (own sessions) and every helper they started."""
    import psutil

    parent = psutil.Process(process.pid)
    procs = [*parent.children(recursive=True), parent]
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()
    psutil.wait_procs(procs, timeout=10)


def latest(ckpt):
    return int((ckpt / "latest_checkpointed_iteration.txt").read_text())


# DP=2 runs use megatron's distributed optimizer: its resume is where megatron-core needed the
# fixes of `checkpointing.optimizer_fixes` (without them the load fails on a missing Adam 'step',
# or the resumed curve drifts from a shared Adam step).
DP_FLAGS = {1: [], 2: ["--use-distributed-optimizer"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted curves at DP=1 and DP=2; both runs start at first use and run alongside
    the test that asked (a one-process run keeps only one of the two cores busy)."""
    root = tmp_path_factory.mktemp("reference")
    runs = {n: start_torchrun(SCRIPT, n, [*map(str, BASE), *DP_FLAGS[n],
                                          "--metrics-file", root / f"dp{n}.jsonl"])
            for n in (1, 2)}  # fmt: skip
    curves = {}

    def curve(nproc):
        if nproc not in curves:
            result = finish(runs[nproc])
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
            curves[nproc] = metrics(root / f"dp{nproc}.jsonl")
            assert len(curves[nproc]) == ITERS
        return curves[nproc]

    yield curve
    for nproc in runs:
        if nproc not in curves:
            finish(runs[nproc])


def assert_matches_reference(path, reference_curve, first):
    resumed = metrics(path)
    assert [m["iteration"] for m in resumed] == list(range(first + 1, ITERS + 1))
    assert resumed == reference_curve[first:]  # to the bit


def saved(ckpt):
    return sorted(int(p.name[5:]) for p in ckpt.glob("iter_???????"))


# Each signal stops one run of a chain; each run resumes the previous one's stop-save.
STOP_CHAINS = {1: (signal.SIGUSR1, signal.SIGINT, signal.SIGTERM), 2: (signal.SIGTERM,)}


@pytest.mark.parametrize("nproc", [1, 2])
def test_stop_signals_to_the_torchrun_process_group_save_and_resume_exactly(
    tmp_path, reference, nproc
):
    """SIGTERM (scancel), SIGINT (Ctrl-C) and SIGUSR1 (SLURM --signal) to torchrun's process
    group after a periodic save: a stop-save at the current iteration, resumed to the bit."""
    ckpt, done = tmp_path / "ckpt", 0
    for n, stop_signal in enumerate(STOP_CHAINS[nproc]):
        out, log_path = tmp_path / f"m{n}.jsonl", tmp_path / f"run{n}.log"
        resume = ["--load", ckpt] if done else []
        with open(log_path, "w") as log:
            process = launch(nproc, [*DP_FLAGS[nproc], *resume, "--save", ckpt,
                                     "--save-interval", 2, "--metrics-file", out], log)  # fmt: skip
            # After a periodic save of this run (the writer's helper has written), mid-run.
            wait_for(
                lambda: max(saved(ckpt), default=0) > done and len(metrics(out)) >= 2,  # noqa: B023
                process,
                timeout=300,
            )
            os.killpg(process.pid, stop_signal)  # what scancel and `kill -TERM -PGID` do
            process.wait(timeout=120)
        text, got = log_path.read_text(), metrics(out)
        stopped = got[-1]["iteration"] if got else done
        assert stopped < ITERS, f"the run finished before {stop_signal.name}; nothing was tested"
        # (torchrun prints its own traceback for the signal it got; the workers print none.)
        assert "BrokenPipeError" not in text and "[rank" not in text, text[-3000:]
        assert 'pretrain_loopmdm.py", line' not in text, text[-3000:]
        assert f"stopped by {stop_signal.name} at iteration {stopped}" in text, text[-3000:]
        assert latest(ckpt) == stopped  # the stop-save, not the last periodic save
        assert [m["iteration"] for m in got] == list(range(done + 1, stopped + 1))
        assert got == reference(nproc)[done:stopped]  # to the bit
        done = stopped
    pretrain(nproc, *DP_FLAGS[nproc], "--load", ckpt, "--save", ckpt,
             "--metrics-file", tmp_path / "end.jsonl")  # fmt: skip
    assert_matches_reference(tmp_path / "end.jsonl", reference(nproc), done)


def test_kill_9_at_random_moments_resumes_from_the_newest_complete_checkpoint(
    tmp_path, reference
):
    """SIGKILL the whole tree while a checkpoint is being written (the first run), then during
    steps, saves or renames at random; every resume is from the newest complete checkpoint and
    exact."""
    ckpt, rng = tmp_path / "ckpt", random.Random(16)
    run_args = ["--load", ckpt, "--save", ckpt, "--save-interval", 1, "--keep-last", 2]
    done, kills, killed_writing = 0, 0, None
    for attempt in range(4):
        out = tmp_path / f"m{attempt}.jsonl"
        with open(tmp_path / f"log{attempt}", "w") as log:
            process = launch(1, [*run_args, "--metrics-file", out], log)
            if attempt == 0:  # the second save's directory exists, still named .tmp
                wait_for(lambda: ((ckpt / "iter_0000002.tmp").exists()  # noqa: B023
                                  or len(metrics(out)) >= 4), process)  # fmt: skip
            else:
                target = done + rng.randint(1, 4)
                wait_for(lambda: len(metrics(out)) >= target - done, process)  # noqa: B023
                time.sleep(rng.uniform(0.0, 0.15))  # lands in a step, a save or a rename
            if process.poll() is None:
                writing = (ckpt / "iter_0000002.tmp").exists()
                kill_tree(process)
                kills += 1
                if attempt == 0 and writing and not (ckpt / "iter_0000002").exists():
                    killed_writing = latest(ckpt)
        got = metrics(out)
        if got:
            first = got[0]["iteration"] - 1
            assert first == done, f"attempt {attempt} resumed at {first}, newest complete {done}"
            assert got == reference(1)[first : first + len(got)]
        complete = saved(ckpt)
        # --keep-last 2 prunes after each save: a kill between a save and its pruning leaves
        # one more, which the next save prunes.
        assert len(complete) <= 3
        done = max(complete, default=0)
    assert kills >= 3
    # Killed mid-write, the half-written save was never named the latest (the resume of the
    # second run then started from iteration 1, checked above).
    assert killed_writing in (None, 1)
    if killed_writing is None:
        print("the save finished before the kill: the mid-write case was not reached this run")
    result = pretrain(1, *run_args, "--metrics-file", tmp_path / "final.jsonl")
    if done:
        assert f"resumed from {ckpt} at iteration {done}" in result.stdout
    assert_matches_reference(tmp_path / "final.jsonl", reference(1), done)
    assert len(saved(ckpt)) == 2  # a run that ends normally leaves exactly --keep-last


def test_raised_train_iters_needs_a_schedule_flag_and_override_continues_at_the_right_lr(
    tmp_path,
):
    ckpt, linear = tmp_path / "ckpt", ["--lr-decay-style", "linear"]
    pretrain(1, *linear, "--train-iters", 4, "--save", ckpt)
    # Both only read the checkpoint: run together.
    refused = start_torchrun(SCRIPT, 1, [*BASE, *linear, "--train-iters", 8, "--load", ckpt])
    override = start_torchrun(SCRIPT, 1, [*BASE, *linear, "--train-iters", 8, "--lr", 2e-2,
                                          "--load", ckpt, "--override-opt-param-scheduler",
                                          "--metrics-file", tmp_path / "m.jsonl"])  # fmt: skip
    refused, override = finish(refused), finish(override)
    assert refused.returncode == 1
    assert "--lr-decay-iters (default --train-iters): checkpoint 4, flags 8" in refused.stderr
    assert "--override-opt-param-scheduler" in refused.stderr
    assert "[rank0]: Traceback" not in refused.stderr
    assert override.returncode == 0, override.stdout[-2000:] + override.stderr[-3000:]
    lrs = [m["learning_rate"] for m in metrics(tmp_path / "m.jsonl")]
    # Linear decay of the new --lr 2e-2 over the new 8 iterations, from step 5: not LR 0.
    assert lrs == pytest.approx([2e-2 * (1 - k / 8) for k in (5, 6, 7, 8)])


def test_no_saves_during_a_non_finite_streak(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "m.jsonl"
    result = pretrain(1, "--lr", 1e12, "--max-skipped-iterations", 3, "--save", ckpt,
                      "--save-interval", 1, "--metrics-file", out, ok=False)  # fmt: skip
    assert result.returncode == 1
    steps = metrics(out)
    last_finite = max(m["iteration"] for m in steps if not m["skipped"])
    assert steps[-1]["skipped"] and last_finite < steps[-1]["iteration"]
    assert latest(ckpt) == last_finite
    assert saved(ckpt)[-1] == last_finite
    assert "not saving at iteration" in result.stdout


def test_argument_errors_print_the_usage_once():
    result = run_torchrun(SCRIPT, 2, [*map(str, BASE), "--mask-token-id", "100"])
    assert result.returncode != 0
    assert result.stderr.count("usage: pretrain_loopmdm.py") == 1
    assert result.stderr.count("--mask-token-id 100 is outside the vocabulary") == 1


@pytest.fixture()
def small_disk(tmp_path):
    """A 3 MiB tmpfs (a real ENOSPC): room for one debug checkpoint (about 2.1 MB), not two."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for a real disk-full error needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode:
        pytest.skip(f"could not mount a tmpfs (a container without CAP_SYS_ADMIN?): "
                    f"{mounted.stderr.strip()}")  # fmt: skip
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)


def test_a_full_disk_during_a_save_names_the_disk_and_keeps_the_previous_checkpoint(
    tmp_path, small_disk
):
    ckpt, out = small_disk / "ckpt", tmp_path / "m.jsonl"
    full = pretrain(1, "--train-iters", 6, "--save", ckpt, "--save-interval", 2,
                    "--metrics-file", out, ok=False)  # fmt: skip
    assert full.returncode != 0
    err = full.stderr
    line = next((x for x in err.splitlines() if x.startswith("pretrain_loopmdm.py: error:")), "")
    assert f"could not write the checkpoint {ckpt / 'iter_0000004.tmp'}" in line, err[-3000:]
    assert f"the disk holding --save ({small_disk}) has" in line and "MiB free" in line
    assert "Free space or point --save elsewhere" in line
    assert "[rank0]: Traceback" not in err and 'pretrain_loopmdm.py", line' not in err
    assert [m["iteration"] for m in metrics(out)] == [1, 2, 3, 4]  # stopped at the failed save
    assert latest(ckpt) == 2 and saved(ckpt) == [2]
    assert not list(ckpt.glob("*.tmp")), "the partial save still takes the space"
    # The previous checkpoint loads and continues exactly.
    pretrain(1, "--train-iters", 4, "--load", ckpt, "--metrics-file", tmp_path / "r.jsonl")
    assert metrics(tmp_path / "r.jsonl") == metrics(out)[2:]
