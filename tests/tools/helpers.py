"""Helpers that run the tools as subprocesses (concurrently, to share 2 cores) and read results."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tool_cmd(tool, *args):
    return [sys.executable, "-W", "ignore", os.path.join(REPO, "tools", tool), *map(str, args)]


def run_tool(tool, *args, env=None, timeout=120):
    """Runs tools/<tool> and returns the CompletedProcess (text output)."""
    return subprocess.run(
        tool_cmd(tool, *args), capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout
    )


def run_tools(commands, timeout=180):
    """Runs [(tool, args, env), ...] concurrently; returns process results in order."""
    procs = [
        subprocess.Popen(
            tool_cmd(tool, *args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        for tool, args, env in commands
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def read_documents(prefix):
    """The documents of an indexed dataset, as lists of token ids."""
    import megatron_loopmdm  # noqa: F401

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    bounds = ds.document_indices
    docs = []
    for d in range(len(bounds) - 1):
        seqs = [ds[i].tolist() for i in range(bounds[d], bounds[d + 1])]
        docs.append([t for s in seqs for t in s])
    return docs


def read_jsonl(path, key="text"):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)[key] for line in f]


def hf_args(tokenizer_dir):
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir]
