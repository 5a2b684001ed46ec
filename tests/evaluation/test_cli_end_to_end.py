"""`tools/evaluate.py gsm8k` and `loopmdm-lm-eval` end to end, as a user runs them (offline)."""

import json
import os
import subprocess
import sys

import pytest

from tests.inference.tiny_model import write_hf_model_with_data
from tests.utils import REPO

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_hf_model_with_data(tmp_path_factory.mktemp("tiny"))


def test_gsm8k_command_scores_answers_after_the_hashes(tmp_path, model_dir):
    data = tmp_path / "gsm8k.jsonl"
    rows = [
        {"question": "the cat 3 sat on the mat. how many?", "answer": "it is 3.\n#### 3"},
        {"question": "the dog 2 ran far away. how many?", "answer": "so 2\n#### 2"},
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = subprocess.run(
        [sys.executable, "tools/evaluate.py", "gsm8k", "--load", model_dir["hf"], "--data", data,
         "--num-loops", "1", "2", "--gen-length", "8", "--steps", "8", "--block-length", "8",
         "--output-dir", tmp_path / "out"],
        capture_output=True, text=True, cwd=REPO, env=OFFLINE, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = [json.loads(line) for line in open(tmp_path / "out" / "gsm8k_predictions.jsonl")]
    assert len(predictions) == 2 * 2  # every question at every loop count
    table = (tmp_path / "out" / "gsm8k.csv").read_text().splitlines()
    assert len(table) == 3  # header and one row per loop count
    assert (tmp_path / "out" / "gsm8k.png").stat().st_size > 0


def test_lm_eval_command_line_runs_the_loopmdm_model_on_a_local_task(tmp_path, model_dir):
    pytest.importorskip("lm_eval")
    data = tmp_path / "data.jsonl"
    rows = [
        {"question": "the cat 3 sat on the", "choices": [" mat", " dog"], "answer": 0},
        {"question": "the dog 2 ran far", "choices": [" away.", " cat"], "answer": 0},
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(
        "task: loopmdm_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "megatron_loopmdm.evaluation.lm_eval_cli", "--model", "loopmdm",
         "--model_args", f"pretrained={model_dir['hf']},mc_samples=4,num_loops=2",
         "--tasks", "loopmdm_local", "--include_path", tasks, "--device", "cpu",
         "--output_path", tmp_path / "out"],
        capture_output=True, text=True, cwd=REPO, env=OFFLINE, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = list((tmp_path / "out").rglob("results_*.json"))
    accuracy = json.loads(path.read_text())["results"]["loopmdm_local"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0


def test_exact_match_command_scores_per_loop_count_and_difficulty(tmp_path, model_dir):
    from megatron_loopmdm.evaluation.reasoning import make_splits, write_jsonl

    test = make_splits(["addition", "variable_lookup"], {"test": 2}, levels=[1, 2])["test"]
    write_jsonl(test, tmp_path / "test.jsonl")
    command = [sys.executable, "tools/evaluate.py", "exact-match", "--load", model_dir["hf"],
               "--data", tmp_path / "test.jsonl", "--num-loops", "1", "3", "--nelbo-samples", "2"]
    result = subprocess.run([*command, "--output-dir", tmp_path / "out"], capture_output=True,
                            text=True, cwd=REPO, env=OFFLINE, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "exact_match.json").read_text())
    keys = {(r["num_loops"], r["task"], r["difficulty"]) for r in report["rows"]}
    assert (3, "addition", "2") in keys and (1, "all", "1") in keys and (3, "all", "all") in keys
    predictions = [json.loads(line) for line in open(tmp_path / "out" /
                                                      "exact_match_predictions.jsonl")]  # fmt: skip
    assert len(predictions) == 2 * len(test)
    for row in report["rows"]:
        mine = [p for p in predictions if p["num_loops"] == row["num_loops"]
                and row["task"] in ("all", p["task"])
                and row["difficulty"] in ("all", str(p["difficulty"]))]  # fmt: skip
        assert row["total"] == len(mine) and row["correct"] == sum(p["correct"] for p in mine)
    assert [r["num_loops"] for r in report["nelbo"]] == [1, 3]
    assert (tmp_path / "out" / "exact_match_by_difficulty.png").stat().st_size > 0
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1="}\n')
    bad = subprocess.run([*command[:6], tmp_path / "bad.jsonl"], capture_output=True, text=True,
                         cwd=REPO, env=OFFLINE, timeout=300)  # fmt: skip
    assert bad.returncode == 1 and "bad.jsonl:1: missing field(s) answer" in bad.stderr
