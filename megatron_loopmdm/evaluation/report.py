"""Tables (CSV and Markdown) and plots of evaluation results."""

import csv
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def format_table(rows: List[Dict], columns: Sequence[str]) -> str:
    """A Markdown table of `rows` (floats with 4 decimals)."""

    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_table_and_plot(
    rows: List[Dict],
    output_dir,
    name: str,
    x: str,
    y: str,
    columns: Sequence[str],
    series: Optional[str] = None,
    title: str = "",
) -> Dict[str, Path]:
    """Writes OUT/name.csv, OUT/name.md and OUT/name.png (y against x, a line per `series`).

    Returns:
        {"csv": path, "md": path, "png": path}.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{name}.csv", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    paths["md"].write_text(format_table(rows, columns) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "Plots need the optional package 'matplotlib': pip install matplotlib"
        ) from e
    figure, axes = plt.subplots(figsize=(5, 3.5))
    groups = sorted({r[series] for r in rows}) if series else [None]
    for group in groups:
        points = [r for r in rows if series is None or r[series] == group]
        label = None if series is None else f"{series}={group}"
        axes.plot([r[x] for r in points], [r[y] for r in points], marker="o", label=label)
    axes.set_xlabel(x)
    axes.set_ylabel(y)
    axes.set_title(title)
    if series:
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(paths["png"], dpi=100)
    plt.close(figure)
    return paths
