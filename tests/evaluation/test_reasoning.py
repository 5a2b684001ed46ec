"""The reasoning suite (tasks, splits) and exact-match scoring, in-process and through the CLI."""

import importlib.util
import json

from megatron_loopmdm.evaluation.exact_match import (
    answer_nelbo_per_loops,
    cut_at_stop,
    exact_match_per_loops,
)
from megatron_loopmdm.evaluation.reasoning import TASKS, make_splits, read_examples
from megatron_loopmdm.inference import SamplerConfig

import pytest
import torch

from tests.inference.tiny_model import EOS, sample_sequences, train_tiny_model
from tests.utils import REPO

SIZES = {"train": 30, "validation": 5, "test": 8}


def _check_answer(record):
    """Recomputes the answer from the prompt, independently of the generators."""
    prompt, task = record["prompt"][:-1], record["task"]
    if task == "addition":
        a, b = prompt.split("+")
        return str(int(a) + int(b))
    if task == "multiplication":
        a, b = prompt.split("*")
        return str(int(a) * int(b))
    if task == "permutation":
        result = "01234"
        for perm in prompt[2:].split(","):
            result = "".join(perm[int(i)] for i in result)
        return result
    if task == "variable_lookup":
        statements, query = prompt.split(";")
        env = dict(s.split("=") for s in statements.split(","))
        while not env[query].isdigit():
            query = env[query]
        return env[query]
    digits = [int(c) for c in prompt[2:]]
    return "".join(str(sum(digits[: i + 1]) % 10) for i in range(len(digits)))


def test_splits_are_correct_deterministic_and_disjoint():
    splits = make_splits(list(TASKS), SIZES, seed=3)
    assert {k: len(v) for k, v in splits.items()} == {k: n * 5 * 4 for k, n in SIZES.items()}
    for records in splits.values():
        for record in records:
            assert record["response"] == record["answer"] == _check_answer(record), record
    keys = {name: {(r["task"], r["prompt"]) for r in rs} for name, rs in splits.items()}
    assert all(len(keys[n]) == len(splits[n]) for n in keys)  # no repeats inside a split
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    again = make_splits(list(TASKS), {**SIZES, "train": 60}, seed=3)
    assert again["test"] == splits["test"] and again["validation"] == splits["validation"]
    assert make_splits(list(TASKS), SIZES, seed=4)["test"] != splits["test"]
    # Harder levels have longer answers or prompts (more steps).
    for task in TASKS:
        lengths = [len(r["prompt"]) + len(r["answer"]) for r in splits["test"]
                   if r["task"] == task and r["difficulty"] in (1, 4)]  # fmt: skip
        assert sum(lengths[len(lengths) // 2 :]) > sum(lengths[: len(lengths) // 2])


def test_train_levels_and_bad_requests():
    splits = make_splits(["addition"], SIZES, levels=[1, 2, 3], train_levels=[1, 2])
    assert {r["difficulty"] for r in splits["train"]} == {1, 2}
    assert {r["difficulty"] for r in splits["test"]} == {1, 2, 3}
    with pytest.raises(ValueError, match="choose from"):
        make_splits(["sudoku"], SIZES)
    with pytest.raises(ValueError, match="ask for fewer"):
        make_splits(["multiplication"], {"test": 8200}, levels=[1])  # 90 x 90


def _tool():
    """tools/make_reasoning_tasks.py as a module (its main() is the command line)."""
    spec = importlib.util.spec_from_file_location("mrt", REPO / "tools" / "make_reasoning_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_writes_files_and_refuses_bad_arguments(tmp_path, capsys):
    main = _tool().main
    common = ["--tasks", "addition,running_sum", "--train-per-level", "4",
              "--validation-per-level", "2", "--test-per-level", "3"]  # fmt: skip
    assert main([*common, "--output-dir", str(tmp_path / "a")]) == 0
    test = read_examples(tmp_path / "a" / "test.jsonl", ("prompt", "response", "difficulty"))
    assert len(test) == 2 * 4 * 3 and {r["task"] for r in test} == {"addition", "running_sum"}
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["counts"] == {"test": 24, "validation": 16, "train": 32}
    capsys.readouterr()
    assert main(["--levels", "1,9", "--output-dir", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err
    assert "1..4" in error and len(error.splitlines()) == 1 and not (tmp_path / "b").exists()


def test_exact_match_and_answer_nelbo_on_the_tiny_language():
    model = train_tiny_model()
    rows = sample_sequences(12, torch.Generator().manual_seed(5), length=8).tolist()
    examples = [
        {"prompt": "".join(map(str, r[:2])), "answer": "".join(map(str, r[2:])),
         "task": "sequence", "difficulty": 1 + n % 2} for n, r in enumerate(rows)
    ]  # fmt: skip
    wrong = [{**e, "answer": e["answer"][::-1] + "0"} for e in examples]
    digits = lambda text: [int(c) for c in text]  # noqa: E731
    undigits = lambda ids: "".join(str(i) if i < 10 else "#" for i in ids)  # noqa: E731
    # The tiny language has no EOS: generate exactly the answer length.
    score, predictions = exact_match_per_loops(
        model, examples + wrong, digits, undigits, [1, 2], stop_ids=[EOS],
        sampler=SamplerConfig(gen_length=6, steps=6), batch_size=5,
    )  # fmt: skip
    overall = {r["num_loops"]: r for r in score if r["task"] == r["difficulty"] == "all"}
    assert overall[2]["total"] == 24 and len(predictions) == 48
    assert overall[2]["correct"] == sum(p["correct"] for p in predictions if p["num_loops"] == 2)
    assert overall[2]["correct"] >= 5  # of the 12 right answers; chance: 1e-6 per answer
    assert not any(p["correct"] for p in predictions[12:24] + predictions[36:])  # the wrong ones
    levels = [r for r in score if r["task"] == "sequence" and r["difficulty"] != "all"]
    assert sorted({r["difficulty"] for r in levels}) == ["1", "2"]
    assert cut_at_stop([3, 4, EOS, 5], [EOS]) == [3, 4]
    nelbo = answer_nelbo_per_loops(model, examples[:4] + wrong[:4], digits, [2], num_samples=4)
    right = answer_nelbo_per_loops(model, examples[:4], digits, [2], num_samples=4)[0]["nelbo"]
    bad = answer_nelbo_per_loops(model, wrong[:4], digits, [2], num_samples=4)[0]["nelbo"]
    assert right < bad and nelbo[0]["tokens"] == 4 * 6 + 4 * 7
