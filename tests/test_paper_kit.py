"""examples/paper/: every experiment script runs in its --smoke mode and writes its tables and
plots; the scripts share the trained runs of one work directory (run in one process, in the
order a user would)."""

import json
import sys

import pytest

from tests.utils import REPO

SCRIPTS = ["compare_models", "loops_sweep", "loop_span_and_options", "mask_attention"]


@pytest.fixture()
def kit_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "examples" / "paper"))
    import importlib

    modules = {name: importlib.import_module(name) for name in SCRIPTS}
    yield modules
    for name in [*SCRIPTS, "kit"]:
        sys.modules.pop(name, None)


def test_every_paper_script_runs_in_smoke_mode(tmp_path, kit_modules):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only contend
    try:
        _run_all(tmp_path, kit_modules)
    finally:
        torch.set_num_threads(threads)


def _run_all(tmp_path, kit_modules):
    for name in SCRIPTS:
        assert kit_modules[name].main(["--smoke", "--work-dir", str(tmp_path)]) == 0, name
    compare = json.loads((tmp_path / "compare_models.json").read_text())
    assert {(r["model"], r["regime"]) for r in compare} == {
        (m, g) for m in ("mdm", "loopmdm", "deeper") for g in ("equal steps", "equal FLOPs")
    }
    assert all(r["seeds"] == 2 and 0 <= r["exact_match"] <= 1 for r in compare)
    by = {(r["model"], r["regime"]): r for r in compare}
    # Equal FLOPs: the LoopMDM's budget, so the cheaper MDM gets at least as many steps.
    loop = by[("loopmdm", "equal FLOPs")]
    assert by[("mdm", "equal FLOPs")]["steps"] >= loop["steps"] >= by[("deeper", "equal FLOPs")][
        "steps"]  # fmt: skip
    assert by[("deeper", "equal steps")]["train_flops"] > loop["train_flops"]
    sweep = json.loads((tmp_path / "loops_sweep.json").read_text())
    assert [r["num_loops"] for r in sweep] == [1, 2, 3, 4]  # 1 .. 2 S_max
    assert all(r["state_change"] >= 0 for r in sweep)
    variants = {r["variant"] for r in json.loads((tmp_path / "loop_span_and_options.json")
                                                 .read_text())}  # fmt: skip
    assert {"loopmdm", "inject-add", "inject-concat", "loop-embedding"} <= variants
    assert any(v.startswith("span-") for v in variants)
    options = json.loads((tmp_path / "loop_span_and_options.json").read_text())
    per_seed = json.loads((tmp_path / "loop_span_and_options_per_seed.json").read_text())
    assert sorted(r["seed"] for r in per_seed) == sorted([0, 1] * len(options))
    assert all(0 <= r["exact_match_2smax"] <= 1 and r["state_change_2smax"] >= 0
               for r in options)  # fmt: skip
    attention = json.loads((tmp_path / "mask_attention.json").read_text())
    assert all(0 <= r["share"] <= 1 for r in attention) and len(attention) == 1 + 2 + 3 + 4
    for png in ("compare_models", "loops_sweep_exact_match", "loops_sweep_val_nelbo",
                "loops_sweep_state_change",
                "loop_span_and_options", "mask_attention"):  # fmt: skip
        assert (tmp_path / f"{png}.png").stat().st_size > 0
    # The runs are shared: the sweep reused compare_models' LoopMDM of each seed.
    assert len(list((tmp_path / "runs").glob("loopmdm-seed*-steps3"))) == 2


@pytest.mark.slow
def test_loops_sweep_through_the_products_sft_command(tmp_path, kit_modules):
    """--trainer pretrain_loopmdm: tools/preprocess_sft.py, pretrain_loopmdm.py --sft, conversion
    to HF, then the same evaluation (about 2.5 minutes on a busy 2-core machine)."""
    argv = ["--smoke", "--seeds", "0", "--trainer", "pretrain_loopmdm", "--work-dir", str(tmp_path)]
    assert kit_modules["loops_sweep"].main(argv) == 0
    run_dir = tmp_path / "runs" / "loopmdm-cli-seed0-steps3"
    assert json.loads((run_dir / "run.json").read_text())["trainer"] == "pretrain_loopmdm"
    assert (run_dir / "ckpt").is_dir()
    sweep = json.loads((tmp_path / "loops_sweep.json").read_text())
    assert [r["num_loops"] for r in sweep] == [1, 2, 3, 4]
    assert all(r["val_nelbo"] > 0 for r in sweep)


def test_cached_runs_and_data_made_at_another_scale_are_refused(tmp_path, kit_modules):
    """The run cache was keyed by name/seed/steps only: a changed Scale reused stale runs."""
    from dataclasses import replace

    kit = sys.modules["kit"]
    scale = replace(kit.SCALES["smoke"], steps=1)
    paths = kit.prepare_data(tmp_path, scale)
    spec = kit.ModelSpec("loopmdm", scale.num_layers, scale.loop_layers, scale.max_loops)
    kit.train(spec, scale, paths, tmp_path, 0, 1)
    stored = json.loads((tmp_path / "runs" / "loopmdm-seed0-steps1" / "run.json").read_text())
    assert stored["scale"]["lr"] == scale.lr and stored["scale"]["hidden_size"] == 32
    reused = kit.train(spec, replace(scale, seeds=(5,)), paths, tmp_path, 0, 1)
    assert reused == {**stored, "dir": str(tmp_path / "runs" / "loopmdm-seed0-steps1" / "hf")}
    with pytest.raises(SystemExit, match="differs in: batch_size, lr"):
        kit.train(spec, replace(scale, lr=3e-3, batch_size=4), paths, tmp_path, 0, 1)
    with pytest.raises(SystemExit, match="differs in: levels"):
        kit.prepare_data(tmp_path, replace(scale, levels=(1, 2)))
    assert kit.prepare_data(tmp_path, scale) == paths


def test_scale_flag_selects_a_named_scale_and_refuses_unknown_ones(kit_modules, capsys):
    """`--scale` picks the sizes every script uses; the default is the CPU scale."""
    kit = sys.modules["kit"]
    assert kit.parse_args("t", []).scale == kit.SCALES["cpu"]
    old = kit.parse_args("t", ["--scale", "cpu-3tasks", "--seeds", "3"]).scale
    assert old.tasks == ("addition", "variable_lookup", "running_sum") and old.seeds == (3,)
    assert kit.parse_args("t", ["--smoke"]).scale.hidden_size == 32
    with pytest.raises(SystemExit):
        kit.parse_args("t", ["--scale", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err


def test_compare_models_runs_a_subset_of_models_and_regimes(tmp_path, kit_modules):
    argv = ["--smoke", "--seeds", "0", "--work-dir", str(tmp_path), "--models", "mdm", "deeper",
            "--regimes", "equal steps"]  # fmt: skip
    assert kit_modules["compare_models"].main(argv) == 0
    rows = json.loads((tmp_path / "compare_models_per_seed.json").read_text())
    assert sorted((r["model"], r["regime"]) for r in rows) == [("deeper", "equal steps"),
                                                               ("mdm", "equal steps")]
    # The LoopMDM sets the FLOPs budget, so it is trained even when not listed.
    assert (tmp_path / "runs" / "loopmdm-seed0-steps3" / "run.json").is_file()


def test_a_moved_work_directory_keeps_its_cached_runs(tmp_path, kit_modules):
    """run.json stored the model's absolute path: a renamed work directory pointed every
    cached run at a directory that no longer exists."""
    from dataclasses import replace

    from megatron_loopmdm.hf import load_for_inference

    kit = sys.modules["kit"]
    scale = replace(kit.SCALES["smoke"], steps=1)
    spec = kit.ModelSpec("loopmdm", scale.num_layers, scale.loop_layers, scale.max_loops)
    first = kit.train(spec, scale, kit.prepare_data(tmp_path / "a", scale), tmp_path / "a", 0, 1)
    (tmp_path / "a").rename(tmp_path / "b")
    moved = kit.train(spec, scale, kit.prepare_data(tmp_path / "b", scale), tmp_path / "b", 0, 1)
    assert moved["seconds"] == first["seconds"]  # the cached run, not a new training
    assert moved["dir"] == str(tmp_path / "b" / "runs" / "loopmdm-seed0-steps1" / "hf")
    assert load_for_inference(moved["dir"]).config.max_loops == scale.max_loops


def test_the_large_training_set_scale_has_distinct_prompts_and_disjoint_splits(kit_modules):
    """`cpu-add5-200k` trains on 200,000 fresh examples (the reference drew new ones every step)
    instead of 2,000 reused: every prompt is distinct and none is in validation or test, and the
    test split is the one a small training set gets."""
    from dataclasses import replace

    from megatron_loopmdm.evaluation.reasoning import make_splits

    kit = sys.modules["kit"]
    scale = kit.SCALES["cpu-add5-200k"]
    assert (scale.tasks, scale.levels, scale.batch_size) == (("addition",), (4,), 128)
    sizes = {"train": scale.train_per_level, "validation": scale.validation_per_level,
             "test": scale.test_per_level}  # fmt: skip
    splits = make_splits(list(scale.tasks), sizes, 0, list(scale.levels))
    prompts = {name: [r["prompt"] for r in records] for name, records in splits.items()}
    assert len(prompts["train"]) == len(set(prompts["train"])) == 200_000
    assert not set(prompts["train"]) & (set(prompts["validation"]) | set(prompts["test"]))
    assert all(len(p) == 12 and int(p[:5]) + int(p[6:11]) == int(r["answer"])
               for p, r in zip(prompts["train"][:1000], splits["train"]))  # fmt: skip
    small = make_splits(list(scale.tasks), {**sizes, "train": 2000}, 0, list(scale.levels))
    assert small["test"] == splits["test"] and small["validation"] == splits["validation"]
    assert kit.training_scale(scale) != kit.training_scale(replace(scale, train_per_level=2000))


def test_the_small_set_addition_scale_differs_from_the_reference_only_in_size_and_steps(
        kit_modules):
    """`cpu-add5` (session 7's comparison) is `cpu-add5-200k` with 2,000 training examples
    and 1,500 steps: the same task, model sizes, batch and lr, and at least 100 validation and
    test prompts each, so one prompt is at most a point of exact match."""
    from dataclasses import replace

    kit = sys.modules["kit"]
    scale = kit.SCALES["cpu-add5"]
    assert scale == replace(kit.SCALES["cpu-add5-200k"], train_per_level=2000, steps=1500)
    assert min(scale.validation_per_level, scale.test_per_level) >= 100
    assert (scale.num_layers, scale.loop_layers, scale.max_loops) == (4, (1, 2), 3)
    assert kit.parse_args("t", ["--scale", "cpu-add5"]).scale == scale


def test_the_encoded_train_split_and_sequence_length_are_cached_per_data_set(tmp_path,
                                                                               kit_modules):
    """Encoding a 200k-example split once per run took minutes: both are computed once, and a
    data set made again (another scale in a cleared directory) does not reuse them."""
    import shutil
    from dataclasses import replace

    from megatron_loopmdm.evaluation.reasoning import read_examples

    import torch

    kit = sys.modules["kit"]
    scale = kit.SCALES["smoke"]
    paths = kit.prepare_data(tmp_path, scale)
    tokens, response = kit.encoded_train_split(paths)
    expected = kit._encode_split(read_examples(paths["train"]), kit._tokenizer(paths),
                                 kit.sequence_length(paths))  # fmt: skip
    assert torch.equal(tokens, expected[0]) and torch.equal(response, expected[1])
    data = tmp_path / "data"
    assert (data / "train_tokens.pt").is_file() and (data / "seq_length.json").is_file()
    assert torch.equal(kit.encoded_train_split(paths)[0], tokens)  # from the cache
    shutil.rmtree(data / "tok")  # the data set is made again, at another scale
    longer = replace(scale, levels=(3,))
    paths = kit.prepare_data(tmp_path, longer)
    assert kit.sequence_length(paths) > tokens.shape[1]
    assert kit.encoded_train_split(paths)[0].shape == (len(read_examples(paths["train"])),
                                                       kit.sequence_length(paths))


def test_validation_pilot_scores_the_validation_split_only(tmp_path, kit_modules, capsys):
    """A scale is chosen on validation pilots: the pilot never samples a test prompt."""
    from megatron_loopmdm.evaluation.reasoning import read_examples

    sys.modules.pop("validation_pilot", None)
    import validation_pilot

    argv = ["--smoke", "--seeds", "0", "--work-dir", str(tmp_path), "--task", "addition",
            "--level", "1", "--train-per-level", "16", "--model", "loopmdm"]  # fmt: skip
    assert validation_pilot.main(argv) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("VAL ")][-1]
    result = json.loads(line[4:])
    assert result["train_per_level"] == 16 and result["model"] == "loopmdm"
    assert set(result["val_exact_match"]) == set(result["val_nelbo"]) == {"1", "2"}
    assert all(v > 0 for v in result["val_nelbo"].values())
    assert result["loss_curve"][-1][0] == result["steps"]
    out = tmp_path / "validation" / "loopmdm-seed0-steps3"
    sampled = {r["prompt"] for r in read_examples(out / "exact_match_predictions.jsonl")}
    data = tmp_path / "data"
    assert sampled == {r["prompt"] for r in read_examples(data / "validation.jsonl")}
    assert not sampled & {r["prompt"] for r in read_examples(data / "test.jsonl")}
    sys.modules.pop("validation_pilot", None)
    sys.modules.pop("compare_models", None)


def test_loop_convergence_trains_each_option_with_the_products_command(tmp_path, kit_modules):
    """Issue #12, Build 2: an option variant reaches pretrain_loopmdm.py as its flag (read back
    from the checkpoint's loop_config), is scored at S = 1 .. 2 S_max, and the per-variant
    measures are the ones its by-loops scores give."""
    sys.modules.pop("loop_convergence", None)
    import loop_convergence

    argv = ["--smoke", "--seeds", "0", "--work-dir", str(tmp_path), "--variants", "state-noise"]
    assert loop_convergence.main(argv) == 0
    ckpt = tmp_path / "runs" / "state-noise-cli-seed0-steps3" / "ckpt" / "iter_0000003"
    loop_config = json.loads((ckpt / "run_config.json").read_text())["loop_config"]
    assert loop_config["state_noise"] == 0.1 and loop_config["intermediate_loss_weight"] == 0.0
    curve = json.loads((tmp_path / "loop_convergence_by_loops.json").read_text())
    assert [r["num_loops"] for r in curve] == [1, 2, 3, 4]  # smoke S_max = 2
    at = {r["num_loops"]: r for r in curve}
    (row,) = json.loads((tmp_path / "loop_convergence_per_seed.json").read_text())
    assert row["val_exact_drop"] == at[2]["val_exact_match"] - min(at[3]["val_exact_match"],
                                                                   at[4]["val_exact_match"])
    assert row["nelbo_rise"] == pytest.approx(max(at[3]["val_nelbo"], at[4]["val_nelbo"])
                                              - at[2]["val_nelbo"])  # fmt: skip
    assert row["change_ratio"] == pytest.approx(at[4]["state_change"] / at[2]["state_change"])
    assert row["test_exact_2smax"] == at[4]["test_exact_match"]
    for png in ("val_exact_match", "val_nelbo", "state_change"):
        assert (tmp_path / f"loop_convergence_{png}.png").stat().st_size > 0
    sys.modules.pop("loop_convergence", None)


def test_trainer_only_options_refuse_the_in_process_trainer(tmp_path, kit_modules):
    """The in-process trainer has no loop-state noise: a variant that needs it is refused
    before any training, not trained without it."""
    from dataclasses import replace

    kit = sys.modules["kit"]
    scale = replace(kit.SCALES["smoke"], steps=1)
    paths = kit.prepare_data(tmp_path, scale)
    spec = kit.ModelSpec("noisy", scale.num_layers, scale.loop_layers, scale.max_loops,
                         trainer_flags=("--loop-state-noise", 0.1))  # fmt: skip
    with pytest.raises(SystemExit, match="--loop-state-noise 0.1: options of pretrain_loopmdm"):
        kit.train(spec, scale, paths, tmp_path, 0, 1)
    assert not (tmp_path / "runs").exists()


def test_loop_span_and_options_trains_only_the_chosen_variants(kit_modules):
    """`--only` picks variants beside the default LoopMDM; a span equal to the default's is
    the default itself, not trained twice."""
    kit, module = sys.modules["kit"], kit_modules["loop_span_and_options"]
    scale = kit.SCALES["cpu-add5"]  # 4 layers, loop span (1, 2): the middle span is the default
    args = module.kit.parse_args("t", ["--only", "late", "middle", "loop-embedding"],
                                 module._arguments)  # fmt: skip
    chosen = module.variants(scale, args.only)
    assert [(s.name, s.loop_layers, s.options) for s in chosen] == [
        ("loopmdm", (1, 2), {}), ("span-late2-3", (2, 3), {}),
        ("loop-embedding", (1, 2), {"loop_embedding": True})]
    assert len(module.variants(scale)) == 6  # early, late, 2 injections, embedding + default
