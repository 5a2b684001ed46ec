"""Tokenizes a corpus into Megatron indexed datasets (.bin/.idx), like Megatron-LM's tool.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok --append-eod --workers 8

writes data/corpus_text_document.{bin,idx}. Inputs: JSON lines (.jsonl/.json, also .gz/.zst),
Parquet, plain text (--text-mode file|blank-line), or a Hugging Face dataset (--hf-dataset).
Across nodes, run one process per shard (--shard-index/--num-shards, defaulting from SLURM or
torchrun variables), then join the shards with tools/merge_datasets.py.

Exit codes: 0 done; 2 bad arguments, tokenizer, unreadable or empty input, a bad document with
--on-error fail, or no progress for --stall-timeout s; 130 interrupted (SIGINT/SIGTERM). A failed
or interrupted run leaves no complete-looking output and keeps an existing one.
"""

import os
import signal
import sys


def _interrupted_while_starting(signum, frame):
    # Importing torch and megatron-core takes seconds; nothing is written yet, so just leave.
    os.write(2, b"interrupted; no output was written\n")
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted_while_starting)
signal.signal(signal.SIGTERM, _interrupted_while_starting)

import argparse  # noqa: E402

from megatron_loopmdm.data import preprocess as pp  # noqa: E402
from megatron_loopmdm.data.tokenizers import TOKENIZER_TYPES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("input")
    g.add_argument(
        "--input", nargs="+", default=[], help="Files, directories or globs, in document order."
    )
    g.add_argument(
        "--input-format",
        default="auto",
        choices=pp.readers.FORMATS,
        help="Input format; auto decides by file extension.",
    )
    g.add_argument(
        "--text-mode",
        default="file",
        choices=["file", "blank-line"],
        help="Plain text: one document per file or per blank-line-separated block.",
    )
    g.add_argument("--hf-dataset", help="Hugging Face dataset directory or name.")
    g.add_argument("--hf-split", default="train")
    g.add_argument("--hf-streaming", action="store_true")
    g.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="JSON keys (or columns) to tokenize; one output per key.",
    )
    g.add_argument("--split-sentences", action="store_true", help=argparse.SUPPRESS)
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument(
        "--tokenizer-model",
        help="HF directory, SentencePiece model or tiktoken encoding name / rank file.",
    )
    g.add_argument("--vocab-file", help="GPT-2 vocab.json.")
    g.add_argument("--merge-file", help="GPT-2 merges.txt.")
    g.add_argument(
        "--tiktoken-pattern",
        default=None,
        help="tiktoken pre-tokenization: gpt2, cl100k (rank files, default) or a regex; v1 or "
        "v2 (Megatron-LM JSON vocabularies, default v2).",
    )
    g.add_argument(
        "--vocab-size",
        type=int,
        help="Megatron-LM's --vocab-size for tiktoken JSON vocabularies (default 131072).",
    )
    g.add_argument("--tiktoken-num-special-tokens", type=int, default=1000)
    g.add_argument(
        "--eod-token",
        help="Token string to use as end of document (default: EOS, else SEP, as Megatron-LM).",
    )
    g.add_argument("--append-eod", action="store_true", help="Append EOD after each document.")
    g = p.add_argument_group("output and runtime")
    g.add_argument("--output-prefix", required=True)
    g.add_argument(
        "--workers", type=int, default=1, help="Native threads of the tokenizer's batch encoder."
    )
    g.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="Accepted for Megatron-LM command lines; the output is that of one run.",
    )
    g.add_argument(
        "--stall-timeout",
        type=float,
        default=300.0,
        help="Stop with an error after this many seconds without progress.",
    )
    g.add_argument("--batch-size", type=int, default=256, help="Documents per worker task.")
    g.add_argument(
        "--log-interval",
        type=int,
        default=1000,
        help="Documents between progress updates (0: none).",
    )
    g.add_argument(
        "--shard-index", type=int, help="This node's shard (default from SLURM_* or RANK; 0)."
    )
    g.add_argument(
        "--num-shards", type=int, help="Number of shards (default from SLURM_* or WORLD_SIZE; 1)."
    )
    g.add_argument(
        "--on-error",
        default="fail",
        choices=["fail", "skip"],
        help="On a bad document: stop (fail) or count and report it (skip).",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    # From here on, an interrupt raises KeyboardInterrupt, which removes temporary files.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, pp._on_sigterm)
    args = parse_args(argv)
    if args.split_sentences:
        print(
            "error: --split-sentences is not supported (documents are never split).",
            file=sys.stderr,
        )
        return pp.USAGE_EXIT_CODE
    shard_index, num_shards = pp.default_shard()
    if args.shard_index is not None:
        shard_index = args.shard_index
    if args.num_shards is not None:
        num_shards = args.num_shards
    try:
        config = pp.PreprocessConfig(
            output_prefix=pp.shard_output_prefix(args.output_prefix, shard_index, num_shards),
            tokenizer_type=args.tokenizer_type,
            input=args.input,
            hf_dataset=args.hf_dataset,
            hf_split=args.hf_split,
            hf_streaming=args.hf_streaming,
            input_format=args.input_format,
            text_mode=args.text_mode,
            json_keys=args.json_keys,
            tokenizer_model=args.tokenizer_model,
            vocab_file=args.vocab_file,
            merge_file=args.merge_file,
            tiktoken_pattern=args.tiktoken_pattern,
            eod_token=args.eod_token,
            vocab_size=args.vocab_size,
            tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
            stall_timeout=args.stall_timeout,
            append_eod=args.append_eod,
            workers=args.workers,
            batch_size=args.batch_size,
            shard_index=shard_index,
            num_shards=num_shards,
            on_error=args.on_error,
            log_interval=args.log_interval,
        )
        summary = pp.run_partitions(config, args.partitions)
    except pp.BadInputError as e:
        print(f"error: bad input: {e}", file=sys.stderr)
        return pp.BAD_INPUT_EXIT_CODE
    except (ValueError, OSError, ImportError, pp.StalledError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return pp.USAGE_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130
    # The output is complete and committed: a late signal must not turn success into a kill.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(summary.format())
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter finalisation, which restores the default handlers: a signal arriving
    # then would kill a run that has already finished (exit -2 with nothing said).
    os._exit(code)
