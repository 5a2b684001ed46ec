"""bench/sampling_speed.py: its selection of the reported speedup (hand-made rows), and a run on
the reasoning-kit model of bench/sampling_kit_model.py."""

import importlib.util
import json

import pytest

from tests.utils import REPO


@pytest.fixture(scope="module")
def bench():
    path = REPO / "bench" / "sampling_speed.py"
    spec = importlib.util.spec_from_file_location("sampling_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(path, rate, exact=None, agreement=1.0, gen_length=64, batch=8, loops="fixed"):
    return {"gen_length": gen_length, "batch": batch, "loops": loops, "path": path,
            "tokens_per_second": rate, "exact": exact, "agreement": agreement}  # fmt: skip


def test_speedup_is_against_plain_at_the_same_length_batch_and_loops(bench):
    rows = [
        _row("plain", 100.0, 0.80),
        _row("threshold", 450.0, 0.795),  # 4.5x, 0.5 points below: qualifies
        _row("dual", 900.0, 0.78),  # 9x but 2 points below: does not
        # A slow plain at another batch must not lend its baseline to these rows.
        _row("plain", 10.0, 0.80, batch=1),
        _row("prefix", 300.0, 0.81, batch=1),  # 30x against its own plain
        _row("prefix", 5000.0, 0.90, loops="adaptive"),  # no adaptive plain: never counted
    ]
    best, row = bench.qualifying_speedup(rows, task=True)
    assert best == pytest.approx(30.0) and row["batch"] == 1
    best, row = bench.qualifying_speedup(rows[:3], task=True)
    assert best == pytest.approx(4.5) and row["path"] == "threshold"


def test_a_task_plain_does_not_solve_gives_no_speedup(bench):
    rows = [_row("plain", 100.0, 0.40), _row("threshold", 800.0, 0.40)]
    best, why = bench.qualifying_speedup(rows, task=True)
    assert best is None and "below 0.5" in why


def test_without_a_task_rows_need_99_percent_agreement(bench):
    rows = [_row("plain", 100.0), _row("threshold", 500.0, agreement=0.985),
            _row("prefix", 200.0, agreement=0.99)]  # fmt: skip
    best, row = bench.qualifying_speedup(rows, task=False)
    assert best == pytest.approx(2.0) and row["path"] == "prefix"
    best, why = bench.qualifying_speedup(rows[:2], task=False)
    assert best is None and "agreement < 99%" in why


def test_bad_bench_arguments_fail_clearly(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--data", "validation.jsonl"])
    assert "--data needs --load" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--thresholds", "0.9,high"])
    assert "comma lists" in capsys.readouterr().err


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kit_model_driver_feeds_the_bench_with_its_validation_split(bench, tmp_path, capsys):
    """bench/sampling_kit_model.py trains (2 steps here, then 2 with long EOS padding) and
    prints the model and validation paths; the bench scores that model's answers on that split,
    every row against its plain."""
    driver = _load_script("sampling_kit_model")
    base = ["--work-dir", str(tmp_path), "--steps", "2", "--validation-per-level", "3"]
    with pytest.raises(SystemExit, match="must be >= "):  # shorter than an example + EOS
        driver.main([*base, "--pad-lengths", "3"])
    assert driver.main([*base, "--pad-lengths", "16,24", "--long-steps", "2"]) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines()
                   if line.startswith(("model: ", "validation: ")))  # fmt: skip
    assert printed["model"].endswith("hf-long-16-24-steps2")  # the continuation is the model
    validation = [json.loads(line) for line in open(printed["validation"])]
    assert len(validation) == 3 and {r["task"] for r in validation} == {"addition"}
    assert all(len(r["prompt"].split("+")[0]) == 2 for r in validation)  # level 1: 2 digits
    rows_path = tmp_path / "rows.json"
    assert bench.main(["--load", printed["model"], "--data", printed["validation"],
                       "--gen-lengths", "8", "--batch-sizes", "2", "--thresholds", "0.9",
                       "--max-loops", "2", "--loop-modes", "fixed",
                       "--json", str(rows_path)]) == 0  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("sampling_speedup=")
    rows = json.loads(rows_path.read_text())
    assert {r["path"] for r in rows} == {"plain", "threshold", "prefix", "dual"}
    plain = [r for r in rows if r["path"] == "plain"]
    assert len(plain) == 1 and plain[0]["agreement"] == 1.0 and plain[0]["loops"] == "fixed"
    assert all(0.0 <= r["exact"] <= 1.0 and r["model_flops"] > 0 for r in rows)


def test_loop_modes_choose_the_loop_settings_run(bench, capsys):
    def loop_settings(argv):
        return {loops for loops, *_ in bench._configs(bench.parse_args(argv), 64)}

    assert loop_settings([]) == {"fixed", "adaptive"}
    assert loop_settings(["--loop-modes", "fixed"]) == {"fixed"}
    assert loop_settings(["--loop-modes", "adaptive"]) == {"adaptive"}
    configs = bench._configs(bench.parse_args(["--loop-modes", "fixed", "--max-loops", "3"]), 64)
    assert configs[0][1] == "plain" and all(c.loops.num_loops == 3 for *_, c in configs)
    with pytest.raises(SystemExit):
        bench.parse_args(["--loop-modes", "fixed,deep"])
    assert "--loop-modes takes fixed and/or adaptive" in capsys.readouterr().err


def test_flops_speedup_uses_the_same_bar_and_baseline(bench):
    def row(path, rate, flops, exact, batch=8):
        return {**_row(path, rate, exact, batch=batch), "model_flops": flops}

    rows = [
        row("plain", 10.0, 1000.0, 0.80),
        row("threshold", 70.0, 800.0, 0.80),  # 7x tokens/s (load), 1.25x compute
        row("prefix", 40.0, 250.0, 0.795),  # 4x compute, within 1 point
        row("dual", 30.0, 100.0, 0.70),  # 10x compute, 10 points below: not counted
        row("plain", 10.0, 50.0, 0.80, batch=1),  # a cheaper plain elsewhere lends nothing
    ]
    best, best_row = bench.qualifying_speedup(rows, task=True)
    assert best == pytest.approx(7.0) and best_row["path"] == "threshold"
    flops, flops_row = bench.qualifying_speedup(rows, task=True, measure="flops")
    assert flops == pytest.approx(4.0) and flops_row["path"] == "prefix"
    assert bench._flops_ratio(rows, best_row) == pytest.approx(1.25)


def test_cache_refresh_every_adds_the_refilled_cache_rows(bench):
    def rows(argv):
        args = bench.parse_args(["--loop-modes", "fixed", "--thresholds", "0.9", *argv])
        return {path: config for _, path, _, config in bench._configs(args, 64)}

    assert set(rows([])) == {"plain", "threshold", "prefix", "dual"}
    configs = rows(["--cache-refresh-every", "2"])
    assert set(configs) == {"plain", "threshold", "prefix", "dual", "prefix/r2", "dual/r2"}
    assert configs["dual/r2"].cache == "dual" and configs["dual/r2"].cache_refresh_every == 2
    assert configs["prefix/r2"].cache == "prefix" and configs["prefix"].cache_refresh_every is None
