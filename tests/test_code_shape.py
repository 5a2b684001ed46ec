"""Code shape: no file over 600 lines in megatron_loopmdm/, no function over 80 lines in training/.

The limits come from the project rules (keep files small and functions short); the checker is
run on a synthetic long function too, so it is known to catch one.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_loopmdm"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80


def long_functions(source: str, limit: int = MAX_FUNCTION_LINES) -> list:
    """(name, lines) of every function or method in `source` longer than `limit` lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append((node.name, lines))
    return found


def test_checker_catches_a_long_function_and_passes_a_short_one():
    statements = "".join(f"        x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    long_method = "class A:\n    def step(self):\n" + statements  # def line + 80 statements
    assert long_functions(long_method) == [("step", MAX_FUNCTION_LINES + 1)]
    short_function = "def f():\n" + "".join(f"    y{i} = {i}\n" for i in range(10))
    assert long_functions(short_function) == []


def test_no_package_file_over_the_line_limit():
    too_long = {
        str(path.relative_to(PACKAGE)): n
        for path in sorted(PACKAGE.rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert too_long == {}, f"files over {MAX_FILE_LINES} lines: {too_long}"


def test_no_training_function_over_the_line_limit():
    too_long = {
        f"{path.name}:{name}": lines
        for path in sorted((PACKAGE / "training").rglob("*.py"))
        for name, lines in long_functions(path.read_text())
    }
    assert too_long == {}, f"functions over {MAX_FUNCTION_LINES} lines in training/: {too_long}"
