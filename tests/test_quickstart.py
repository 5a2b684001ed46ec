"""`make quickstart`'s pipeline at a smaller size: every stage's output, checked."""

import csv
import json
import math
import subprocess
import sys

from tests.utils import REPO, free_port


def test_quickstart_pipeline_small(tmp_path):
    import megatron_loopmdm  # noqa: F401

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    work = tmp_path / "qs"
    result = subprocess.run(
        [sys.executable, "tools/quickstart.py", "--small", "--workdir", str(work)],
        capture_output=True, text=True, cwd=REPO, timeout=900,
        env={**__import__("os").environ, "MASTER_PORT": str(free_port())},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for n in range(1, 8):
        assert f"=== [{n}/7] done" in result.stdout
    assert "quickstart finished" in result.stdout
    # 3: the indexed dataset is readable and holds the corpus.
    dataset = IndexedDataset(str(work / "data" / "corpus_text_document"))
    assert len(dataset) == 1500 and len(dataset[0]) > 0
    # 4: the loss fell and TensorBoard was written.
    losses = [json.loads(line)["loss"] for line in open(work / "metrics.jsonl")]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert list((work / "tensorboard").iterdir())
    # 5: the loop sweep wrote its table and plot.
    assert list((work / "eval").glob("*.png")) and list((work / "eval").glob("*.csv"))
    # 6: the checkpoint converted.
    assert (work / "hf_model" / "config.json").exists()
    assert list((work / "hf_model").glob("*.safetensors"))
    # 7: samples are text, for fixed and adaptive loops.
    for name in ("samples_fixed.jsonl", "samples_adaptive.jsonl"):
        rows = [json.loads(line) for line in open(work / name)]
        assert len(rows) == 2
        assert all(isinstance(row["completion"], str) and row["completion"] for row in rows)
    assert not math.isnan(losses[-1])
    # What looping did: the NELBO table of stage 5 and the costs of stage 7's two logs, as read.
    summary = result.stdout[result.stdout.index("what looping did in this run:"):]
    with open(work / "eval" / "nelbo_vs_loops.csv") as f:
        nelbo = {int(r["num_loops"]): float(r["nelbo"]) for r in csv.DictReader(f)}
    assert sorted(nelbo) == [1, 2, 3, 4, 5, 6]
    assert "  ".join(f"{s}: {v:.3f}" for s, v in sorted(nelbo.items())) in summary
    assert f"best at S = {min(nelbo, key=nelbo.get)}; trained S_max = 3" in summary
    rises = max(nelbo[4], nelbo[5], nelbo[6]) > nelbo[3]
    assert ("past S_max it rises" in summary) == rises
    costs = {}
    for log in ("7a", "7b"):
        lines = (work / "logs" / f"{log}.log").read_text().splitlines()
        costs[log] = [x.split()[2] for x in lines if x.startswith(("loop evaluations: ",
                                                                    "model FLOPs: "))]
    fixed, adaptive = costs["7a"], costs["7b"]
    assert int(fixed[0]) == 3 * 32  # S_max loops in each of the 32 steps of one batch
    assert f"sampling: fixed {fixed[0]} loop evaluations" in summary
    assert f"adaptive {adaptive[0]} loop evaluations" in summary
    assert f"{int(adaptive[0]) / int(fixed[0]):.2f}x the loop evaluations" in summary
