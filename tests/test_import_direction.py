"""Imports run only downward: nothing below `training/` imports it, and `checkpointing/` (read by
`training/` and `hf/`) imports neither of them."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_loopmdm"


def imported_modules(source: str) -> set:
    """Every module an `import` or `from ... import` statement of `source` names."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def importers(subpackages: list, forbidden: tuple) -> dict:
    """file -> the forbidden modules it imports, for every file of `subpackages`."""
    found = {}
    for sub in subpackages:
        for path in sorted((PACKAGE / sub).rglob("*.py")):
            bad = {m for m in imported_modules(path.read_text()) if m.startswith(forbidden)}
            if bad:
                found[str(path.relative_to(PACKAGE))] = sorted(bad)
    return found


def test_the_checker_finds_an_import_in_both_forms():
    source = "import megatron_loopmdm.training.run\nfrom megatron_loopmdm import training\n"
    assert imported_modules(source) >= {
        "megatron_loopmdm.training.run",
        "megatron_loopmdm.training",
    }


def test_nothing_below_training_imports_it():
    below = sorted(
        p.name
        for p in PACKAGE.iterdir()
        if p.is_dir() and p.name not in ("training", "__pycache__")
    )
    assert "checkpointing" in below and "hf" in below
    assert importers(below, ("megatron_loopmdm.training",)) == {}


def test_checkpointing_imports_neither_training_nor_hf():
    forbidden = ("megatron_loopmdm.training", "megatron_loopmdm.hf", "megatron_loopmdm.inference")
    assert importers(["checkpointing"], forbidden) == {}


def test_only_the_argument_modules_import_argparse():
    """The library takes typed configs; a parsed namespace exists only in the command-line
    modules (`training/arguments.py` for pretrain_loopmdm.py, `inference/arguments.py` for the
    sampling tools)."""
    users = {
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if "argparse" in imported_modules(path.read_text())
    }
    assert users == {"training/arguments.py", "inference/arguments.py"}


def test_sampling_and_evaluation_start_without_megatron_core():
    """tools/generate.py and tools/evaluate.py work on Hugging Face models: importing their
    library side must not import megatron-core (about 4-6 CPU-s at every start)."""
    import subprocess
    import sys

    probe = ("import sys, megatron_loopmdm.inference, megatron_loopmdm.evaluation, "
             "megatron_loopmdm.inference.arguments; print('megatron.core' in sys.modules)")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           check=True, cwd=PACKAGE.parent).stdout.strip()  # fmt: skip
    assert found == "False"
