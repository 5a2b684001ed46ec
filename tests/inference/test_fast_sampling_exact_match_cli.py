"""`tools/evaluate.py exact-match` takes the sampler's speed flags and they reach the sampler."""

import json
import os

import pytest

from tests.inference.tiny_model import write_hf_model_with_data
from tests.utils import REPO, run_script

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megatron_loopmdm.evaluation.reasoning import make_splits, write_jsonl

    root = tmp_path_factory.mktemp("tiny")
    valid = make_splits(["addition"], {"validation": 4}, levels=[1])["validation"]
    write_jsonl(valid, root / "valid.jsonl")
    return write_hf_model_with_data(root)["hf"], root / "valid.jsonl"


def _exact_match(data, out, *flags):
    model, jsonl = data
    command = ["exact-match", "--load", model, "--data", jsonl, "--num-loops", "2",
               "--gen-length", "8", "--block-length", "4", "--loop-schedule", "2",
               "--output-dir", out, *flags]  # fmt: skip
    result = run_script(REPO / "tools" / "evaluate.py", command, env=OFFLINE)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "exact_match.json").read_text())
    texts = [p["prediction"] for p in map(json.loads, open(out / "exact_match_predictions.jsonl"))]
    return report, texts


def test_speed_flags_reach_the_sampler(tmp_path, data):
    plain, plain_texts = _exact_match(data, tmp_path / "plain")
    checked, checked_texts = _exact_match(data, tmp_path / "step", "--cache", "prefix",
                                          "--cache-refresh", "step")  # fmt: skip
    every, every_texts = _exact_match(data, tmp_path / "every", "--cache", "dual",
                                      "--cache-refresh-every", "1")  # fmt: skip
    fast, _ = _exact_match(data, tmp_path / "fast", "--threshold", "1e-9", "--loop-warm-start")
    settings = (checked["cache"], checked["cache_refresh"], fast["threshold"])
    assert settings == ("prefix", "step", 1e-9)
    assert (every["cache"], every["cache_refresh_every"], plain["cache_refresh_every"]) == (
        "dual", 1, None)
    # Refilled at every step of a block, the dual cache is never stale: the uncached tokens at
    # the uncached cost (block refresh alone would evaluate fewer tokens).
    assert every_texts == plain_texts
    assert every["policy"][0]["model_flops"] == plain["policy"][0]["model_flops"]
    assert (plain["loop_warm_start"], fast["loop_warm_start"]) == (False, True)
    # A cache refreshed before every step gives the uncached tokens, at two passes per step.
    assert checked_texts == plain_texts
    [plain_cost], [checked_cost], [fast_cost] = plain["policy"], checked["policy"], fast["policy"]
    assert checked_cost["pass_loop_evaluations"] == 2 * plain_cost["pass_loop_evaluations"]
    # A threshold near 0 commits a whole block per step: 2 steps of 2 loops instead of 8.
    assert fast_cost["pass_loop_evaluations"] < plain_cost["pass_loop_evaluations"]


@pytest.mark.parametrize("flag", [["--cache", "prefix"], ["--loop-warm-start"]])
def test_speed_flags_without_a_gen_length_are_a_clear_error(tmp_path, data, flag):
    model, jsonl = data
    result = run_script(REPO / "tools" / "evaluate.py", ["exact-match", "--load", model,
                        "--data", jsonl, *flag, "--output-dir", tmp_path], env=OFFLINE)  # fmt: skip
    assert result.returncode == 1 and "need --gen-length" in result.stderr
