"""Trains a byte-level BPE tokenizer (with EOD, pad and mask tokens) into a Hugging Face directory.

    python tools/train_tokenizer.py --input corpus.jsonl --output-dir tok --vocab-size 8192

Use the directory with `--tokenizer-type HuggingFaceTokenizer --tokenizer-model tok`. With
`--export-gpt2` and `--export-tiktoken` the same vocabulary is also written for the
GPT2BPETokenizer and TikTokenizer types.
"""

import argparse
import os
import sys

from megatron_loopmdm.data import tokenizer_training as tt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", nargs="+", required=True, help="JSON-lines (.jsonl/.json) or plain-text files."
    )
    parser.add_argument("--json-key", default="text", help="JSON field holding the text.")
    parser.add_argument("--output-dir", required=True, help="Tokenizer directory to write.")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--eod-token", default=tt.DEFAULT_EOD_TOKEN)
    parser.add_argument("--pad-token", default=tt.DEFAULT_PAD_TOKEN)
    parser.add_argument("--mask-token", default=tt.DEFAULT_MASK_TOKEN)
    parser.add_argument(
        "--export-gpt2",
        action="store_true",
        help="Also write vocab.json and merges.txt into the output directory.",
    )
    parser.add_argument(
        "--export-tiktoken",
        action="store_true",
        help="Also write tokenizer.tiktoken (a tiktoken rank file).",
    )
    args = parser.parse_args(argv)
    for path in args.input:
        if not os.path.isfile(path):
            print(f"error: input file not found: {path}", file=sys.stderr)
            return 2
    try:
        tt.train_bpe_tokenizer(
            tt.iter_corpus_texts(args.input, args.json_key),
            args.output_dir,
            args.vocab_size,
            args.min_frequency,
            args.eod_token,
            args.pad_token,
            args.mask_token,
        )
        if args.export_gpt2:
            tt.export_gpt2_files(args.output_dir, args.output_dir)
        if args.export_tiktoken:
            tt.export_tiktoken_ranks(
                args.output_dir, os.path.join(args.output_dir, "tokenizer.tiktoken")
            )
    except (ValueError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved tokenizer to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
