"""Supervised fine-tuning (SFT) data: prompt/response examples as Megatron indexed datasets.

On disk an SFT dataset is two `.bin`/`.idx` pairs with the same document layout (one document of
one sequence per example): `PREFIX_text_document` holds the tokens and `PREFIX_loss_mask` a
uint8 per token, 1 on response tokens (the ones that are masked and scored) and 0 on prompt
tokens (never masked, never in the loss). `tools/preprocess_sft.py` writes them.

Training samples are `seq_length` tokens. `packing="pad"` puts one example in each sample and
pads it with EOD; `packing="pack"` fills each sample greedily with whole examples, which attend
only within themselves (`document_ids`). Padding is neither attended nor scored, unless
`eos_in_loss` (LLaDA's choice): then padding EOD tokens belong to the (last) example's response,
are masked and scored like it, so the model learns to stop.
"""

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.data.config import parse_blend
from megatron_loopmdm.data.dataset import PADDING_DOCUMENT_ID
from megatron_loopmdm.data.indexed import IndexedDatasetError, check_indexed_dataset, check_vocab

import numpy
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

TEXT_SUFFIX = "_text_document"
MASK_SUFFIX = "_loss_mask"
PACKINGS = ("pad", "pack")
_FALLBACK_HEADER = "{role}: "


def sft_prefixes(prefix: str) -> Tuple[str, str]:
    """(tokens prefix, loss-mask prefix) of an SFT dataset named `PREFIX` or
    `PREFIX_text_document`."""
    base = prefix[: -len(TEXT_SUFFIX)] if prefix.endswith(TEXT_SUFFIX) else prefix
    return base + TEXT_SUFFIX, base + MASK_SUFFIX


# ---------------------------------------------------------------------------------------------
# Encoding examples.


def _chat_template(tokenizer) -> Optional[str]:
    """The `chat_template` of a Hugging Face tokenizer directory, or None."""
    path = os.path.join(str(getattr(tokenizer, "path", "")), "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    return template if isinstance(template, str) else None


def _renderer(template: Optional[str]):
    """A function (messages, add_generation_prompt) -> text."""
    if template is None:

        def render(messages, add_generation_prompt):
            text = "".join(
                _FALLBACK_HEADER.format(role=m["role"]) + m["content"] + "\n" for m in messages
            )
            return text + (
                _FALLBACK_HEADER.format(role="assistant") if add_generation_prompt else ""
            )

        return render
    import jinja2

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    return lambda messages, add_generation_prompt: compiled.render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )


def chat_segments(messages: Sequence[dict], template: Optional[str]) -> List[Tuple[str, bool]]:
    """Splits a rendered chat into (text, is_response) pieces; assistant contents are responses.

    Each message's piece is what it adds to the rendering of the messages before it; an
    assistant turn's header (the template's generation prompt) stays on the prompt side.
    Without a template, messages render as `role: content` lines.

    Raises:
        ValueError: Bad messages, or a template whose renderings do not extend one another.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("`messages` must be a non-empty list of {role, content}")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ValueError("each message needs a `role` and a string `content`")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("`messages` has no assistant turn to learn")
    render = _renderer(template)
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = render(messages[:i], True)
            if not header.startswith(done):
                raise ValueError("the chat template's renderings do not extend one another")
            pieces.append((header[len(done) :], False))
            done = header
        text = render(messages[: i + 1], False)
        if not text.startswith(done):
            raise ValueError("the chat template's renderings do not extend one another")
        pieces.append((text[len(done) :], message["role"] == "assistant"))
        done = text
    return [(text, is_response) for text, is_response in pieces if text]


def encode_example(
    record: dict, tokenizer, append_eod: bool = True, template: Optional[str] = None
) -> Tuple[numpy.ndarray, numpy.ndarray]:
    """Tokens and response mask of one example: `{prompt, response}` or `{messages}`.

    Pieces are tokenized one by one and concatenated; the EOD appended after the response is
    part of the response (the model learns to stop).

    Returns:
        tokens int64 [n], response mask uint8 [n].

    Raises:
        ValueError: The record has neither form, or empty fields.
    """
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    if "messages" in record:
        pieces = chat_segments(record["messages"], template)
    elif isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        pieces = [(record["prompt"], False), (record["response"], True)]
    else:
        raise ValueError("expected string fields `prompt` and `response`, or `messages`")
    tokens, mask = [], []
    for (text, is_response), ids in zip(pieces, tokenizer.encode_batch([p for p, _ in pieces])):
        tokens += ids
        mask += [int(is_response)] * len(ids)
    if append_eod:
        tokens.append(tokenizer.eod)
        mask.append(1)
    if not any(mask):
        raise ValueError("the response is empty after tokenization")
    return numpy.asarray(tokens, dtype=numpy.int64), numpy.asarray(mask, dtype=numpy.uint8)


# ---------------------------------------------------------------------------------------------
# Training samples.


@dataclass
class SFTConfig:
    """How SFT examples become training samples."""

    seq_length: int
    """Tokens per sample."""
    data_path: Optional[List[str]] = None
    """SFT dataset prefixes (concatenated), divided by `split`."""
    split: Optional[str] = "969,30,1"
    train_data_path: Optional[List[str]] = None
    valid_data_path: Optional[List[str]] = None
    seed: int = 1234
    """Seed of the per-epoch example shuffle."""
    packing: str = "pad"
    """`pad`: one example per sample; `pack`: whole examples packed, per-example attention."""
    eos_in_loss: bool = False
    """Padding EOD tokens are attended, masked and scored as response (LLaDA)."""

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise ValueError(f"--sft-packing {self.packing!r}: choose one of {PACKINGS}.")
        if not (self.data_path or self.train_data_path):
            raise ValueError("--sft needs --data-path (or --train-data-path) SFT prefixes.")
        for paths in (self.data_path, self.train_data_path, self.valid_data_path):
            if paths and parse_blend(paths)[1] is not None:
                raise ValueError(
                    "--sft takes dataset prefixes without weights; their examples are joined."
                )


class SFTExamples:
    """The examples of one or more SFT datasets, addressed 0..n-1 in prefix order."""

    def __init__(self, prefixes: Sequence[str], vocab_size: int, tokenizer_name: str):
        self.text, self.mask, self.offsets = [], [], [0]
        for prefix in prefixes:
            text_prefix, mask_prefix = sft_prefixes(prefix)
            check_vocab(check_indexed_dataset(text_prefix), vocab_size, tokenizer_name)
            check_indexed_dataset(mask_prefix)
            text, mask = IndexedDataset(text_prefix), IndexedDataset(mask_prefix)
            if not numpy.array_equal(text.sequence_lengths, mask.sequence_lengths):
                raise IndexedDatasetError(
                    f"{text_prefix} and {mask_prefix} hold different examples: write both with "
                    "tools/preprocess_sft.py in one run."
                )
            self.text.append(text)
            self.mask.append(mask)
            self.offsets.append(self.offsets[-1] + len(text))
        self.lengths = numpy.concatenate([t.sequence_lengths for t in self.text]).astype(
            numpy.int64
        )

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> Tuple[numpy.ndarray, numpy.ndarray]:
        d = int(numpy.searchsorted(self.offsets, i, side="right")) - 1
        j = i - self.offsets[d]
        return self.text[d][j].astype(numpy.int64), numpy.array(self.mask[d][j])  # copies


def _pack(order: numpy.ndarray, lengths: numpy.ndarray, seq_length: int, packing: str):
    """Groups of example ids, in `order`, one group per sample."""
    if packing == "pad":
        return [[int(i)] for i in order]
    groups, current, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if current and used + n > seq_length:
            groups.append(current)
            current, used = [], 0
        current.append(int(i))
        used += n
    if current:
        groups.append(current)
    return groups


class SFTDataset(torch.utils.data.Dataset):
    """`num_samples` samples over the examples `ids`, reshuffled each epoch.

    Each sample is a dict of tensors of length `seq_length`: `tokens` int64 (padding EOD),
    `loss_mask` float32 (1 where a token takes part: attended), `response_mask` float32
    (1 where a token may be masked and is scored), `position_ids` int64 (restarting per
    example), and with `packing="pack"` `document_ids` int64 (the example's index in the
    sample, `PADDING_DOCUMENT_ID` on padding that is not in the loss).

    Raises:
        ValueError: An example is longer than `seq_length`, or there are no examples.
    """

    def __init__(self, examples: SFTExamples, ids, config: SFTConfig, eod: int, num_samples: int):
        ids = numpy.asarray(ids, dtype=numpy.int64)
        if ids.size == 0:
            raise ValueError("The SFT split has no examples; check --split or the data paths.")
        too_long = ids[examples.lengths[ids] > config.seq_length]
        if too_long.size:
            raise ValueError(
                f"{too_long.size} SFT examples are longer than --seq-length {config.seq_length} "
                f"(longest {int(examples.lengths[too_long].max())} tokens); raise --seq-length "
                "or drop them when preprocessing (tools/preprocess_sft.py --max-length)."
            )
        self.examples, self.config, self.eod = examples, config, eod
        self.samples: List[List[int]] = []
        epoch = 0
        while len(self.samples) < num_samples:
            order = numpy.random.RandomState((config.seed, epoch)).permutation(ids)
            self.samples += _pack(order, examples.lengths, config.seq_length, config.packing)
            epoch += 1

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        s = self.config.seq_length
        tokens = torch.full((s,), self.eod, dtype=torch.long)
        loss_mask = torch.zeros(s)
        response = torch.zeros(s)
        position_ids = torch.zeros(s, dtype=torch.long)
        document_ids = torch.full((s,), PADDING_DOCUMENT_ID, dtype=torch.long)
        start = 0
        for d, i in enumerate(self.samples[idx]):
            text, mask = self.examples[i]
            n = len(text)
            tokens[start : start + n] = torch.from_numpy(text)
            response[start : start + n] = torch.from_numpy(mask.astype(numpy.float32))
            loss_mask[start : start + n] = 1.0
            position_ids[start : start + n] = torch.arange(n)
            document_ids[start : start + n] = d
            start += n
        if self.config.eos_in_loss and start < s:
            loss_mask[start:] = response[start:] = 1.0
            last = start - len(self.examples[self.samples[idx][-1]][0])
            position_ids[start:] = torch.arange(start - last, s - last)
            document_ids[start:] = document_ids[start - 1]
        else:
            position_ids[start:] = torch.arange(s - start)
        sample = {"tokens": tokens, "loss_mask": loss_mask, "response_mask": response}
        sample["position_ids"] = position_ids
        if self.config.packing == "pack":
            sample["document_ids"] = document_ids
        return sample


def _split_ids(n: int, split: str) -> List[numpy.ndarray]:
    weights = [float(p) for p in split.replace("/", ",").split(",") if p.strip()]
    weights += [0.0] * (3 - len(weights))
    bounds = numpy.round(numpy.cumsum([0.0] + weights) / sum(weights) * n).astype(int)
    return [numpy.arange(bounds[k], bounds[k + 1]) for k in range(3)]


def build_sft_datasets(
    config: SFTConfig, tokenizer, num_samples: Sequence[Optional[int]]
) -> Tuple[SFTDataset, Optional[SFTDataset]]:
    """The train and validation SFT datasets (validation None when it has no samples asked or
    no examples).

    Args:
        config: Where the examples are and how samples are cut.
        tokenizer: The tokenizer the data was written with (its EOD pads).
        num_samples: (train, valid) samples needed.
    """
    name = type(tokenizer).__name__
    if config.data_path:
        examples = SFTExamples(config.data_path, tokenizer.vocab_size, name)
        train_ids, valid_ids, _ = _split_ids(len(examples), config.split or "1")
        valid_examples = examples
    else:
        examples = SFTExamples(config.train_data_path, tokenizer.vocab_size, name)
        train_ids = numpy.arange(len(examples))
        valid_examples = config.valid_data_path and SFTExamples(
            config.valid_data_path, tokenizer.vocab_size, name
        )
        valid_ids = numpy.arange(len(valid_examples)) if valid_examples else numpy.arange(0)
    train = SFTDataset(examples, train_ids, config, tokenizer.eod, num_samples[0])
    valid = None
    if num_samples[1] and valid_ids.size:
        valid = SFTDataset(valid_examples, valid_ids, config, tokenizer.eod, num_samples[1])
    return train, valid
