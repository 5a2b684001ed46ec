"""bench/sampling_speed.py's selection of the reported speedup, on hand-made rows."""

import importlib.util

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
