"""Faults of tools/preprocess_data.py: repeated 2-worker runs, signals at random moments, empty
input, two runs on one prefix, a stalled input, and training refusing ids that do not fit."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from .helpers import REPO, hf_args, run_tools, tool_cmd

REPEAT_SCRIPT = """
import sys
from megatron_loopmdm.data.preprocess import PreprocessConfig, preprocess
tok, inp, out, runs = sys.argv[1:5]
for i in range(int(runs)):
    s = preprocess(PreprocessConfig(
        output_prefix=f"{out}/run{i}", input=[inp], tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=tok, workers=2, batch_size=3, log_interval=0, append_eod=True))
    print(s.documents, s.tokens, flush=True)
"""


def _files(prefix):
    return [open(prefix + s, "rb").read() for s in (".bin", ".idx")]


def test_two_worker_path_many_times_never_hangs_and_keeps_stderr_clean(
    tmp_path, corpus, tokenizer_dir
):
    runs = 20
    proc = subprocess.run(
        [sys.executable, "-c", REPEAT_SCRIPT, tokenizer_dir, corpus, tmp_path, str(runs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    assert len(set(proc.stdout.splitlines())) == 1 and len(proc.stdout.splitlines()) == runs
    first = _files(str(tmp_path / "run0_text_document"))
    for i in range(1, runs):
        assert _files(str(tmp_path / f"run{i}_text_document")) == first


def test_signals_at_random_moments_never_hang_nor_touch_a_good_output(
    tmp_path, corpus, tokenizer_dir
):
    big = tmp_path / "big.jsonl"
    big.write_bytes(open(corpus, "rb").read() * 10)
    args = ["--input", big, *hf_args(tokenizer_dir), "--append-eod", "--batch-size", 16]
    args += ["--workers", 2, "--log-interval", 0]
    (good,) = run_tools(
        [("preprocess_data.py", [*args, "--output-prefix", tmp_path / "ref"], None)]
    )
    assert good.returncode == 0, good.stderr
    reference = _files(str(tmp_path / "ref_text_document"))
    rng = random.Random(0)
    procs = []
    for n in range(6):
        work = tmp_path / f"w{n}"
        work.mkdir()
        for suffix in (".bin", ".idx"):
            os.link(
                str(tmp_path / "ref_text_document") + suffix, work / f"out_text_document{suffix}"
            )
        cmd = tool_cmd("preprocess_data.py", *args, "--output-prefix", work / "out")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO
        )
        procs.append((work, proc, rng.uniform(0.5, 12.0), (signal.SIGINT, signal.SIGTERM)[n % 2]))
    start = time.time()
    for work, proc, delay, sig in sorted(procs, key=lambda p: p[2]):
        time.sleep(max(0.0, start + delay - time.time()))
        proc.send_signal(sig)
    for work, proc, delay, sig in procs:
        err = proc.communicate(timeout=120)[1]  # a hang fails here
        # 130: interrupted (also while importing); 0: it finished first.
        assert proc.returncode in (0, 130), (sig, delay, err)
        if proc.returncode == 130:
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert _files(str(work / "out_text_document")) == reference, "the output survives"
        leftovers = sorted(p.name for p in work.iterdir() if ".tmp-" in p.name or ".lock" in p.name)
        assert leftovers == [], (sig, delay, proc.returncode, leftovers)


def test_empty_input_a_second_run_and_a_stalled_input_are_errors(tmp_path, corpus, tokenizer_dir):
    from megatron_loopmdm.data.indexed import PrefixLock

    (tmp_path / "empty.jsonl").write_bytes(b"")
    (ok,) = run_tools(
        [
            (
                "preprocess_data.py",
                ["--input", corpus, "--output-prefix", tmp_path / "a", *hf_args(tokenizer_dir)],
                None,
            )
        ]
    )
    assert ok.returncode == 0, ok.stderr
    good = _files(str(tmp_path / "a_text_document"))
    os.mkfifo(tmp_path / "stalled.jsonl")  # nobody ever writes to it
    lock = PrefixLock(str(tmp_path / "b"))  # a run in progress on prefix b
    try:
        empty, second, stalled = run_tools(
            [
                (
                    "preprocess_data.py",
                    [
                        "--input",
                        tmp_path / "empty.jsonl",
                        "--output-prefix",
                        tmp_path / "a",
                        *hf_args(tokenizer_dir),
                    ],
                    None,
                ),
                (
                    "preprocess_data.py",
                    ["--input", corpus, "--output-prefix", tmp_path / "b", *hf_args(tokenizer_dir)],
                    None,
                ),
                (
                    "preprocess_data.py",
                    [
                        "--input",
                        tmp_path / "stalled.jsonl",
                        "--output-prefix",
                        tmp_path / "c",
                        "--stall-timeout",
                        3,
                        *hf_args(tokenizer_dir),
                    ],
                    None,
                ),
            ]
        )
    finally:
        lock.release()
    for r, message in (
        (empty, "no documents to write"),
        (second, f"Another preprocessing run (pid {os.getpid()})"),
        (stalled, "No progress for 3 s"),
    ):
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "empty.jsonl" in empty.stderr
    assert _files(str(tmp_path / "a_text_document")) == good, "the old output is kept"
    assert not list(tmp_path.glob("b_*")) and not list(tmp_path.glob("c_*"))


def test_training_refuses_ids_outside_its_vocabulary_naming_the_sidecar(
    tmp_path, corpus, tokenizer_dir, sentencepiece_model
):
    from megatron_loopmdm.data import DataConfig, build_train_valid_test_datasets
    from megatron_loopmdm.data.indexed import IndexedDatasetError
    from megatron_loopmdm.data.preprocess import PreprocessConfig, preprocess
    from megatron_loopmdm.data.tokenizers import build_tokenizer

    preprocess(
        PreprocessConfig(
            output_prefix=str(tmp_path / "d"),
            input=[corpus],
            append_eod=True,
            log_interval=0,
            tokenizer_type="HuggingFaceTokenizer",
            tokenizer_model=tokenizer_dir,
        )
    )
    prefix = str(tmp_path / "d_text_document")
    meta = json.loads(open(prefix + ".meta.json").read())
    small = build_tokenizer("GPTSentencePieceTokenizer", sentencepiece_model)
    assert meta["vocab_size"] == 600 and meta["max_token_id"] >= small.vocab_size
    config = DataConfig(seq_length=32, data_path=[prefix], split="1", path_to_cache=str(tmp_path))
    with pytest.raises(IndexedDatasetError, match=r"d_text_document\.meta\.json: the data's larg"):
        build_train_valid_test_datasets(config, small, [8, 0, 0])
    right = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    train, _, _ = build_train_valid_test_datasets(config, right, [8, 0, 0])
    assert int(train[0]["tokens"].max()) <= meta["max_token_id"]
