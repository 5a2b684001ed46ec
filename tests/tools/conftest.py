"""Session fixtures for the tool tests: a synthetic corpus and tokenizers made by the real tools."""

import pytest

from .helpers import read_jsonl, run_tool


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    result = run_tool("make_synthetic_corpus.py", "--output", path, "--num-docs", 240, "--seed", 7)
    assert result.returncode == 0, result.stderr
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("tok")
    result = run_tool(
        "train_tokenizer.py",
        "--input",
        corpus,
        "--output-dir",
        out,
        "--vocab-size",
        600,
        "--export-gpt2",
        "--export-tiktoken",
    )
    assert result.returncode == 0, result.stderr
    return str(out)


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory, corpus):
    spm = pytest.importorskip("sentencepiece")
    prefix = tmp_path_factory.mktemp("spm") / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(read_jsonl(corpus)),
        model_prefix=str(prefix),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_by_whitespace=True,
        user_defined_symbols=["<mask>"],
        pad_id=3,
        minloglevel=2,
    )
    return str(prefix) + ".model"
