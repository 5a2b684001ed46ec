"""The synthetic corpus: seeded, sized, varied, and GSM8K-style answers that are correct."""

import json
import re

from megatron_loopmdm.data.synthetic import generate_documents, write_synthetic_corpus

from .helpers import run_tool


def test_same_seed_same_bytes_and_cli(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    result = run_tool("make_synthetic_corpus.py", "--output", a, "--num-docs", 50, "--seed", 3)
    assert result.returncode == 0, result.stderr
    write_synthetic_corpus(str(b), seed=3, num_docs=50)
    write_synthetic_corpus(str(c), seed=4, num_docs=50)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert len(a.read_text().splitlines()) == 50


def test_size_target_and_no_temp_files(tmp_path):
    out = tmp_path / "sized.jsonl"
    write_synthetic_corpus(str(out), seed=1, size_bytes=100_000)
    assert 100_000 <= out.stat().st_size < 101_000
    assert [p.name for p in tmp_path.iterdir()] == ["sized.jsonl"]
    result = run_tool("make_synthetic_corpus.py", "--output", tmp_path / "x.jsonl")
    assert result.returncode == 2 and "--num-docs" in result.stderr


def test_documents_are_varied_and_answers_are_right():
    docs = list(generate_documents(seed=11, num_docs=600))
    kinds = {d["kind"] for d in docs}
    assert kinds == {"story", "fact", "math"}
    assert len({d["text"] for d in docs}) > 590
    for doc in docs:
        assert "\n\n" not in doc["text"] and doc["text"].strip() == doc["text"]
        if doc["kind"] != "math":
            continue
        answer = re.search(r"\n#### (-?\d+)$", doc["text"])
        assert answer, doc["text"]
        # The last worked equation's result is the answer, and it checks out arithmetically.
        lhs, rhs = re.findall(r"([\d +*-]+?) = (\d+)", doc["text"])[-1]
        assert int(rhs) == int(answer.group(1)) == eval(lhs)  # noqa: S307 (digits and + - * only)
        json.dumps(doc)
