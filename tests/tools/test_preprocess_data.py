"""tools/preprocess_data.py and tools/merge_datasets.py, run as real subprocesses."""

import gzip
import json
import os
import signal
import subprocess
import time

import pytest

from .helpers import (
    hf_args,
    read_documents,
    read_jsonl,
    run_tool,
    run_tools,
    tool_cmd,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "extra": 1}) + "\n")


def _decode_all(tokenizer, docs, eod):
    out = []
    for ids in docs:
        assert ids[-1] == eod, "every document ends with the EOD id (--append-eod)"
        out.append(tokenizer.detokenize(ids[:-1]))
    return out


def _same_files(a, b):
    for suffix in (".bin", ".idx"):
        with open(a + suffix, "rb") as fa, open(b + suffix, "rb") as fb:
            assert fa.read() == fb.read(), f"{a}{suffix} != {b}{suffix}"


def test_every_input_format_round_trips(tmp_path, corpus, tokenizer_dir):
    zstandard = pytest.importorskip("zstandard")
    pq = pytest.importorskip("pyarrow.parquet")
    from megatron_loopmdm.data.tokenizers import build_tokenizer

    import datasets
    import pyarrow

    texts = read_jsonl(corpus)[:120]
    parts = [texts[0:20], texts[20:40], texts[40:60], texts[60:80], texts[80:90], texts[90:110]]
    inputs = tmp_path / "in"
    inputs.mkdir()
    _write_jsonl(inputs / "a.jsonl", parts[0])
    with gzip.open(inputs / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in parts[1])
    raw = "".join(json.dumps({"text": t}) + "\n" for t in parts[2]).encode()
    (inputs / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(
        pyarrow.table({"text": parts[3], "id": list(range(20))}),
        inputs / "d.parquet",
        row_group_size=7,
    )
    text_dir = tmp_path / "txt"
    text_dir.mkdir()
    for i, t in enumerate(parts[4]):
        (text_dir / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
    (tmp_path / "blocks.txt").write_text("\n\n\n".join(parts[5]) + "\n", encoding="utf-8")
    datasets.Dataset.from_dict({"text": texts[110:120]}).save_to_disk(str(tmp_path / "hf"))

    common = [*hf_args(tokenizer_dir), "--append-eod", "--batch-size", 8]
    out = tmp_path / "out"
    results = run_tools(
        [
            (
                "preprocess_data.py",
                [
                    "--input",
                    inputs / "a.jsonl",
                    inputs / "b.jsonl.gz",
                    inputs / "c.jsonl.zst",
                    inputs / "d.parquet",
                    text_dir,
                    "--output-prefix",
                    out / "files",
                    *common,
                ],
                None,
            ),
            (
                "preprocess_data.py",
                [
                    "--input",
                    tmp_path / "blocks.txt",
                    "--text-mode",
                    "blank-line",
                    "--output-prefix",
                    out / "blocks",
                    *common,
                ],
                None,
            ),
            (
                "preprocess_data.py",
                ["--hf-dataset", tmp_path / "hf", "--output-prefix", out / "hf", *common],
                None,
            ),
        ]
    )
    for r in results:
        assert r.returncode == 0, r.stderr
    assert "documents: 90" in results[0].stdout
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    got = {
        name: _decode_all(
            tokenizer, read_documents(str(out / f"{name}_text_document")), tokenizer.eod
        )
        for name in ("files", "blocks", "hf")
    }
    assert got["files"] == texts[:90]
    assert got["blocks"] == parts[5]
    assert got["hf"] == texts[110:120]


def _megatron_lm_reference(prefix, jsonl, tokenizer_dir):
    """What Megatron-LM's preprocess_data writes for JSON lines with --append-eod and a HF
    tokenizer: AutoTokenizer ids per document, EOD appended, one add_document per document, dtype
    by DType.optimal_dtype(len(tokenizer))."""
    import megatron_loopmdm  # noqa: F401

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(len(hf)))
    for text in read_jsonl(jsonl):
        ids = hf(text).input_ids + [hf.eos_token_id]
        builder.add_document(ids, [len(ids)])
    builder.finalize(prefix + ".idx")


def test_tokenizer_types_round_trip_and_match_megatron_lm_writer(
    tmp_path, corpus, tokenizer_dir, sentencepiece_model
):
    pytest.importorskip("tiktoken")
    from megatron_loopmdm.data.tokenizers import build_tokenizer

    tok_args = {
        "hf": hf_args(tokenizer_dir),
        "gpt2": [
            "--tokenizer-type",
            "GPT2BPETokenizer",
            "--vocab-file",
            f"{tokenizer_dir}/vocab.json",
            "--merge-file",
            f"{tokenizer_dir}/merges.txt",
        ],
        "sp": [
            "--tokenizer-type",
            "GPTSentencePieceTokenizer",
            "--tokenizer-model",
            sentencepiece_model,
        ],
        "tiktoken": [
            "--tokenizer-type",
            "TikTokenizer",
            "--tokenizer-model",
            f"{tokenizer_dir}/tokenizer.tiktoken",
            "--tiktoken-pattern",
            "gpt2",
        ],
    }
    results = run_tools(
        [
            (
                "preprocess_data.py",
                [
                    "--input",
                    corpus,
                    "--output-prefix",
                    tmp_path / name,
                    "--append-eod",
                    "--workers",
                    1 + (name in ("sp", "gpt2")),
                    *args,
                ],
                None,
            )
            for name, args in tok_args.items()
        ]
    )
    for r in results:
        assert r.returncode == 0, r.stderr
    texts = read_jsonl(corpus)
    tokenizers = {
        "hf": build_tokenizer("HuggingFaceTokenizer", tokenizer_dir),
        "gpt2": build_tokenizer(
            "GPT2BPETokenizer",
            vocab_file=f"{tokenizer_dir}/vocab.json",
            merge_file=f"{tokenizer_dir}/merges.txt",
        ),
        "sp": build_tokenizer("GPTSentencePieceTokenizer", sentencepiece_model),
        "tiktoken": build_tokenizer(
            "TikTokenizer", f"{tokenizer_dir}/tokenizer.tiktoken", tiktoken_pattern="gpt2"
        ),
    }
    for name, tokenizer in tokenizers.items():
        docs = read_documents(str(tmp_path / f"{name}_text_document"))
        assert _decode_all(tokenizer, docs, tokenizer.eod) == texts, name
    _megatron_lm_reference(str(tmp_path / "reference"), corpus, tokenizer_dir)
    _same_files(str(tmp_path / "hf_text_document"), str(tmp_path / "reference"))
    # Same vocabulary through vocab.json/merges.txt, and 2 workers instead of 1: same files.
    _same_files(str(tmp_path / "hf_text_document"), str(tmp_path / "gpt2_text_document"))


def test_workers_shards_and_partitions_equal_a_single_run(tmp_path, corpus, tokenizer_dir):
    lines = open(corpus, encoding="utf-8").readlines()
    inputs = [tmp_path / "p1.jsonl", tmp_path / "p2.jsonl.gz", tmp_path / "p3.jsonl"]
    inputs[0].write_text("".join(lines[:100]), encoding="utf-8")
    with gzip.open(inputs[1], "wt", encoding="utf-8") as f:
        f.write("".join(lines[100:130]))
    inputs[2].write_text("".join(lines[130:]), encoding="utf-8")
    common = [
        "--input",
        *inputs,
        *hf_args(tokenizer_dir),
        "--append-eod",
        "--batch-size",
        7,
        "--json-keys",
        "text",
        "kind",
    ]
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "3"}
    results = run_tools(
        [
            ("preprocess_data.py", [*common, "--output-prefix", tmp_path / "single"], None),
            (
                "preprocess_data.py",
                [*common, "--output-prefix", tmp_path / "part", "--partitions", 2, "--workers", 2],
                None,
            ),
            (
                "preprocess_data.py",
                [
                    *common,
                    "--output-prefix",
                    tmp_path / "sh",
                    "--shard-index",
                    0,
                    "--num-shards",
                    3,
                ],
                None,
            ),
            ("preprocess_data.py", [*common, "--output-prefix", tmp_path / "sh"], env),
            (
                "preprocess_data.py",
                [
                    *common,
                    "--output-prefix",
                    tmp_path / "sh",
                    "--shard-index",
                    2,
                    "--num-shards",
                    3,
                ],
                None,
            ),
        ]
    )
    for r in results:
        assert r.returncode == 0, r.stderr
    counts = [int(r.stdout.split("documents: ")[1].split()[0]) for r in results[2:]]
    assert sum(counts) == len(lines) and min(counts) > 0
    merged = run_tool(
        "merge_datasets.py",
        "--input",
        str(tmp_path / "sh-shard*_text_document"),
        "--output-prefix",
        tmp_path / "merged_text_document",
    )
    assert merged.returncode == 0, merged.stderr
    _same_files(str(tmp_path / "single_text_document"), str(tmp_path / "merged_text_document"))
    for key in ("text", "kind"):
        _same_files(
            str(tmp_path / f"single_{key}_document"), str(tmp_path / f"part_{key}_document")
        )
    assert not list(tmp_path.glob("*.partial*")) and not list(tmp_path.glob("*.tmp-*"))

    shard = str(tmp_path / "sh-shard00001-of-00003_text_document")
    with open(shard + ".idx", "rb") as f:
        idx = f.read()
    with open(str(tmp_path / "corrupt.idx"), "wb") as f:
        f.write(idx[:-8])
    os.link(shard + ".bin", tmp_path / "corrupt.bin")
    incomplete, corrupt = run_tools(
        [
            (
                "merge_datasets.py",
                [
                    "--input",
                    tmp_path / "sh-shard00000-of-00003_text_document",
                    tmp_path / "sh-shard00002-of-00003_text_document",
                    "--output-prefix",
                    tmp_path / "bad",
                ],
                None,
            ),
            (
                "merge_datasets.py",
                ["--input", tmp_path / "corrupt", "--output-prefix", tmp_path / "bad"],
                None,
            ),
        ]
    )
    assert incomplete.returncode == 2 and "Missing shard(s) [1] of 3" in incomplete.stderr
    assert corrupt.returncode == 2 and "truncated or corrupt" in corrupt.stderr
    assert not list(tmp_path.glob("bad*"))


BAD_CASES = {
    "malformed JSON": b'{"text": "broken\n',
    "missing key": b'{"body": "no text here"}\n',
    "non-UTF-8 bytes": b'{"text": "caf\xe9"}\n',
    "empty document": b'{"text": ""}\n',
}


def test_bad_input_is_reported_with_file_line_and_exit_code(tmp_path, tokenizer_dir):
    good = [json.dumps({"text": f"Document number {i}."}).encode() + b"\n" for i in range(4)]
    commands, files = [], []
    for n, (reason, line) in enumerate(BAD_CASES.items()):
        path = tmp_path / f"bad{n}.jsonl"
        path.write_bytes(b"".join(good[:2]) + line + b"".join(good[2:]))
        files.append(path)
        commands.append(
            (
                "preprocess_data.py",
                ["--input", path, "--output-prefix", tmp_path / f"out{n}", *hf_args(tokenizer_dir)],
                None,
            )
        )
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"".join(good[:1] + list(BAD_CASES.values()) + good[1:]) + b"\n")
    commands.append(
        (
            "preprocess_data.py",
            [
                "--input",
                mixed,
                "--output-prefix",
                tmp_path / "skip",
                "--on-error",
                "skip",
                "--append-eod",
                *hf_args(tokenizer_dir),
            ],
            None,
        )
    )
    commands.append(
        (
            "preprocess_data.py",
            [
                "--input",
                tmp_path / "missing.jsonl",
                "--output-prefix",
                tmp_path / "m",
                *hf_args(tokenizer_dir),
            ],
            None,
        )
    )
    commands.append(
        (
            "preprocess_data.py",
            [
                "--input",
                mixed,
                "--output-prefix",
                tmp_path / "m",
                *hf_args(tmp_path / "no_tokenizer"),
            ],
            None,
        )
    )
    results = run_tools(commands)
    for n, ((reason, _), r) in enumerate(zip(BAD_CASES.items(), results)):
        assert r.returncode == 2, (reason, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"bad{n}.jsonl:3: {reason}" in r.stderr, r.stderr
        assert "--on-error skip" in r.stderr and "Traceback" not in r.stderr
        assert not list(tmp_path.glob(f"out{n}*")), "a failed run leaves no output"
    skip = results[4]
    assert skip.returncode == 0, skip.stderr
    for reason in BAD_CASES:
        assert f"  {reason}: 1" in skip.stdout, skip.stdout
    assert "mixed.jsonl:3: missing key" in skip.stdout and "blank lines ignored: 1" in skip.stdout
    assert "documents: 4" in skip.stdout
    for r, message in zip(results[5:], ("Input not found", "tokenizer directory not found")):
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def _wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_interrupted_runs_leave_no_complete_looking_output(tmp_path, tokenizer_dir, corpus):
    """Inputs are FIFOs fed by hand, so each run is certainly mid-way when it is signalled."""
    import megatron_loopmdm  # noqa: F401

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    runs = {}
    for sig in (signal.SIGKILL, signal.SIGTERM):
        work = tmp_path / sig.name
        work.mkdir()
        os.mkfifo(work / "input.jsonl")
        proc = subprocess.Popen(
            tool_cmd(
                "preprocess_data.py",
                "--input",
                work / "input.jsonl",
                "--output-prefix",
                work / "out",
                *hf_args(tokenizer_dir),
                "--batch-size",
                1,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
        )
        runs[sig] = (work, proc)
    head = open(corpus, "rb").read()[:5000].rsplit(b"\n", 1)[0] + b"\n"
    for sig, (work, proc) in runs.items():
        with open(work / "input.jsonl", "wb") as writer:
            writer.write(head)
            writer.flush()
            # The FIFO stays open, so the run cannot finish before the signal.
            _wait_for(lambda: list(work.glob("out_text_document.tmp-*.bin")))
            time.sleep(0.5)
            proc.send_signal(sig)
            proc.wait(timeout=60)
        assert not IndexedDataset.exists(str(work / "out_text_document"))
        assert not os.path.exists(str(work / "out_text_document.idx"))
    work, proc = runs[signal.SIGTERM]
    assert proc.returncode == 130
    assert [p.name for p in work.iterdir()] == ["input.jsonl"], "SIGTERM removes its temp files"
