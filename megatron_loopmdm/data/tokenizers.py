"""Tokenizers for preprocessing and for megatron-core's datasets.

Each class has megatron-core's `MegatronTokenizerBase` interface (what `GPTDatasetConfig`
expects: `path`, `tokenize`, `detokenize`, `vocab`, `vocab_size`, `eod`, ...; `data/dataset.py`
registers the base as a virtual subclass, so `isinstance` holds) without importing megatron-core
here, so preprocessing starts without torch or megatron-core. They add what preprocessing
needs: `encode_batch` (the tokenizer library's own batch encoder), `eod`, optional `pad` and
`mask`, and `unique_identifiers` (megatron-core hashes these into its index-cache names, so they
must be JSON-serialisable and stable across runs).

Type names follow Megatron-LM's `--tokenizer-type` where one exists. Optional libraries
(sentencepiece, tiktoken) are imported where used, with a clear error when missing.
"""

import abc
import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

TOKENIZER_TYPES = (
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
    "GPTSentencePieceTokenizer",
    "SentencePieceTokenizer",
    "TikTokenizer",
)

# GPT-2's pre-tokenisation regex (also tiktoken's "gpt2" pattern).
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
TIKTOKEN_PATTERNS = {"gpt2": _GPT2_PATTERN, "cl100k": _CL100K_PATTERN}
EOD_TEXT = "<|endoftext|>"


def _require(module: str, feature: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(
            f"{feature} needs the optional package '{module}': pip install {module}"
        ) from e


def _require_file(path: Optional[str], what: str, flag: str) -> str:
    if not path:
        raise ValueError(f"{what} is required: pass {flag}.")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path} (from {flag}).")
    return path


def _fast_batch(backend):
    """`encode_batch_fast` (tokenizers >= 0.21: the same ids, no character offsets), else
    `encode_batch`."""
    return getattr(backend, "encode_batch_fast", backend.encode_batch)


class _TokenizerBase(abc.ABC):
    """Shared plumbing; subclasses set `_eod`, `_pad`, `_mask` and implement encode/decode."""

    library = "megatron_loopmdm"

    def __init__(self, path: str, **identity) -> None:
        self.path = path
        self.class_name = type(self).__name__
        self._identity = identity
        self._eod: Optional[int] = None
        self._pad: Optional[int] = None
        self._mask: Optional[int] = None
        self.eod_source = "none"
        """Which token is the end of document, for the log (e.g. "sep_token '[SEP]' (id 3)")."""
        self.num_threads = os.cpu_count() or 1
        """Threads the batch encoder may use; preprocessing sets 1 in its worker processes."""

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        """What identifies this tokenizer in megatron-core's index-cache hashes."""
        ids = OrderedDict(class_name=type(self).__name__, path=self.path)
        ids.update(sorted(self._identity.items()))
        ids["vocab_size"] = self.vocab_size
        return ids

    def tokenize(self, text: str) -> List[int]:
        """Token ids of one text, as the library encodes it by default."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:  # pragma: no cover
        raise NotImplementedError

    @property
    def eod(self) -> int:
        """End-of-document id, appended by `--append-eod` and used as the packing separator."""
        if self._eod is None:
            raise ValueError(
                f"{type(self).__name__} at {self.path} has no end-of-document token (no EOS or "
                "SEP); pass --eod-token with a token of its vocabulary."
            )
        return self._eod

    def set_eod_token(self, token: str) -> None:
        """Uses `token` (a token string of the vocabulary) as the end of document (`--eod-token`).

        Raises:
            ValueError: `token` is not a single token of the vocabulary.
        """
        token_id = self._token_id(token)
        if token_id is None:
            raise ValueError(
                f"--eod-token {token!r} is not a token of the {type(self).__name__} at "
                f"{self.path}; name one token of its vocabulary."
            )
        self._eod = token_id
        self.eod_source = f"--eod-token {token!r} (id {token_id})"

    def _token_id(self, token: str) -> Optional[int]:  # pragma: no cover
        raise NotImplementedError

    @property
    def pad(self) -> int:
        """Padding id; raises AttributeError when the tokenizer defines none."""
        if self._pad is None:
            raise AttributeError(f"{type(self).__name__} at {self.path} has no pad token.")
        return self._pad

    @property
    def mask(self) -> int:
        """The `[MASK]` id masked diffusion corrupts tokens into."""
        if self._mask is None:
            raise ValueError(
                f"{type(self).__name__} at {self.path} has no mask token; train a tokenizer with "
                "tools/train_tokenizer.py (it adds one) or add a mask token to this one."
            )
        return self._mask

    @property
    def mask_token_id(self) -> int:
        """Alias of `mask`, the name the diffusion code uses."""
        return self.mask

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no chat template.")


def _special_token(config: Dict, name: str) -> Optional[str]:
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HuggingFaceTokenizer(_TokenizerBase):
    """A Hugging Face tokenizer directory, encoded as `AutoTokenizer(text).input_ids` would be.

    Directories whose `tokenizer_config.json` names the generic fast class load `tokenizer.json`
    straight into the `tokenizers` library (identical ids, and no `transformers` import); others go
    through `transformers.AutoTokenizer`, offline.

    Args:
        path: The tokenizer directory (`--tokenizer-model`).
    """

    _GENERIC_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend", None}

    def __init__(self, path: str) -> None:
        super().__init__(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"Hugging Face tokenizer directory not found: {path} (from --tokenizer-model)."
            )
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if os.path.exists(os.path.join(path, name)):
                with open(os.path.join(path, name), encoding="utf-8") as f:
                    config.update(json.load(f))
        tokenizer_json = os.path.join(path, "tokenizer.json")
        if (
            os.path.exists(tokenizer_json)
            and config.get("tokenizer_class") in self._GENERIC_CLASSES
        ):
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_file(tokenizer_json)
            names = ("eos_token", "sep_token", "pad_token", "mask_token")
            tokens = {n: _special_token(config, n) for n in names}
            ids = {n: t and self._backend.token_to_id(t) for n, t in tokens.items()}
            self._vocab_size = self._backend.get_vocab_size(with_added_tokens=True)
        else:
            tokens, ids = self._load_with_transformers(path)
        # transformers' `tokenizer(text)` applies neither the truncation nor the padding a
        # tokenizer.json may carry (BERT-like ones often hold max_length 128); the raw backend
        # would apply both and silently cut or pad every document.
        self._backend.no_truncation()
        self._backend.no_padding()
        self._pad, self._mask = ids["pad_token"], ids["mask_token"]
        # Megatron-LM's HuggingFaceTokenizer: EOS, else SEP (it sets eos_token = sep_token).
        for name in ("eos_token", "sep_token"):
            if ids[name] is not None:
                self._eod = ids[name]
                self.eod_source = f"{name} {tokens[name]!r} (id {ids[name]})"
                break

    def _load_with_transformers(self, path: str):
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises many types here
            raise ValueError(f"Cannot load a Hugging Face tokenizer from {path}: {e}") from e
        if not hf.is_fast:
            raise ValueError(f"{path} holds a slow (Python) tokenizer; convert it to a fast one.")
        from tokenizers import Tokenizer

        # A copy, so that switching truncation and padding off does not touch `hf`.
        self._backend = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        self._vocab_size = len(hf)
        names = ("eos_token", "sep_token", "pad_token", "mask_token")
        tokens = {n: getattr(hf, n, None) for n in names}
        ids = {n: None if t is None else hf.convert_tokens_to_ids(t) for n, t in tokens.items()}
        return tokens, ids

    def check_against_transformers(self, texts: Sequence[str]) -> None:
        """Checks that `encode_batch` gives `AutoTokenizer(path)(text)["input_ids"]` (what
        Megatron-LM's tool writes) for `texts`.

        Raises:
            ValueError: The ids differ, naming the tokenizer and the first differing text.
        """
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # "sequence longer than model_max_length" is expected
        hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        for text, ids in zip(texts, self.encode_batch(list(texts))):
            expected = hf(text)["input_ids"]
            if ids != expected:
                raise ValueError(
                    f"The Hugging Face tokenizer at {self.path} encodes differently through the "
                    f"tokenizers library ({len(ids)} ids) than through transformers "
                    f"({len(expected)} ids) for the text starting {text[:40]!r}; report this "
                    "tokenizer."
                )

    def _token_id(self, token: str) -> Optional[int]:
        return self._backend.token_to_id(token)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in _fast_batch(self._backend)(list(texts), add_special_tokens=True)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab(self) -> Dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size


class GPT2BPETokenizer(_TokenizerBase):
    """GPT-2 byte-level BPE from a `vocab.json` and `merges.txt` (Megatron-LM's GPT2BPETokenizer).

    Encoded with the `tokenizers` library's byte-level BPE, which uses GPT-2's regex and byte map;
    `<|endoftext|>` in text is that special token (as with transformers' GPT-2 tokenizer, which
    Megatron-LM uses), and the vocabulary size is the number of entries in
    `vocab.json`, as in Megatron-LM.
    """

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        _require_file(vocab_file, "The GPT-2 vocab file", "--vocab-file")
        _require_file(merge_file, "The GPT-2 merge file", "--merge-file")
        super().__init__(vocab_file, merge_file=merge_file)
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        try:
            with open(vocab_file, encoding="utf-8") as f:
                self._vocab = json.load(f)
            self._backend = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        except Exception as e:
            raise ValueError(f"Cannot read GPT-2 BPE files {vocab_file}, {merge_file}: {e}") from e
        self._backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._backend.decoder = decoders.ByteLevel()
        if EOD_TEXT not in self._vocab:
            raise ValueError(f"{vocab_file} has no '{EOD_TEXT}' entry to use as end of document.")
        self._eod = self._vocab[EOD_TEXT]
        self.eod_source = f"{EOD_TEXT!r} (id {self._eod})"
        # Megatron-LM encodes through transformers' GPT-2 tokenizer, for which <|endoftext|> in
        # a text is the special token, not its characters.
        from tokenizers import AddedToken

        self._backend.add_special_tokens([AddedToken(EOD_TEXT, special=True)])

    def _token_id(self, token: str) -> Optional[int]:
        return self._vocab.get(token)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in _fast_batch(self._backend)(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab(self) -> Dict[str, int]:
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)


class GPTSentencePieceTokenizer(_TokenizerBase):
    """A SentencePiece model encoded with `encode_as_ids` (as Megatron-LM's GPTSentencePiece).

    End of document is the model's EOS piece; pad is its pad piece when it has one; the mask is a
    piece named by `mask_piece` when the model has it.
    """

    def __init__(self, model_file: str, mask_piece: str = "<mask>") -> None:
        _require_file(model_file, "The SentencePiece model", "--tokenizer-model")
        super().__init__(model_file)
        spm = _require("sentencepiece", "SentencePiece tokenizers")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except Exception as e:
            raise ValueError(f"{model_file} is not a SentencePiece model: {e}") from e
        self._eod = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self._pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        mask = self._sp.piece_to_id(mask_piece)
        self._mask = mask if mask != self._sp.unk_id() else None
        if self._eod is not None:
            self.eod_source = f"EOS piece {self._sp.id_to_piece(self._eod)!r} (id {self._eod})"

    def _token_id(self, token: str) -> Optional[int]:
        token_id = self._sp.piece_to_id(token)
        return None if token_id == self._sp.unk_id() and token != "<unk>" else token_id

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self.num_threads)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab(self) -> Dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()


class TikTokenizer(_TokenizerBase):
    """A tiktoken encoding: a named one (`cl100k_base`, from tiktoken's cache), a rank file, or
    Megatron-LM's JSON vocabulary.

    * A `.json` file is Megatron-LM's TikTokenizer layout, encoded by megatron-core's own
      `TikTokenTokenizer`: ids 0..num_special_tokens-1 are special (`</s>`, id 2, is the end of
      document), the ranks follow, the vocabulary is cut to `vocab_size`, patterns `v1`/`v2`
      (default `v2`), and special-token strings in text are special (`allowed_special="all"`).
      Its files are byte-identical to Megatron-LM's.
    * A rank file is tiktoken's own format (one `base64-token rank` per line); `<|endoftext|>` and
      `<|mask|>` are added after the ranks, and text is encoded as ordinary text.

    Args:
        model: An encoding name or a path to a rank or JSON file (`--tokenizer-model`).
        pattern: Pre-tokenisation regex, or one of `TIKTOKEN_PATTERNS` (rank files) or `v1`/`v2`
            (JSON files); None for the default (cl100k; v2 for JSON).
        vocab_size: Megatron-LM's `--vocab-size` for JSON files (default 131072).
        num_special_tokens: Megatron-LM's `--tiktoken-num-special-tokens` for JSON files.
    """

    def __init__(
        self,
        model: str,
        pattern: Optional[str] = None,
        vocab_size: Optional[int] = None,
        num_special_tokens: int = 1000,
    ) -> None:
        if not model:
            raise ValueError("TikTokenizer needs --tokenizer-model (an encoding name or file).")
        super().__init__(model, pattern=pattern)
        tiktoken = _require("tiktoken", "TikTokenizer")
        self._allowed_special = None
        if model.endswith(".json") and os.path.exists(model):
            self._load_megatron_json(model, pattern, vocab_size, num_special_tokens)
            return
        pattern = pattern or "cl100k"
        if os.path.exists(model):
            import tiktoken.load

            try:
                ranks = tiktoken.load.load_tiktoken_bpe(model)
            except Exception as e:
                raise ValueError(f"{model} is not a tiktoken rank file: {e}") from e
            special = {EOD_TEXT: len(ranks), "<|mask|>": len(ranks) + 1}
            self._enc = tiktoken.Encoding(
                name=os.path.basename(model),
                pat_str=TIKTOKEN_PATTERNS.get(pattern, pattern),
                mergeable_ranks=ranks,
                special_tokens=special,
            )
            self._mask = special["<|mask|>"]
        else:
            try:
                self._enc = tiktoken.get_encoding(model)
            except Exception as e:
                raise ValueError(
                    f"tiktoken encoding '{model}' is neither a file nor an encoding available "
                    f"offline ({e}). Pass a rank file, or set TIKTOKEN_CACHE_DIR to a cache."
                ) from e
        self._eod = self._enc.eot_token
        self._vocab_size = self._enc.n_vocab
        self.eod_source = f"{EOD_TEXT!r} (id {self._eod})"

    def _load_megatron_json(self, model, pattern, vocab_size, num_special_tokens) -> None:
        from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import TikTokenTokenizer

        try:
            lib = TikTokenTokenizer(
                model,
                num_special_tokens=num_special_tokens,
                pattern=pattern or "v2",
                vocab_size=vocab_size or 131072,
            )
        except (AssertionError, ValueError) as e:
            raise ValueError(
                f"Cannot load the Megatron-LM tiktoken vocabulary {model} ({e or 'bad layout'}); "
                "check --vocab-size (at most its entries + --tiktoken-num-special-tokens) and "
                "--tiktoken-pattern (v1 or v2)."
            ) from e
        self._enc = lib.tokenizer
        self._allowed_special = "all"
        self._eod, self._pad, self._mask = lib.eos_id, lib.pad_id, lib.mask_id
        self._vocab_size = lib.vocab_size
        self.eod_source = f"'</s>' (id {self._eod})"

    def _token_id(self, token: str) -> Optional[int]:
        try:
            return self._enc.encode_single_token(token)
        except KeyError:
            return None

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        if self._allowed_special:
            return self._enc.encode_batch(
                list(texts), allowed_special="all", num_threads=self.num_threads
            )
        return self._enc.encode_ordinary_batch(list(texts), num_threads=self.num_threads)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    @property
    def vocab(self) -> Dict[str, int]:
        raise NotImplementedError("tiktoken encodings expose no string vocabulary.")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    tiktoken_pattern: Optional[str] = None,
    eod_token: Optional[str] = None,
    vocab_size: Optional[int] = None,
    tiktoken_num_special_tokens: int = 1000,
) -> _TokenizerBase:
    """Builds a tokenizer from Megatron-LM-style arguments.

    Args:
        tokenizer_type: One of `TOKENIZER_TYPES`.
        tokenizer_model: HF directory, SentencePiece model, or tiktoken name/rank/JSON file.
        vocab_file: GPT-2 `vocab.json` (GPT2BPETokenizer).
        merge_file: GPT-2 `merges.txt` (GPT2BPETokenizer).
        tiktoken_pattern: Pre-tokenisation regex or name for tiktoken files (None: default).
        eod_token: A token string to use as end of document instead of the tokenizer's own.
        vocab_size: Megatron-LM's `--vocab-size` for tiktoken JSON vocabularies.
        tiktoken_num_special_tokens: Special ids before the ranks in tiktoken JSON vocabularies.

    Raises:
        ValueError: Unknown type, missing argument or unreadable model.
        FileNotFoundError: A named file or directory does not exist.
    """
    if tokenizer_type == "HuggingFaceTokenizer":
        tokenizer = HuggingFaceTokenizer(
            _require_file(tokenizer_model, "The tokenizer directory", "--tokenizer-model")
        )
    elif tokenizer_type == "GPT2BPETokenizer":
        tokenizer = GPT2BPETokenizer(vocab_file, merge_file)
    elif tokenizer_type in ("GPTSentencePieceTokenizer", "SentencePieceTokenizer"):
        tokenizer = GPTSentencePieceTokenizer(tokenizer_model)
    elif tokenizer_type == "TikTokenizer":
        tokenizer = TikTokenizer(
            tokenizer_model, tiktoken_pattern, vocab_size, tiktoken_num_special_tokens
        )
    else:
        raise ValueError(
            f"Unknown --tokenizer-type {tokenizer_type!r}; choose one of "
            f"{', '.join(TOKENIZER_TYPES)}."
        )
    if eod_token is not None:
        tokenizer.set_eod_token(eod_token)
    return tokenizer
