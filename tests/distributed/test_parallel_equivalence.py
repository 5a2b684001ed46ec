"""Every parallel layout gives the single-process loss curve (real gloo processes).

`parallel_worker.py` trains each configuration for three steps with S drawn per step; every
layout's global per-token loss and gradient norm, step by step, must equal a one-process run of
the same configuration. The configurations run as cases of three launches (one, two and four
processes), started together so that they share the two cores.
"""

import json
import shlex

import pytest

from tests.utils import REPO, finish, start_torchrun

WORKER = REPO / "tests" / "distributed" / "parallel_worker.py"
RTOL = 1e-5

# The loop options together, with the intermediate-loop loss (W = 0.5, S up to 4): its
# per-token cross entropy comes from megatron's vocab-parallel loss on each intermediate loop.
INJECTION = ["--input-injection", "concat", "--loop-embedding",
             "--intermediate-loop-loss-weight", "0.5", "--max-loops", "4"]  # fmt: skip

# {name: (processes, flags, the one-process reference it must equal)}
LAYOUTS = {
    "tp2": (2, ["--tp", "2"], "plain"),
    "pp2": (2, ["--pp", "2"], "plain"),
    "dp2": (2, [], "plain"),
    "tp2xpp2": (4, ["--tp", "2", "--pp", "2"], "plain"),
    "pp2-interleaved": (2, ["--pp", "2", "--vpp", "2"], "plain"),
    "dp2-overlap-grad-reduce-distributed-optimizer": (
        2,
        ["--overlap-grad-reduce", "--use-distributed-optimizer"],
        "plain",
    ),
    "recompute-full": (1, ["--recompute"], "plain"),
    "tp2-sequence-parallel-injection-loop-embedding-intermediate-loss": (
        2,
        ["--tp", "2", "--sequence-parallel", *INJECTION],
        "injection",
    ),
}
CASES = {
    1: {"plain": [], "injection": INJECTION},
    2: {"tp2-params": ["--tp", "2", "--steps", "1"]},
    4: {},
}
for layout, (nproc, flags, _) in LAYOUTS.items():
    CASES[nproc][layout] = flags


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{case name: the worker's result} over the three launches."""
    tmp = tmp_path_factory.mktemp("layouts")
    launches = {}
    for nproc, cases in CASES.items():
        args = [f"--case={name}={shlex.join(flags)}" for name, flags in cases.items()]
        args += ["--out", tmp / f"{nproc}.json"]
        launches[nproc] = start_torchrun(WORKER, nproc, args)
    results = {}
    for nproc, process in launches.items():
        done = finish(process)
        assert done.returncode == 0, f"{nproc} processes:\n{done.stderr[-4000:]}"
        launched = json.loads((tmp / f"{nproc}.json").read_text())["cases"]
        assert all(run["world_size"] == nproc for run in launched.values())
        results.update(launched)
    return results


def assert_same_curve(run, reference):
    assert [s["num_loops"] for s in run["steps"]] == [s["num_loops"] for s in reference["steps"]]
    assert len({s["num_loops"] for s in reference["steps"]}) > 1, "S must vary between steps"
    for got, want in zip(run["steps"], reference["steps"], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=RTOL)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=RTOL)
        if want["intermediate_loss"] is not None:
            assert got["intermediate_loss"] == pytest.approx(want["intermediate_loss"], rel=RTOL)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(runs, name):
    reference = runs[LAYOUTS[name][2]]
    assert_same_curve(runs[name], reference)
    if LAYOUTS[name][2] == "injection":
        steps = reference["steps"]
        assert any(s["num_loops"] > 1 and s["intermediate_loss"] > 0 for s in steps)


def test_model_parallel_ranks_hold_a_share_of_the_parameters(runs):
    full = runs["plain"]["local_params_last_rank"]
    assert full / 2 < runs["tp2-params"]["local_params_last_rank"] < full
