"""Joins indexed datasets (for example the shards of tools/preprocess_data.py) into one.

    python tools/merge_datasets.py --input out/corpus-shard*_text_document --output-prefix out/c
    python tools/merge_datasets.py --input out/shards/ --output-prefix out/corpus_text_document

Inputs are prefixes (without .bin/.idx) merged in the order given, or one directory whose
prefixes are merged in name order (shard names sort in shard order). Shard sets are checked for
completeness. Exit codes: 0 done, 2 bad arguments or inputs.
"""

import argparse
import glob
import os
import sys

import megatron_loopmdm  # noqa: F401
from megatron_loopmdm.data.merge import find_prefixes, merge_indexed_datasets


def _prefixes(inputs):
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        return find_prefixes(inputs[0])
    prefixes = []
    for item in inputs:
        stem = item[:-4] if item.endswith((".bin", ".idx")) else item
        if glob.has_magic(stem):
            prefixes.extend(sorted({p[:-4] for p in glob.glob(stem + ".idx")}))
        elif stem not in prefixes:
            prefixes.append(stem)
    return prefixes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", nargs="+", required=True, help="Dataset prefixes in order, or one directory."
    )
    parser.add_argument(
        "--output-prefix",
        required=True,
        help="Prefix of the merged .bin/.idx (the full name, suffixes excluded).",
    )
    args = parser.parse_args(argv)
    try:
        prefixes = _prefixes(args.input)
        merge_indexed_datasets(prefixes, args.output_prefix)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
