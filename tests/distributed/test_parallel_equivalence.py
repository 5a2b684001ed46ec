"""Every parallel layout gives the single-process loss curve (real gloo processes).

Each case runs `parallel_worker.py` under torchrun for three training steps with S drawn per
step, and compares the global per-token loss and the gradient norm of every step with a
one-process run of the same configuration.
"""

import pytest

from tests.utils import REPO, run_json_worker

WORKER = REPO / "tests" / "distributed" / "parallel_worker.py"
RTOL = 1e-5


def run_worker(tmp_path, name, nproc, *args):
    return run_json_worker(WORKER, nproc, args, tmp_path / f"{name}.json")


# The loop options together, with the intermediate-loop loss (W = 0.5, S up to 4): its
# per-token cross entropy comes from megatron's vocab-parallel loss on each intermediate loop.
INJECTION = ["--input-injection", "concat", "--loop-embedding",
             "--intermediate-loop-loss-weight", "0.5", "--max-loops", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    return {
        "plain": run_worker(tmp, "plain", 1),
        "injection": run_worker(tmp, "injection", 1, *INJECTION),
    }


def assert_same_curve(run, reference):
    assert [s["num_loops"] for s in run["steps"]] == [s["num_loops"] for s in reference["steps"]]
    assert len({s["num_loops"] for s in reference["steps"]}) > 1, "S must vary between steps"
    for got, want in zip(run["steps"], reference["steps"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=RTOL)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=RTOL)
        if want["intermediate_loss"] is not None:
            assert got["intermediate_loss"] == pytest.approx(want["intermediate_loss"], rel=RTOL)


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


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(tmp_path, reference, name):
    nproc, args, ref_name = LAYOUTS[name]
    run = run_worker(tmp_path, name, nproc, *args)
    assert run["world_size"] == nproc
    assert_same_curve(run, reference[ref_name])
    if ref_name == "injection":
        steps = reference[ref_name]["steps"]
        assert any(s["num_loops"] > 1 and s["intermediate_loss"] > 0 for s in steps)


def test_model_parallel_ranks_hold_a_share_of_the_parameters(tmp_path, reference):
    full = reference["plain"]["local_params_last_rank"]
    tp2 = run_worker(tmp_path, "tp2-params", 2, "--tp", "2", "--steps", "1")
    assert full / 2 < tp2["local_params_last_rank"] < full
