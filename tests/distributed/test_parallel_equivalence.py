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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    return {
        "plain": run_worker(tmp, "plain", 1),
        "injection": run_worker(
            tmp, "injection", 1, "--input-injection", "concat", "--loop-embedding"
        ),
    }


def assert_same_curve(run, reference):
    assert [s["num_loops"] for s in run["steps"]] == [s["num_loops"] for s in reference["steps"]]
    assert len({s["num_loops"] for s in reference["steps"]}) > 1, "S must vary between steps"
    for got, want in zip(run["steps"], reference["steps"]):
        assert got["loss"] == pytest.approx(want["loss"], rel=RTOL)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=RTOL)


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
    "tp2-sequence-parallel-injection-loop-embedding": (
        2,
        ["--tp", "2", "--sequence-parallel", "--input-injection", "concat", "--loop-embedding"],
        "injection",
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(tmp_path, reference, name):
    nproc, args, ref_name = LAYOUTS[name]
    run = run_worker(tmp_path, name, nproc, *args)
    assert run["world_size"] == nproc
    assert_same_curve(run, reference[ref_name])


def test_model_parallel_ranks_hold_a_share_of_the_parameters(tmp_path, reference):
    full = reference["plain"]["local_params_last_rank"]
    tp2 = run_worker(tmp_path, "tp2-params", 2, "--tp", "2", "--steps", "1")
    assert full / 2 < tp2["local_params_last_rank"] < full


def test_intermediate_loop_loss_under_tensor_and_sequence_parallelism(tmp_path):
    """The intermediate-loop term (per-token CE from megatron's vocab-parallel cross entropy on
    each intermediate loop's head) and its gradients agree between TP=2 + SP and one process."""
    flags = ["--intermediate-loop-loss-weight", "0.5", "--max-loops", "4"]
    reference = run_worker(tmp_path, "intermediate", 1, *flags)
    run = run_worker(tmp_path, "intermediate-tp2", 2, "--tp", "2", "--sequence-parallel", *flags)
    assert_same_curve(run, reference)
    terms = [s["intermediate_loss"] for s in reference["steps"]]
    assert any(s["num_loops"] > 1 and term > 0 for s, term in zip(reference["steps"], terms))
    for got, want in zip(run["steps"], reference["steps"]):
        assert got["intermediate_loss"] == pytest.approx(want["intermediate_loss"], rel=RTOL)
