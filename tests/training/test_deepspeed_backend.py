"""The DeepSpeed ZeRO backend: same loss curve as the megatron backend, exact resume, refusals.

The multi-process cases run `deepspeed_worker.py` under torchrun (real gloo processes) and
compare, step by step with S drawn per step, the global per-token loss and the gradient norm
with `tests/distributed/parallel_worker.py` on one process (the megatron backend, same model,
weights, data and noise). The refusals are checked in-process.
"""

import math

from megatron_loopmdm.distributed.parallel import ParallelConfig
from megatron_loopmdm.training import deepspeed_backend as ds
from megatron_loopmdm.training import deepspeed_config as dsc

import pytest
import torch

from tests.utils import REPO, run_json_worker

WORKER = REPO / "tests" / "training" / "deepspeed_worker.py"
REFERENCE_WORKER = REPO / "tests" / "distributed" / "parallel_worker.py"
EXAMPLES = REPO / "examples" / "deepspeed"
RTOL = 1e-4
STEPS = 4


def run(tmp_path, script, name, nproc, *args):
    return run_json_worker(script, nproc, [*args, "--steps", STEPS], tmp_path / f"{name}.json")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The megatron backend on one process: three cases of one launch."""
    cases = {
        "plain": "",
        "injection": "--input-injection concat --loop-embedding",
        "loopterm": "--intermediate-loop-loss-weight 0.5",  # deepspeed_worker.LOOP_TERM_WEIGHT
    }
    args = [f"--case={name}={flags} --steps {STEPS}" for name, flags in cases.items()]
    out = tmp_path_factory.mktemp("reference") / "reference.json"
    runs = run_json_worker(REFERENCE_WORKER, 1, args, out)["cases"]
    return {name: runs[name]["steps"] for name in cases}


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory):
    """DP=2 (2 micro-batches per replica): ZeRO-3 (which saves before step 2), -1, -2, then
    recompute, bf16 and intermediate-loop loss cases, in one launch; DeepSpeed's JIT-built ops
    go to an empty directory of their own (`torch_extensions`), which must stay empty."""
    tmp = tmp_path_factory.mktemp("dp2")
    checkpoint = tmp / "checkpoint"
    cases = ["3", "1", "2", "2+recompute", "3+recompute+injection", "2+bf16", "3+bf16"]
    cases += ["1+padded", "3+padded+mb2", "2+nan", "2+loopterm"]
    args = ["--cases", *cases, "--save", checkpoint, "--save-at", 2]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_EXTENSIONS_DIR", str(tmp / "torch_extensions"))
        return run(tmp, WORKER, "dp2", 2, *args), checkpoint


def assert_same_curve(steps, reference):
    assert [s["num_loops"] for s in steps] == [s["num_loops"] for s in reference]
    assert len({s["num_loops"] for s in reference}) > 1, "S must vary between steps"
    for got, want in zip(steps, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=RTOL)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=RTOL)


@pytest.mark.parametrize("stage", ["1", "2", "3"])
def test_zero_stage_at_dp2_matches_megatron_backend(data_parallel, reference, stage):
    run_result, _ = data_parallel
    assert run_result["world_size"] == 2
    assert_same_curve(run_result["runs"][stage], reference["plain"])


def test_non_reentrant_recompute_with_loops_matches_megatron_backend(data_parallel, reference):
    """The model's own recompute is safe with a reused layer at ZeRO-2 and ZeRO-3."""
    run_result, _ = data_parallel
    assert_same_curve(run_result["runs"]["2+recompute"], reference["plain"])
    assert_same_curve(run_result["runs"]["3+recompute+injection"], reference["injection"])


def test_micro_batches_with_different_token_counts(data_parallel):
    """Padding makes micro-batches count different tokens (`num_tokens_func`); splitting the
    global batch into 1- or 2-sample micro-batches must not change loss or gradients."""
    runs = data_parallel[0]["runs"]
    assert_same_curve(runs["1+padded"], runs["3+padded+mb2"])
    assert runs["1+padded"][0]["loss"] != pytest.approx(runs["1"][0]["loss"], rel=1e-3)


def test_non_finite_gradients_skip_the_update(data_parallel, reference):
    """NaN gradients at step 1: no update (as the megatron path), training goes on."""
    steps = data_parallel[0]["runs"]["2+nan"]  # the worker asserts update_successful per step
    assert steps[0] == data_parallel[0]["runs"]["2"][0]
    assert steps[1]["grad_norm"] is None
    assert steps[2]["loss"] != pytest.approx(reference["plain"][2]["loss"], rel=1e-4)
    assert all(math.isfinite(s["loss"]) and s["loss"] < 10 for s in steps)


@pytest.mark.parametrize("stage", ["2", "3"])
def test_bf16_follows_the_fp32_curve(data_parallel, reference, stage):
    """bf16 (the example configs' mode) trains: losses within 1% of the fp32 megatron run."""
    steps = data_parallel[0]["runs"][f"{stage}+bf16"]
    for got, want in zip(steps, reference["plain"], strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-2)


def test_tensor_and_sequence_parallel_match_megatron_backend(tmp_path, reference):
    """TP=2 with ZeRO-1; TP=2 + sequence parallel at every stage, with the injection adapter
    and loop embedding (tagged `sequence_parallel`; the adapter is unused when S=1)."""
    cases = ["1", "1+sp+injection", "2+sp+injection", "3+sp+injection"]
    result = run(tmp_path, WORKER, "tp2", 2, "--tp", 2, "--cases", *cases)
    for case in cases:
        want = reference["injection" if "injection" in case else "plain"]
        assert_same_curve(result["runs"][case], want)


def test_intermediate_loop_loss_at_dp2_matches_megatron_backend(data_parallel, reference):
    """ZeRO-2 at DP=2 with the intermediate-loop loss: the same loss, intermediate term (reduced
    over the replicas) and grad norm as the megatron backend on one process."""
    steps, want = data_parallel[0]["runs"]["2+loopterm"], reference["loopterm"]
    assert_same_curve(steps, want)
    assert any(s["intermediate_loss"] > 0 for s in want)
    for got, ref in zip(steps, want, strict=True):
        assert got["intermediate_loss"] == pytest.approx(ref["intermediate_loss"], rel=RTOL)


def test_training_on_cpu_builds_no_deepspeed_op(data_parallel):
    """DeepSpeed's shared-memory all-reduce (a C++ JIT build, for its inference kernels) is
    skipped on CPU: training needs no compiler (`deepspeed_backend._skip_cpu_shared_memory_comm`).
    """
    _, checkpoint = data_parallel
    extensions = checkpoint.parent / "torch_extensions"
    assert not extensions.exists() or not any(extensions.rglob("*.so")), list(extensions.rglob("*"))


def test_resume_from_deepspeed_checkpoint_is_exact(tmp_path, data_parallel):
    uninterrupted, checkpoint = data_parallel
    assert (checkpoint / "latest").read_text().strip() == "iter_0000002"
    resumed = run(tmp_path, WORKER, "resumed", 2, "--cases", "3", "--load", checkpoint)
    assert resumed["runs"]["3"] == uninterrupted["runs"]["3"][2:]


# ---- configuration: examples, batch sizes, refusals (in-process) ----


def test_example_configs_are_valid_for_bf16():
    for stage in (1, 2, 3):
        config = dsc.load_deepspeed_config(EXAMPLES / f"zero{stage}.json")
        assert dsc.zero_stage(config) == stage
        prepared = dsc.prepare_deepspeed_config(
            config, ParallelConfig(), 2, 16, 4, params_dtype=torch.bfloat16
        )
        assert prepared["gradient_accumulation_steps"] == 2
        assert prepared["gradient_clipping"] == 1.0


def test_stage3_prefetching_is_turned_off():
    config = {"zero_optimization": {"stage": 3}}
    prepared = dsc.prepare_deepspeed_config(config, ParallelConfig(), 1, 4, 2)
    assert prepared["zero_optimization"]["stage3_prefetch_bucket_size"] == 0
    assert prepared["zero_optimization"]["stage3_max_reuse_distance"] == 0
    assert "stage3_prefetch_bucket_size" not in config["zero_optimization"]  # not mutated


def test_batch_sizes_are_filled_and_checked():
    filled = dsc.fill_batch_sizes({"train_batch_size": "auto"}, 2, 32, 4)
    assert filled["train_micro_batch_size_per_gpu"] == 2
    assert filled["gradient_accumulation_steps"] == 4
    assert filled["train_batch_size"] == 32
    with pytest.raises(ValueError, match="train_batch_size=64 contradicts"):
        dsc.fill_batch_sizes({"train_batch_size": 64}, 2, 32, 4)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=8 contradicts"):
        dsc.fill_batch_sizes({"gradient_accumulation_steps": 8}, 2, 32, 4)
    with pytest.raises(ValueError, match="must be a positive multiple"):
        dsc.fill_batch_sizes({}, 3, 32, 4)


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        dsc.load_deepspeed_config(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        dsc.load_deepspeed_config(broken)


ZERO2 = {"zero_optimization": {"stage": 2}}
REFUSALS = {
    "pipeline": (ZERO2, {"pp": 2}, "use-distributed-optimizer"),
    "unknown-stage": ({"zero_optimization": {"stage": 4}}, {}, "use 1, 2 or 3"),
    "stage-0": ({"zero_optimization": {"stage": 0}}, {}, "Use stage 1, 2 or 3"),
    "bf16-config-fp32-run": ({**ZERO2, "bf16": {"enabled": True}}, {}, "pass --bf16"),
    "fp32-config-bf16-run": (ZERO2, {"dtype": torch.bfloat16}, "pass neither"),
    "fp16-and-bf16": (
        {**ZERO2, "bf16": {"enabled": True}, "fp16": {"enabled": True}},
        {},
        "enable at most one",
    ),
    "optimizer-section": ({**ZERO2, "optimizer": {"type": "Adam"}}, {}, "'optimizer' section"),
    "scheduler-section": ({**ZERO2, "scheduler": {"type": "WarmupLR"}}, {}, "'scheduler'"),
    "reentrant-checkpointing": (
        {**ZERO2, "activation_checkpointing": {"partition_activations": True}},
        {},
        "--recompute-granularity full",
    ),
    "offload": (
        {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
        {},
        "ZeRO-Offload",
    ),
    "stage3-prefetch": (
        {"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 5e7}},
        {},
        "loop count S changes every step",
    ),
    "ulysses": ({**ZERO2, "sequence_parallel_size": 2}, {}, "DeepSpeed-Ulysses"),
    "clip-mismatch": ({**ZERO2, "gradient_clipping": 0.5}, {}, "contradicts --clip-grad 1.0"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_incompatible_configs_are_refused(name):
    config, options, message = REFUSALS[name]
    parallel = ParallelConfig(pipeline_model_parallel_size=options.get("pp", 1))
    with pytest.raises(ValueError, match=message):
        dsc.validate_deepspeed_config(
            config, parallel, options.get("dtype", torch.float32), clip_grad=1.0
        )


def test_missing_deepspeed_gives_install_hint(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "deepspeed", None)
    with pytest.raises(ImportError, match="pip install deepspeed"):
        ds.import_deepspeed()


def test_mpu_maps_model_parallel_to_tensor_parallel(megatron_single_process):
    from megatron.core import parallel_state

    mpu = ds.MegatronMPU()
    assert mpu.get_model_parallel_world_size() == 1
    assert mpu.get_model_parallel_rank() == 0
    assert mpu.get_model_parallel_group() is parallel_state.get_tensor_model_parallel_group()
    assert mpu.get_data_parallel_world_size() == 1
    assert not hasattr(mpu, "get_sequence_parallel_world_size")  # not DeepSpeed-Ulysses


def test_adamw_groups_follow_megatron():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = ds.adamw_param_groups(model, 0.1)
    assert [p.dim() for p in decay["params"]] == [2]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
    (everything,) = ds.adamw_param_groups(model, 0.1, decay_biases_and_norms=True)
    assert len(everything["params"]) == 4
