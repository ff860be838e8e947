"""One style for the tree: `ruff format` at the line width set in pyproject.toml, `ruff
check` (syntax errors, unused or undefined names, the line width), and stage scripts short
enough to read like their paper section. Run `ruff format .` to comply."""

import ast
import os
import subprocess
import sys

import pytest

from stages import REPO

STAGES = [
    "train_diffusion.py",
    "synthesize.py",
    "select_features.py",
    "train_realnet.py",
    "evaluate.py",
]
MAX_STAGE_LINES, MAX_MAIN_LINES = 350, 60  # nanoGPT's train.py is 336 lines


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


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_script_reads_like_its_paper_section(stage):
    """What is not the stage's own logic lives in realnet/: the script stays short and its
    main() shows the few steps, not their details."""
    with open(os.path.join(REPO, stage)) as f:
        source = f.read()
    assert source.count("\n") <= MAX_STAGE_LINES, f"{stage}: {source.count(chr(10))} lines"
    (main,) = [n for n in ast.parse(source).body if getattr(n, "name", None) == "main"]
    length = main.end_lineno - main.lineno + 1
    assert length <= MAX_MAIN_LINES, f"{stage}: main() is {length} lines"
