"""One style for the tree: `ruff format` at the line width set in pyproject.toml, and
`ruff check` (syntax errors, unused or undefined names). Run `ruff format .` to comply."""

import subprocess
import sys

from stages import REPO


def ruff(*args):
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_tree_is_formatted():
    result = ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_the_linter_finds_nothing():
    result = ruff("check", ".")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
