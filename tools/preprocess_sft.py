"""Tokenizes SFT examples (JSON lines) into Megatron indexed datasets of tokens + loss mask.

    python tools/preprocess_sft.py --input sft.jsonl --output-prefix data/sft \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok

Each line is `{"prompt": ..., "response": ...}` or `{"messages": [{"role", "content"}, ...]}`
(rendered with the tokenizer's chat template when it has one; assistant turns are responses).
Writes data/sft_text_document.{bin,idx} (tokens, EOD after each response) and
data/sft_loss_mask.{bin,idx} (1 on response tokens), for `pretrain_loopmdm.py --sft --data-path
data/sft`. Across nodes, run one process per shard (--shard-index/--num-shards, defaulting
from SLURM or torchrun variables); join shards with tools/merge_datasets.py, once per suffix.

Exit codes: 0 done; 2 bad arguments, tokenizer, unreadable input, or a bad example with
--on-error fail. No complete-looking output is left unless the run finished.
"""

import argparse
import json
import sys

from megatron_loopmdm.data import preprocess as pp
from megatron_loopmdm.data import readers
from megatron_loopmdm.data.sft import _chat_template, encode_example, sft_prefixes
from megatron_loopmdm.data.tokenizers import TOKENIZER_TYPES, build_tokenizer

import numpy


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="JSON-lines files, in order.")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument("--tokenizer-model")
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--no-append-eod", action="store_true", help="No EOD after each response.")
    p.add_argument(
        "--max-length", type=int, help="Skip (and count) examples longer than this many tokens."
    )
    p.add_argument("--shard-index", type=int)
    p.add_argument("--num-shards", type=int)
    p.add_argument("--on-error", default="fail", choices=["fail", "skip"])
    return p.parse_args(argv)


def convert(args, output_prefix: str, shard_index: int, num_shards: int) -> dict:
    """Writes the two datasets; returns counts. Raises pp.BadInputError on a bad example."""
    tokenizer = build_tokenizer(
        args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file
    )
    template = _chat_template(tokenizer)
    files = readers.expand_inputs(args.input)
    units = readers.plan_shard(files, "jsonl", shard_index, num_shards)
    text_prefix, mask_prefix = sft_prefixes(output_prefix)
    writers = [
        pp.AtomicIndexedWriter(text_prefix, pp.optimal_dtype(tokenizer.vocab_size)),
        pp.AtomicIndexedWriter(mask_prefix, numpy.uint8),
    ]
    counts = {"examples": 0, "tokens": 0, "response_tokens": 0, "too_long": 0, "bad": 0}
    try:
        for unit in units:
            for batch in readers.unit_batches(unit, 256, []):
                for line_no, line in zip(batch.locations, batch.payloads):
                    if not line.strip():
                        continue
                    try:
                        tokens, mask = encode_example(
                            json.loads(line), tokenizer, not args.no_append_eod, template
                        )
                    except (ValueError, UnicodeDecodeError) as e:
                        if args.on_error == "fail":
                            raise pp.BadInputError(f"{batch.source}:{line_no}: {e}") from None
                        counts["bad"] += 1
                        continue
                    if args.max_length and len(tokens) > args.max_length:
                        counts["too_long"] += 1
                        continue
                    writers[0].add_document(tokens, [len(tokens)])
                    writers[1].add_document(mask, [len(mask)])
                    counts["examples"] += 1
                    counts["tokens"] += len(tokens)
                    counts["response_tokens"] += int(mask.sum())
        for writer in writers:
            writer.commit()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    return counts


def main(argv=None) -> int:
    args = parse_args(argv)
    shard_index, num_shards = pp.default_shard()
    shard_index = shard_index if args.shard_index is None else args.shard_index
    num_shards = num_shards if args.num_shards is None else args.num_shards
    try:
        if args.max_length is not None and args.max_length < 1:
            raise ValueError("--max-length must be positive.")
        prefix = pp.shard_output_prefix(args.output_prefix, shard_index, num_shards)
        counts = convert(args, prefix, shard_index, num_shards)
    except pp.BadInputError as e:
        print(
            f"error: bad input: {e} (--on-error skip counts and skips such lines)", file=sys.stderr
        )
        return pp.BAD_INPUT_EXIT_CODE
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return pp.USAGE_EXIT_CODE
    print(
        f"wrote {counts['examples']} examples ({counts['tokens']} tokens, "
        f"{counts['response_tokens']} in responses) to {sft_prefixes(prefix)[0]} and "
        f"{sft_prefixes(prefix)[1]}; skipped {counts['too_long']} longer than --max-length "
        f"and {counts['bad']} bad lines"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
