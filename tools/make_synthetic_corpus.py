"""Writes a seeded synthetic JSON-lines corpus (stories, facts, GSM8K-style word problems).

python tools/make_synthetic_corpus.py --output corpus.jsonl --num-docs 10000 --seed 1
python tools/make_synthetic_corpus.py --output corpus.jsonl --size-mb 50
"""

import argparse
import sys

from megatron_loopmdm.data.synthetic import write_synthetic_corpus


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="Output .jsonl path.")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--num-docs", type=int, help="Number of documents.")
    size.add_argument("--size-mb", type=float, help="Approximate output size in MB (1e6 bytes).")
    parser.add_argument("--seed", type=int, default=1234, help="RNG seed (default 1234).")
    args = parser.parse_args(argv)
    size_bytes = None if args.size_mb is None else int(args.size_mb * 1e6)
    try:
        count = write_synthetic_corpus(args.output, args.seed, args.num_docs, size_bytes)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} documents to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
