"""The numpy `.bin`/`.idx` writer against megatron-core's own `IndexedDatasetBuilder`, and the
preprocessing path's start-up without megatron-core."""

import json
import os
import subprocess
import sys

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.data.indexed import DTYPE_CODES, IndexedWriter, optimal_dtype

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_dtype_codes_and_rule_are_megatron_cores():
    assert {c: numpy.dtype(d) for c, d in DTYPE_CODES.items()} == {
        DType.code_from_dtype(d): numpy.dtype(d) for d in DTYPE_CODES.values()
    }
    for vocab_size in (None, 1, 259, 65499, 65500, 65536, 131072):
        assert optimal_dtype(vocab_size) == DType.optimal_dtype(vocab_size)


@pytest.mark.parametrize("dtype", [numpy.uint16, numpy.int32, numpy.uint8])
def test_writer_files_are_byte_identical_to_megatron_cores_builder(tmp_path, dtype):
    rng = numpy.random.default_rng(0)
    high = min(numpy.iinfo(dtype).max, 70000)
    batches = []  # each: documents of 1..3 sentences of 1..40 tokens; one empty batch
    for num_docs in (5, 0, 1, 17):
        lengths = [[int(n) for n in rng.integers(1, 40, rng.integers(1, 4))]
                   for _ in range(num_docs)]  # fmt: skip
        tokens = rng.integers(0, high, sum(map(sum, lengths))).astype(numpy.int64)
        batches.append((tokens, lengths))

    ours = IndexedWriter(str(tmp_path / "ours.bin"), dtype)
    theirs = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for tokens, lengths in batches:
        ours.add_documents(tokens, lengths)
        offset = 0
        for doc in lengths:
            theirs.add_document(tokens[offset : offset + sum(doc)], doc)
            offset += sum(doc)
    ours.add_document(numpy.array([7, 8, 9]), [2, 1])
    theirs.add_document(numpy.array([7, 8, 9]), [2, 1])
    ours.finalize(str(tmp_path / "ours.idx"))
    theirs.finalize(str(tmp_path / "theirs.idx"))

    for suffix in (".bin", ".idx"):
        ours_bytes = (tmp_path / f"ours{suffix}").read_bytes()
        assert ours_bytes == (tmp_path / f"theirs{suffix}").read_bytes()
    dataset = IndexedDataset(str(tmp_path / "ours"))
    assert len(dataset) == sum(len(doc) for _, lengths in batches for doc in lengths) + 2
    assert dataset[len(dataset) - 1].tolist() == [9]


def test_preprocessing_runs_without_importing_megatron_core(tmp_path):
    """Start-up is seconds shorter without megatron-core; its files are still megatron-core's."""
    from megatron_loopmdm.data.tokenizer_training import train_bpe_tokenizer

    texts = [f"document {i}: " + "the quick brown fox " * (i % 7 + 1) for i in range(200)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = train_bpe_tokenizer(texts, str(tmp_path / "tok"), vocab_size=300, min_frequency=1)
    out_prefix = str(tmp_path / "out")
    script = (
        "import sys\n"
        "from megatron_loopmdm.data.preprocess import PreprocessConfig, preprocess\n"
        f"preprocess(PreprocessConfig(input=[{str(corpus)!r}], output_prefix={out_prefix!r},"
        f" tokenizer_type='HuggingFaceTokenizer', tokenizer_model={tok!r}, append_eod=True,"
        " log_interval=0))\n"
        "print('megatron.core' in sys.modules)\n"  # (the package's triton stand-in is no import)
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=REPO, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert len(dataset) == len(texts)
    from megatron_loopmdm.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("HuggingFaceTokenizer", tok)
    assert dataset[3].tolist() == tokenizer.tokenize(texts[3]) + [tokenizer.eod]


def test_merge_is_byte_identical_to_megatron_cores_add_index(tmp_path):
    from megatron_loopmdm.data.merge import merge_indexed_datasets

    rng = numpy.random.default_rng(1)
    prefixes = []
    for i, num_docs in enumerate((4, 0, 9)):
        writer = IndexedWriter(str(tmp_path / f"part{i}.bin"), numpy.uint16)
        for _ in range(num_docs):
            doc = [int(n) for n in rng.integers(1, 30, rng.integers(1, 4))]
            writer.add_document(rng.integers(0, 60000, sum(doc)), doc)
        writer.finalize(str(tmp_path / f"part{i}.idx"))
        prefixes.append(str(tmp_path / f"part{i}"))

    merge_indexed_datasets(prefixes, str(tmp_path / "ours"))
    theirs = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=numpy.uint16)
    for prefix in prefixes:
        theirs.add_index(prefix)
    theirs.finalize(str(tmp_path / "theirs.idx"))

    for suffix in (".bin", ".idx"):
        ours_bytes = (tmp_path / f"ours{suffix}").read_bytes()
        assert ours_bytes == (tmp_path / f"theirs{suffix}").read_bytes()
    assert len(IndexedDataset(str(tmp_path / "ours"))) == len(IndexedDataset(prefixes[0])) + len(
        IndexedDataset(prefixes[2])
    )
    assert not list(tmp_path.glob("*.tmp-*"))


def test_merge_refuses_a_multimodal_index_instead_of_dropping_its_modes(tmp_path):
    from megatron_loopmdm.data.indexed import IndexedDatasetError
    from megatron_loopmdm.data.merge import merge_indexed_datasets

    builder = IndexedDatasetBuilder(str(tmp_path / "mm.bin"), dtype=numpy.uint16, multimodal=True)
    builder.add_document(torch.tensor([1, 2, 3]), [3], modes=[1])
    builder.finalize(str(tmp_path / "mm.idx"))
    with pytest.raises(IndexedDatasetError, match="multimodal"):
        merge_indexed_datasets([str(tmp_path / "mm")], str(tmp_path / "out"))
    assert not list(tmp_path.glob("out*"))
