"""The training-side data: config validation, indexed-dataset checks, the masked-diffusion
dataset (no shift, blends, splits, per-document ids) and the resumable sampler."""

import os

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.data import (
    DataConfig,
    IndexedDatasetError,
    PretrainingSampler,
    build_data_loader,
    build_train_valid_test_datasets,
    check_indexed_dataset,
    document_attention_mask,
)
from megatron_loopmdm.data.indexed import check_vocab
from megatron_loopmdm.data.tokenizer_training import train_bpe_tokenizer
from megatron_loopmdm.data.tokenizers import build_tokenizer

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

SEQ = 32


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_loopmdm.data.synthetic import generate_documents

    out = str(tmp_path_factory.mktemp("tok"))
    train_bpe_tokenizer((d["text"] for d in generate_documents(1, 300)), out, vocab_size=400)
    return build_tokenizer("HuggingFaceTokenizer", out)


def _write(prefix, docs, vocab_size=400):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    for doc in docs:
        builder.add_document(numpy.asarray(doc), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def _docs(rng, num_docs, low, high, eod):
    """Documents of random ids in [low, high), each ending in EOD."""
    return [list(rng.integers(low, high, rng.integers(3, 40))) + [eod] for _ in range(num_docs)]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("data")
    rng = numpy.random.default_rng(0)
    eod = tokenizer.eod
    a = _write(str(root / "a"), _docs(rng, 400, 10, 200, eod))
    b = _write(str(root / "b"), _docs(rng, 300, 200, 390, eod))
    return root, a, b


def test_data_config_validation():
    assert DataConfig(seq_length=8, data_path=["0.7", "a", "0.3", "b"]).blend == (
        ["a", "b"],
        [0.7, 0.3],
    )
    assert DataConfig(seq_length=8, data_path=["a", "b"]).blend == (["a", "b"], None)
    cases = [
        (dict(seq_length=0, data_path=["a"]), "seq_length"),
        (dict(seq_length=8), "No data"),
        (dict(seq_length=8, data_path=["a"], train_data_path=["b"]), "not both"),
        (dict(seq_length=8, data_path=["0.7", "a", "b"]), "weight prefix"),
        (dict(seq_length=8, data_path=["-1", "a"]), "positive"),
        (dict(seq_length=8, data_path=["a"], split="1,x"), "--split"),
        (dict(seq_length=8, data_path=["a"], split="0,0,0"), "--split"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            DataConfig(**kwargs)


def test_bad_datasets_give_clear_errors(tmp_path, corpora, tokenizer):
    root, a, _ = corpora
    with pytest.raises(FileNotFoundError, match="missing .*nope.bin"):
        check_indexed_dataset(str(tmp_path / "nope"))
    for name, mutate, message in [
        ("trunc", lambda idx, bin_: (idx[:-8], bin_), "truncated or corrupt"),
        ("header", lambda idx, bin_: (b"XXXX" + idx[4:], bin_), "bad header"),
        ("short_bin", lambda idx, bin_: (idx, bin_[:-2]), "does not belong together"),
    ]:
        idx, bin_ = mutate(open(a + ".idx", "rb").read(), open(a + ".bin", "rb").read())
        open(tmp_path / f"{name}.idx", "wb").write(idx)
        open(tmp_path / f"{name}.bin", "wb").write(bin_)
        with pytest.raises(IndexedDatasetError, match=message):
            check_indexed_dataset(str(tmp_path / name))
    wide = _write(str(tmp_path / "wide"), [[1, 2, 3]], vocab_size=100_000)
    with pytest.raises(IndexedDatasetError, match="different tokenizer"):
        check_vocab(check_indexed_dataset(wide), tokenizer.vocab_size)
    big_ids = _write(str(tmp_path / "big"), [[1, 2, 1000]])
    with pytest.raises(IndexedDatasetError, match="outside the"):
        build_train_valid_test_datasets(
            DataConfig(seq_length=SEQ, data_path=[big_ids], split="1"), tokenizer, [1, 0, 0]
        )


def _build(root, tokenizer, sizes, **kwargs):
    kwargs.setdefault("path_to_cache", str(root / "cache"))
    return build_train_valid_test_datasets(DataConfig(seq_length=SEQ, **kwargs), tokenizer, sizes)


def test_samples_tile_the_document_stream_without_shift(corpora, tokenizer):
    root, a, _ = corpora
    train, valid, test = _build(
        root,
        tokenizer,
        [None, None, None],
        data_path=[a],
        split="90,8,2",
        per_document_attention=True,
    )
    inverse = numpy.argsort(train.shuffle_index)
    stream = numpy.concatenate([train.dataset[int(d)] for d in train.document_index])
    samples = [train[int(i)] for i in inverse]
    tokens = torch.cat([s["tokens"] for s in samples]).numpy()
    assert all(s["tokens"].shape == (SEQ,) for s in samples)
    assert numpy.array_equal(tokens, stream[: len(tokens)]), "samples tile the stream, no shift"
    # No sample crosses a split boundary; splits are disjoint document ranges.
    splits = [set(ds.indices.tolist()) for ds in (train, valid, test)]
    assert not (splits[0] & splits[1]) and not (splits[1] & splits[2])
    for ds, allowed in zip((train, valid, test), splits):
        for i in range(len(ds)):
            assert set(ds.sample_document_indices(i).tolist()) <= allowed
    # Per-document ids change right after each EOD, and positions restart there.
    for s in samples[:50]:
        ids, eod_at = s["document_ids"], (s["tokens"] == tokenizer.eod).nonzero().flatten()
        for p in eod_at.tolist():
            if p + 1 < SEQ:
                assert ids[p + 1] == ids[p] + 1 and s["position_ids"][p + 1] == 0
        assert int(ids.max()) == len([p for p in eod_at.tolist() if p + 1 < SEQ])
    mask = document_attention_mask(torch.stack([s["document_ids"] for s in samples[:2]]))
    assert mask.shape == (2, 1, SEQ, SEQ) and mask.dtype == torch.bool


def test_blend_proportions(corpora, tokenizer):
    root, a, b = corpora
    train, _, _ = _build(
        root, tokenizer, [2000, 10, 0], data_path=["0.7", a, "0.3", b], split="98,2,0"
    )
    assert len(train) == 2000
    from_a = sum(int(train[i]["tokens"][:2].max() < 200) for i in range(len(train)))
    assert abs(from_a / len(train) - 0.7) < 0.03


def test_restart_at_consumed_samples_gives_the_same_samples(corpora, tokenizer):
    root, a, b = corpora
    kwargs = dict(train_data_path=["0.5", a, "0.5", b], valid_data_path=[b])
    first, _, _ = _build(root, tokenizer, [400, 20, None], **kwargs)
    rebuilt, _, _ = _build(root, tokenizer, [400, 20, None], **kwargs)  # from the cache
    assert os.listdir(root / "cache")
    full = list(build_data_loader(first, 0, 4, 1, 2))
    resumed = list(build_data_loader(rebuilt, 96, 4, 1, 2))
    assert len(full) == len(resumed) + 12
    for x, y in zip(full[12:], resumed):
        assert torch.equal(x["tokens"], y["tokens"])
        assert torch.equal(x["sample_index"], y["sample_index"])
    # Rank 1 of 2 with micro batch 4 takes samples 4..7 of each global micro batch of 8; the
    # noise is keyed by this blend-level index.
    assert full[0]["sample_index"].tolist() == [4, 5, 6, 7]
    assert resumed[0]["sample_index"].tolist() == [100, 101, 102, 103]


def test_sampler_partitions_global_batches():
    ranks = [list(PretrainingSampler(22, 4, 3, r, 2)) for r in range(2)]
    assert ranks[0][0] == [4, 5, 6] and ranks[1][0] == [7, 8, 9]
    assert len(ranks[0]) == 3  # 18 left, 6 per global micro batch
    tail = [list(PretrainingSampler(22, 4, 3, r, 2, drop_last=False))[-1] for r in range(2)]
    assert tail == [[16, 17, 18], [19, 20, 21]]
    with pytest.raises(ValueError, match="used up"):
        PretrainingSampler(10, 10, 1, 0, 1)
    with pytest.raises(ValueError, match="data_parallel_rank"):
        PretrainingSampler(10, 0, 1, 2, 2)
