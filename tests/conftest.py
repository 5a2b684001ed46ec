"""Shared test fixtures.

`megatron_single_process` starts a real one-process gloo group with megatron's process groups,
for tests of the model itself; multi-process tests launch scripts under torchrun instead
(`run_torchrun`).
"""

import os
import warnings

import pytest

from tests.utils import free_port

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")


def pytest_configure(config):
    """One intra-op thread in the test process: the tests' models are tiny, and while the
    subprocesses the tests start run alongside, more threads than cores only contend (a tiny
    training step measured 3 s with the default threads on a loaded 2-core machine, 0.15 s with
    one). Subprocesses get OMP_NUM_THREADS=1 from their launchers."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def megatron_single_process():
    """torch.distributed (gloo, world size 1) and megatron's groups, with CPU support."""
    import megatron_loopmdm  # noqa: F401
    from megatron_loopmdm.distributed.parallel import (
        ParallelConfig,
        initialize_distributed,
        set_seed,
    )

    import torch

    saved = dict(os.environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
    )
    try:
        initialize_distributed(ParallelConfig(), "cpu")
        set_seed(0)
    finally:
        # Keep torchrun-style variables out of the environment of later subprocesses.
        os.environ.clear()
        os.environ.update(saved)
    yield
    # Left initialised for the rest of the session: megatron's groups are process-global.
    assert torch.distributed.is_initialized()


def _cpu_seconds():
    import resource

    from tests.utils import FORKED_CPU_SECONDS

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    forked = FORKED_CPU_SECONDS[0]  # ranks forked from the launch server (tests/utils.py)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime + forked


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With LOOPMDM_TEST_PROFILE=DIR, appends each test's wall time and CPU time (its own and
    that of the processes it started and waited for) to DIR/<worker>.jsonl: CPU seconds, unlike
    durations, barely move with machine load, so they show where the suite's time goes."""
    directory = os.environ.get("LOOPMDM_TEST_PROFILE")
    if not directory:
        yield
        return
    import json
    import time

    start, (own, children) = time.perf_counter(), _cpu_seconds()
    yield
    end, (own_end, children_end) = time.perf_counter(), _cpu_seconds()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"{worker}.jsonl"), "a") as out:
        record = {"test": item.nodeid, "wall": round(end - start, 3),
                  "cpu_self": round(own_end - own, 3),
                  "cpu_children": round(children_end - children, 3)}  # fmt: skip
        out.write(json.dumps(record) + "\n")


# Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`): a test file runs whole on one
# worker, so its module fixtures (multi-process trainings) are built once; files that share a
# session fixture or a per-process cached model run together. test_pretrain.py's tests each start
# their own runs and spread one by one. The costliest units go first (CPU seconds measured with
# LOOPMDM_TEST_PROFILE), so that no long one is left for the end while the other worker idles.
SPREAD = (
    "tests/training/test_pretrain.py",
    "tests/training/test_run_flags.py",
    # Its chains wait on real torchrun launches (signals, kills): minutes of wall time each,
    # while its shared uninterrupted reference runs (forked launches) cost seconds per worker.
    "tests/training/test_checkpoint_robust.py",
)
SHARED = {
    "tests/hf/test_conversion.py": "hf-trained",  # the `trained` session fixture
    "tests/hf/test_export_robust.py": "hf-trained",
    "tests/hf/test_input_checks_robust.py": "hf-trained",
}
FIRST = (
    "tests/training/test_checkpoint_robust.py",
    "hf-trained",
    "tests/distributed/test_parallel_equivalence.py",
    "tests/training/test_sft.py",
    "tests/training/test_deepspeed_backend.py",
    "tests/test_quickstart.py",
    "tests/training/test_pretrain.py",
)


def _test_group(path: str) -> str:
    if path.startswith(("tests/inference/", "tests/tools/")):
        return path.rsplit("/", 1)[0]  # a tiny model cached per process; session fixtures
    return SHARED.get(path, path)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    def group(item):
        return _test_group(item.nodeid.split("::")[0])

    for item in items:
        if item.nodeid.split("::")[0] not in SPREAD:
            item.add_marker(pytest.mark.xdist_group(group(item)))
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(group(item), len(FIRST)))  # stable: file order kept
